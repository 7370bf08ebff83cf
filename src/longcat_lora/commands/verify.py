"""`verify`: do two LoRAs (any formats) make the same weight change on every base weight?

The comparison is exact arithmetic on the stored values, in float64: per module and per row segment
the difference dA - dB is formed directly when it is small, and otherwise through its low-rank factors
(||U V||_F^2 = sum((U^T U) * (V V^T))), with terms sharing an identical down matrix combined first so
that identical weight changes compare as exactly equal. Nothing of full weight size is built per module
beyond a bounded row slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..model.adapter import LoraAdapter, LoraModule, Naming

DENSE_LIMIT = 1 << 22  # elements of a row segment formed densely


@dataclass
class Comparison:
    worst: float = 0.0  # worst relative Frobenius error over modules
    worst_module: str | None = None
    errors: dict[str, float] = field(default_factory=dict)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # modules of no LongCat model (compared by name as read)

    def equivalent(self, rtol: float) -> bool:
        return not math.isnan(self.worst) and self.worst <= rtol


def _segments(mods: list[LoraModule]) -> list[tuple[int, int]]:
    cuts = sorted({0, *(r for m in mods for p in m.parts for r in p.rows), max(m.out_features for m in mods)})
    return list(zip(cuts, cuts[1:]))


def module_error(a: LoraModule | None, b: LoraModule | None) -> float:
    """Relative Frobenius error ||dA - dB|| / max(||dA||, ||dB||) (a missing module counts as zero)."""
    mods = [m for m in (a, b) if m is not None]
    if a is not None and b is not None and (a.out_features, a.in_features) != (b.out_features, b.in_features):
        return math.inf
    cache: dict[int, torch.Tensor] = {}

    def load(src) -> torch.Tensor:
        if id(src) not in cache:
            cache[id(src)] = src.load().to(torch.float64)
        return cache[id(src)]

    diff2 = na2 = nb2 = 0.0
    for lo, hi in _segments(mods):
        terms: dict[str, list] = {"a": [], "b": []}
        for side, m in (("a", a), ("b", b)):
            for p in (m.parts if m else []):
                if p.rows[0] < hi and p.rows[1] > lo:
                    up = load(p.up)[lo - p.rows[0]:hi - p.rows[0]] * p.scale
                    terms[side].append((up, load(p.down)))
        na2 += _norm2(terms["a"])
        nb2 += _norm2(terms["b"])
        diff2 += _norm2(terms["a"] + [(-u, v) for u, v in terms["b"]])
    denom = math.sqrt(max(na2, nb2))
    if any(math.isnan(x) or math.isinf(x) for x in (diff2, na2, nb2)):
        return math.nan
    return 0.0 if denom == 0.0 else math.sqrt(max(diff2, 0.0)) / denom


def _norm2(terms: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """||sum_i U_i V_i||_F^2, exactly cancelling terms that share a down matrix V."""
    merged: list[tuple[torch.Tensor, torch.Tensor]] = []
    for u, v in terms:
        for j, (mu, mv) in enumerate(merged):
            if mv.shape == v.shape and torch.equal(mv, v):
                merged[j] = (mu + u, mv)
                break
        else:
            merged.append((u, v))
    if not merged:
        return 0.0
    rows, cols = merged[0][0].shape[0], merged[0][1].shape[1]
    if rows * cols <= DENSE_LIMIT:
        return float(sum(u @ v for u, v in merged).square().sum())
    U = torch.cat([u for u, _ in merged], 1)
    V = torch.cat([v for _, v in merged], 0)
    return float(((U.T @ U) * (V @ V.T)).sum())


def compare(a: LoraAdapter, b: LoraAdapter) -> Comparison:
    """Compare every module's weight change; modules are matched by LongCat name."""
    key = lambda m: (m.naming, m.name)  # noqa: E731
    ma = {key(m): m for m in a.modules.values()}
    mb = {key(m): m for m in b.modules.values()}
    c = Comparison()
    c.only_a = sorted(n for _, n in ma.keys() - mb.keys())
    c.only_b = sorted(n for _, n in mb.keys() - ma.keys())
    c.unknown = sorted({n for nm, n in ma.keys() | mb.keys() if nm is Naming.UNKNOWN})
    for k in sorted(ma.keys() | mb.keys()):
        c.errors[k[1]] = module_error(ma.get(k), mb.get(k))
    if c.errors:
        c.worst_module = max(c.errors, key=lambda n: math.inf if math.isnan(c.errors[n]) else c.errors[n])
        c.worst = c.errors[c.worst_module]
    return c
