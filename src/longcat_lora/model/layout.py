"""Layouts: a module's parts <-> one standard LoRA layer <-> LongCat's native fused up blocks.

Every function here is exact: tensors are reused untouched where they fit, zero-padded or placed
block-diagonally where they do not, and differing scales are folded into up matrices (one float32
rounding at most) only when a single scale must serve several parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..io.dtypes import ITEMSIZE
from .adapter import LoraModule, Part
from .sources import Source, Stored, cat_rows, folded, placed, promote, zeros


def common_scale(parts: list[Part]) -> float:
    """The scale the parts share: the first nonzero one (0 if all are 0)."""
    for p in parts:
        if p.scale != 0.0:
            return p.scale
    return 0.0


@dataclass
class StdLayer:
    """One standard LoRA layer: dW = scale * b @ a."""

    a: Source  # [R, in]
    b: Source  # [out, R]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def standard_layer(m: LoraModule, lo: int, hi: int) -> StdLayer | None:
    """The single standard LoRA giving exactly module m's weight change on rows lo:hi, or None.

    One part covering the rows keeps its tensors untouched (bit-exact); several parts become one LoRA of
    summed rank with their up matrices placed block-diagonally, different scales folded into the ups.
    """
    pieces = [(p, max(lo, p.rows[0]), min(hi, p.rows[1])) for p in m.parts
              if p.rows[0] < hi and p.rows[1] > lo]
    if not pieces:
        return None
    if len(pieces) == 1:
        p, r0, r1 = pieces[0]
        if (r0, r1) == (lo, hi):
            return StdLayer(p.down, p.up.rows(r0 - p.rows[0], r1 - p.rows[0]), p.scale)
    scale = common_scale([p for p, _, _ in pieces])
    downs, blocks, col = [], [], 0
    for p, r0, r1 in pieces:
        up = p.up.rows(r0 - p.rows[0], r1 - p.rows[0])
        if p.scale != scale:
            up = folded(up, p.scale / scale if scale else 0.0)
        downs.append(p.down)
        blocks.append((r0 - lo, col, up))
        col += p.rank
    return StdLayer(cat_rows(downs), placed((hi - lo, col), blocks), scale)


def split_diagonal(part: Part, hint: int) -> list[Part]:
    """A standard layer's part split into the diagonal blocks of its up matrix.

    A block-diagonal up (exactly zero off its diagonal blocks) is split into its blocks: the finest equal
    split whose diagonal blocks are all nonzero, or `hint` blocks (the module's native chunking) even
    where some are zero. So a zero-initialised up stays whole. Otherwise the part stays as it is.
    Reads every value of the up matrix, unchecked (a layout detection: the values are checked where they
    are read again to be written), so `LoraModule` runs it on first use of its parts, not at load.
    """
    a, b = part.down, part.up
    assert isinstance(b, Stored), "split_diagonal takes a standard layer as stored"
    out, R = b.shape
    g = _block_split(b, hint)
    if g == 1:
        return [part]
    r, h, row0 = R // g, out // g, part.rows[0]
    return [Part((row0 + j * h, row0 + (j + 1) * h), a.rows(j * r, (j + 1) * r),
                 b.region(j * h, (j + 1) * h, j * r, (j + 1) * r), part.scale) for j in range(g)]


def _block_split(b: Stored, hint: int) -> int:
    """How many equal diagonal blocks b splits into exactly (1 if none)."""
    out, R = b.shape
    n = math.gcd(out, R)
    cands = [g for g in range(n, 1, -1) if n % g == 0]
    if not cands:
        return 1
    k = ITEMSIZE[b.dtype]
    u = np.ascontiguousarray(b.fetch(0, out, 0, R)).view({2: np.uint16, 4: np.uint32, 8: np.uint64}[k]).reshape(out, R)
    nonzero = (u & np.array((1 << (8 * k - 1)) - 1, dtype=u.dtype)) != 0  # -0.0 counts as zero
    for g in cands:
        r, h = R // g, out // g
        for j in range(g):
            rows = nonzero[j * h:(j + 1) * h]
            if rows[:, :j * r].any() or rows[:, (j + 1) * r:].any():
                break
            if g != hint and not rows[:, j * r:(j + 1) * r].any():
                break
        else:
            return g
    return 1


def native_blocks(m: LoraModule, chunks_hint: int) -> tuple[Source, list[Source], float]:
    """(down, up blocks, alpha_scale) in LongCat's native form, exact for any parts.

    Parts on an equal row grid (the module's native chunking, or as many cells as parts) become up
    blocks; ranks that differ are zero-padded, missing cells are zero blocks, differing scales are folded
    into the ups. Anything else becomes a single up block (one standard LoRA).
    """
    parts = sorted(m.parts, key=lambda p: p.rows)
    out = m.out_features
    for g in dict.fromkeys([chunks_hint, len(parts)]):
        if g < 1 or out % g:
            continue
        h = out // g
        cells: dict[int, Part] = {}
        for p in parts:
            k = p.rows[0] // h
            if p.rows != (k * h, (k + 1) * h) or k in cells:
                break
            cells[k] = p
        else:
            scale = common_scale(parts)
            r = max(p.rank for p in parts)
            if len(cells) == g and all(p.rank == r and p.scale == scale for p in parts):
                return cat_rows([p.down for p in parts]), [p.up for p in parts], scale
            downs, ups = [], []
            down_dtype = promote(*(p.down.dtype for p in parts))
            for k in range(g):
                p = cells.get(k)
                if p is None:
                    downs.append(zeros((r, m.in_features), down_dtype))
                    ups.append(zeros((h, r), promote(*(q.up.dtype for q in parts))))
                    continue
                up = p.up if p.scale == scale else folded(p.up, p.scale / scale if scale else 0.0)
                downs.append(_pad_rows(p.down, r))
                ups.append(_pad_cols(up, r))
            return cat_rows(downs), ups, scale
    layer = standard_layer(m, 0, out)
    assert layer is not None
    return layer.a, [layer.b], layer.scale


def _pad_rows(s: Source, r: int) -> Source:
    if s.shape[0] == r:
        return s
    return cat_rows([s, zeros((r - s.shape[0], s.shape[1]), s.dtype)])


def _pad_cols(s: Source, r: int) -> Source:
    if s.shape[1] == r:
        return s
    return placed((s.shape[0], r), [(0, 0, s)])
