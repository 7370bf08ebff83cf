"""The SVD of one up block of a weight change: truncated by the rank rule, split into two factors of equal
magnitude (`up = U sqrt(S)`, `down = sqrt(S) Vh`), and the true error of the factors as stored.

Small blocks arrive in float64 and get an exact SVD; larger ones in float32 with a randomized SVD
(`dense_svd`), whose sketch starts at FIRST_SKETCH and doubles until the energy / error rule is met.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import LoraError
from .lowrank import RankRule, dense_svd

if TYPE_CHECKING:
    import torch

FIRST_SKETCH = 64  # randomized rank tried first for --energy / --max-error (doubled until enough)
RESIDUAL_ELEMENTS = 1 << 22  # row chunk of the residual check


@dataclass
class Block:
    """One up block's result."""

    rank: int  # kept (before any padding)
    total: float  # ||change||_F^2
    kept: float  # sum of the kept singular values squared
    err2: float  # ||change - up @ down||_F^2 of the factors as stored
    up: torch.Tensor | None = None  # [h, r] in the output dtype
    down: torch.Tensor | None = None  # [r, in]


def _low_rank(d: torch.Tensor, rule: RankRule, total: float, gen: torch.Generator):
    """(U, S, Vh, k): the leading singular triplets of d and the rank the rule keeps (k <= len(S))."""
    import torch

    q = min(d.shape)
    if rule.rank is not None:
        u, s, vh = dense_svd(d, rule.rank, generator=gen)
        return u, s, vh, rule.choose(s, total)
    want = min(q, FIRST_SKETCH)
    while True:
        u, s, vh = dense_svd(d, want, generator=gen)
        k = rule.choose(s, total)
        kept = float(torch.sum(s[:k].double() ** 2))
        ok = (kept >= rule.energy * total) if rule.energy is not None else \
            (max(total - kept, 0.0) <= rule.max_error ** 2 * total)  # type: ignore[operator]
        if ok or want >= q:
            return u, s, vh, k
        want = min(q, 2 * want)


def _sumsq(d: torch.Tensor) -> float:
    """||d||_F^2 summed in float64, in row chunks (no full-size float64 copy)."""
    import torch

    step = max(1, RESIDUAL_ELEMENTS // d.shape[1])
    return math.fsum(float(torch.sum(torch.square(d[r0:r0 + step].to(torch.float64))))
                     for r0 in range(0, d.shape[0], step))


def _residual2(d: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """||d - up @ down||_F^2 in row chunks (no full-size temporary), summed in float64."""
    import torch

    up, down = up.to(d.dtype), down.to(d.dtype)
    step = max(1, RESIDUAL_ELEMENTS // d.shape[1])
    return math.fsum(float(torch.sum(torch.square((d[r0:r0 + step] - up[r0:r0 + step] @ down).to(torch.float64))))
                     for r0 in range(0, d.shape[0], step))


def extract_block(d: torch.Tensor, rule: RankRule, gen: torch.Generator, where: str,
                  store: torch.dtype | None = None) -> Block | None:
    """Truncate one block of a weight change into factors stored as `store` (default float32); None
    when the change is exactly zero. The error is that of the stored factors."""
    import torch

    total = _sumsq(d)
    if not math.isfinite(total):
        raise LoraError(f"{where}: the weight change is not finite (NaN/Inf in a checkpoint, or overflow)")
    if total == 0.0:
        return None
    u, s, vh, k = _low_rank(d, rule, total, gen)
    k = max(k, 1)
    store = store or torch.float32
    root = torch.sqrt(s[:k].to(torch.float64))
    up = (u[:, :k].to(torch.float64) * root).to(store)
    down = (root[:, None] * vh[:k].to(torch.float64)).to(store)
    if rule.rank is not None and k < rule.rank:  # the native rank is per module: pad with zeros
        up = torch.cat([up, up.new_zeros(up.shape[0], rule.rank - k)], 1)
        down = torch.cat([down, down.new_zeros(rule.rank - k, down.shape[1])], 0)
    kept = float(torch.sum(s[:k].double() ** 2))
    return Block(k, total, min(kept, total), _residual2(d, up, down), up, down)


__all__ = ["Block", "extract_block"]
