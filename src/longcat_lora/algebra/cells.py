"""The exact SVD of a cell under resize and combine: planned before writing, realised while writing.

A *cell* is one row range of one module whose weight change is a sum of factored terms,

    dW[rows] = sum_i factor_i * up_i @ down_i,

(one term per up block for resize, one per input for combine). Its exact SVD comes from the stacked
factors [f_1 up_1 | f_2 up_2 | ...] @ [down_1; down_2; ...] through `factored_svd`'s orthogonalisation,
never from the product. Work is done in two passes so memory stays at one module:

1. `plan_cell` (before writing, because the file header needs every shape): the singular values, the
   rank the rule picks, and the two small r x k transforms that turn the stacked factors into the
   leading singular vectors (U = up_stack @ X, V = down_stack.T @ Y).
2. `realise` (while the writer streams the module): the output factors up' = U sqrt(S), down' =
   sqrt(S) Vh rounded once to the output dtype, and the TRUE error of what is stored,
   ||dW - up' @ down'||_F, computed from the factors without cancellation (see `realise`).

Arithmetic is numpy (float32 thin products for 16-bit outputs, float64 otherwise; the small r x r work in
float64): resize and combine never import torch, whose start-up alone costs more than the arithmetic of
a full-size file, and they run one BLAS thread per worker (`single_threaded`).

Outputs carry scale 1 (alpha_scale 1, alpha = rank): the singular values are split symmetrically between
the two factors, so both have the same magnitude whatever the input's alpha.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model.adapter import Naming
from ..model.sources import Source
from ..errors import NAME_ONLY, LoraError, Param
from ..io.dtypes import FLOAT_MAX, decode, rounded
from ..threads import single_threaded
from .lowrank import RankRule, gram_cholesky, norm2, svd_of_product


@dataclass
class Term:
    """factor * up @ down on a cell's rows."""

    up: Source  # [rows, r]
    down: Source  # [r, in]
    factor: float


@dataclass
class Cell:
    rows: tuple[int, int]
    terms: list[Term]

    @property
    def rank(self) -> int:
        return sum(t.down.shape[0] for t in self.terms)


@dataclass
class CellPlan:
    """What the SVD of a cell gave: all singular values, the chosen and stored rank, the transforms.

    A plan made before writing (`plan_cell`) has everything; a *deferred* plan (fixed rank, where the
    stored rank is known from the shapes alone) only has `stored` until `realise` fills it in, so the
    factors are read once."""

    s: np.ndarray | None  # float64, descending (None while deferred)
    k: int  # chosen by the rule (0 for a zero change)
    stored: int  # the rank written: max(k, 1), or min(rank, q) for a fixed rank
    x: np.ndarray | None  # U = up_stack @ x   (None: recompute by QR, ill-conditioned factors)
    y: np.ndarray | None  # V = down_stack.T @ y
    rule: RankRule | None = None  # set while deferred

    @property
    def total(self) -> float:
        assert self.s is not None
        return float((self.s * self.s).sum())

    @property
    def kept(self) -> float:
        assert self.s is not None
        return float((self.s[:self.k] ** 2).sum())


@dataclass
class ModulePlan:
    name: str
    out_features: int
    in_features: int
    naming: Naming
    cells: list[Cell]
    rank_before: int
    plans: list[CellPlan] | None = None  # None: exact (no truncation), parts written as they are


def work_dtype(dtype: str, cell: Cell | None = None) -> np.dtype:
    """The precision of the thin (m x r) products for an output dtype: float32 where the output is a
    16-bit float (its rounding, ~1e-3 relative, dwarfs float32's ~1e-7, and float32 products run twice as
    fast) and no factor of the cell is float64 (whose values float32 may not hold), float64 otherwise. The
    small r x r work (Cholesky, core decomposition, the error sums) is always float64."""
    wide = cell is not None and any("F64" in (t.up.dtype, t.down.dtype) for t in cell.terms)
    return np.dtype(np.float32) if dtype in ("BF16", "F16") and not wide else np.dtype(np.float64)


# The Cholesky route is taken only for factors whose condition number (estimated) is at most this, per
# working dtype: a Gram matrix's rounding (~1e-7 relative in float32, ~1e-16 in float64) grows by the
# square of it in the small directions, so float32 stays near 1e-5 and float64 near 1e-6, inside the
# 1e-4 the reported errors are held to; other cells are redone by QR in float64.
MAX_COND = {np.dtype(np.float32): 10.0, np.dtype(np.float64): 1e5}
# a float32 Gram whose diagonal leaves this range has lost precision to underflow (or is near overflow)
F32_GRAM_RANGE = (1e-30, 1e30)


class Workspace:
    """Reused buffers for the stacked factors: one allocation for the whole run instead of two fresh
    m x r matrices per cell (which fragment the heap and fault in new pages every time)."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, np.dtype], np.ndarray] = {}

    def take(self, name: str, rows: int, cols: int, dtype: np.dtype) -> np.ndarray:
        buf = self.bufs.get((name, dtype))
        if buf is None or buf.size < rows * cols:
            buf = self.bufs[(name, dtype)] = np.empty(rows * cols, dtype=dtype)
        return buf[:rows * cols].reshape(rows, cols)


def stacked(cell: Cell, ws: Workspace, work: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(up_stack [rows, R], down_stack [R, in]) in `work` dtype with each term's factor folded into its up.

    The results live in `ws` and are valid until its next use. Not checked for Inf/NaN here: `plan_cell`
    does it through the Gram diagonals it computes anyway (a column with Inf/NaN has a non-finite norm)."""
    h = cell.rows[1] - cell.rows[0]
    n = cell.terms[0].down.shape[1]
    a = ws.take("up", h, cell.rank, work)
    b = ws.take("down", cell.rank, n, work)
    c = 0
    with np.errstate(over="ignore", invalid="ignore"):  # Inf/NaN are refused from the Gram diagonals
        for t in cell.terms:
            r = t.down.shape[0]
            decode(t.up.raw(), t.up.dtype, a[:, c:c + r])
            if t.factor != 1.0:
                a[:, c:c + r] *= t.factor
            decode(t.down.raw(), t.down.dtype, b[c:c + r])
            c += r
    return a, b


def check_finite(a: np.ndarray, b: np.ndarray, where: str) -> None:
    """LoraError when the stacked factors hold Inf/NaN (after strength x scale)."""
    if not (bool(np.isfinite(a).all()) and bool(np.isfinite(b).all())):
        raise LoraError(f"{where}: non-finite values (NaN/Inf) in its LoRA weights (or strength x scale)")


def _cholesky_pair(a: np.ndarray, b: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(Ra, Rb), float64, with a = Qa Ra and b.T = Qb Rb (Qa, Qb orthonormal, never formed), from the Gram
    matrices computed in a's dtype; None when either is not positive definite there or its diagonal
    left the range float32 keeps precise (the caller takes the QR route). Refuses Inf/NaN in the factors
    (found through the Gram diagonals, or a full scan if those overflow)."""
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        ga = a.T @ a
        gb = b @ b.T
    da, db = np.diagonal(ga), np.diagonal(gb)
    if not (bool(np.isfinite(da).all()) and bool(np.isfinite(db).all())):
        check_finite(a, b, where)
        return None  # finite factors whose squares overflow: the QR route
    if a.dtype == np.float32 and da.size and db.size:
        lo, hi = F32_GRAM_RANGE
        if not (lo < float(da.min()) and float(da.max()) < hi and lo < float(db.min()) and float(db.max()) < hi):
            return None
    ra = gram_cholesky(ga)
    rb = gram_cholesky(gb) if ra is not None else None
    return None if rb is None else (ra, rb)


def _conditioned(r: np.ndarray, r_inv_q: np.ndarray, limit: float) -> bool:
    """Whether cond(R) = ||R||_2 ||R^-1||_2 <= limit, given R^-1 Q for some orthogonal Q (which has
    R^-1's singular values). R's diagonal alone cannot tell: a unit-diagonal triangle can have cond 1e4."""
    return norm2(r) * norm2(r_inv_q) <= limit


def core_svd(core: np.ndarray, keep: int, fast: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Uc [r, keep], s [r] descending, Vc [r, keep]): the singular values of the square core and its
    leading `keep` singular vectors.

    `fast` (16-bit outputs) takes the eigendecomposition of core @ core.T (half the cost of an SVD):
    s^2 then carries an absolute error of ~1e-14 s_max^2, which moves a relative error of 1e-5 or more by
    under 1e-4 of itself and is far below the 16-bit rounding every such output carries. Vc = core.T Uc /
    s, so U S Vc^T is exactly the projection of the core on the kept left vectors, as the error formula
    of `realise` needs (directions with s = 0 get Vc = 0: they carry nothing)."""
    if not fast:
        uc, s, vch = np.linalg.svd(core)
        return uc[:, :keep], s, vch[:keep].T
    w, q = np.linalg.eigh(core @ core.T)
    s = np.sqrt(np.maximum(w[::-1], 0.0))
    uc = np.ascontiguousarray(q[:, ::-1][:, :keep])
    sk = s[:keep]
    vc = np.divide(core.T @ uc, sk, out=np.zeros((core.shape[1], keep)), where=sk > 0)
    return uc, s, vc


def fixed_stored(cell: Cell, rule: RankRule) -> int | None:
    """The rank a fixed-rank rule stores for a cell, known from the shapes alone (None for other rules)."""
    if rule.rank is None:
        return None
    n = cell.terms[0].down.shape[1]
    return min(rule.rank, cell.rows[1] - cell.rows[0], cell.rank, n)


def plan_cell(cell: Cell, rule: RankRule, ws: Workspace, where: str, work: np.dtype,
              stored: int | None = None, loaded: tuple[np.ndarray, np.ndarray] | None = None) -> CellPlan:
    """The exact singular values of a cell's change, the rank the rule picks, and the transforms to the
    leading singular vectors (`stored` of them: max(k, 1) unless given). The thin products run in `work`;
    a cell whose factors are ill conditioned for it gets no transforms (`realise` redoes it by QR in float64)."""
    a, b = loaded if loaded is not None else stacked(cell, ws, work)
    m, r = a.shape
    n = b.shape[1]
    if r <= min(m, n):
        got = _cholesky_pair(a, b, where)
        if got is not None:  # positive definite: Cholesky factors, Q = a @ R^-1 never formed
            ra, rb = got
            uc, s, vc = core_svd(ra @ rb.T, r, work == np.float32)
            k = rule.choose(s)
            keep = max(k, 1) if stored is None else stored
            xa = np.linalg.solve(ra, uc)  # R^-1 of an orthogonal matrix: its first columns are the transform
            yb = np.linalg.solve(rb, np.concatenate([vc[:, :keep], uc], 1))
            if _conditioned(ra, xa, MAX_COND[work]) and _conditioned(rb, yb[:, keep:], MAX_COND[work]):
                return CellPlan(s, k, keep, np.ascontiguousarray(xa[:, :keep]), np.ascontiguousarray(yb[:, :keep]))
    else:
        check_finite(a, b, where)
    _, s, _ = svd_of_product(a, b, k=0)
    k = rule.choose(s)
    return CellPlan(s, k, max(k, 1) if stored is None else stored, None, None)


def _tail_sq(s: np.ndarray, k: int) -> float:
    """sum(s[k:]^2), summed from the small end."""
    t = s[k:]
    return float((t * t)[::-1].sum()) if t.size else 0.0


def _dot(p1: np.ndarray, q1: np.ndarray) -> float:
    """<A, B> = tr(A^T B) for A = x1 @ y1, B = x2 @ y2, given p1 = x1^T x2 and q1 = y1 @ y2^T (float64)."""
    return float((p1 * q1).sum())


def _mm64(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x @ y in their dtype (a thin product over the long dimension), the small result in float64."""
    return (x @ y).astype(np.float64)


def realise(cell: Cell, plan: CellPlan, dtype: str, where: str, ws: Workspace
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """(up' [rows, stored], down' [stored, in]) as `dtype` bytes (uint8 [rows, cols * itemsize]) and the
    true ||dW - up' down'||_F^2.

    With U S Vh the truncated SVD and dA, dB the rounding of the stored factors (up' = U sqrt(S) + dA,
    down' = sqrt(S) Vh + dB), the error is E = T - R with T = dW - U S Vh (the discarded tail, ||T||^2 =
    the sum of the discarded s^2) and R = dA down' + U sqrt(S) dB (the rounding). T is orthogonal to U
    and to Vh, so <T, R> = <T, dA dB> and
        ||E||^2 = ||T||^2 + ||R||^2 - 2 <dW - U S Vh, dA dB>,
    every term from small Gram matrices of thin factors: nothing large cancels, so the result is
    accurate even when the error is tiny (full rank, rounding only).
    """
    work = work_dtype(dtype, cell)
    a, b = stacked(cell, ws, work)
    if plan.rule is not None:  # deferred (fixed rank): plan now, from the factors already loaded
        done = plan_cell(cell, plan.rule, ws, where, work, plan.stored, (a, b))
        plan.s, plan.k, plan.x, plan.y, plan.rule = done.s, done.k, done.x, done.y, None
    assert plan.s is not None
    k = plan.stored
    if plan.x is not None:
        assert plan.y is not None
        u = a @ plan.x.astype(work)
        vh = plan.y.T.astype(work) @ b  # [k, n]: rows, as stored
        s = plan.s[:k]
    else:  # ill conditioned for the Gram route: QR, all in float64
        a, b = a.astype(np.float64), b.astype(np.float64)
        u, s, vh = svd_of_product(a, b, k=k)
        s = s[:k]
    root = np.sqrt(s)
    rootw = root.astype(u.dtype)
    upw = u * rootw
    downw = vh * rootw[:, None]
    # the factors' entries are at most sqrt(s_max) in size (U and V have unit columns): they can only
    # overflow the output dtype if sqrt(s_max) does, so one comparison replaces a scan of every value
    if k and not float(root[0]) < FLOAT_MAX[dtype] / 2:
        raise LoraError(f"{where}: the new factors overflow {dtype} (choose a wider ", Param("dtype", NAME_ONLY), ")")
    up, up_st = rounded(upw, dtype)
    down, down_st = rounded(downw, dtype)
    err2 = _tail_sq(plan.s, k)
    if dtype != ("F64" if u.dtype == np.float64 else "F32"):  # the stored factors are rounded
        da = up_st - upw  # [m, k]
        db = down_st - downw  # [k, n]
        gdu = _mm64(da.T, u)
        gbd = _mm64(down_st, db.T)
        rs = root[:, None] * _mm64(db, db.T) * root[None, :]  # (sqrt(S) dB)(sqrt(S) dB)^T
        r2 = (_dot(_mm64(da.T, da), _mm64(down_st, down_st.T)) + _dot(_mm64(u.T, u), rs)
              + 2.0 * _dot(gdu * root[None, :], gbd))
        # <dW - U S Vh, dA dB>
        cross = _dot(_mm64(a.T, da), _mm64(b, db.T)) - _dot(s[:, None] * gdu.T, _mm64(vh, db.T))
        err2 = err2 + r2 - 2.0 * cross
    return up, down, max(err2, 0.0)


__all__ = ["Cell", "CellPlan", "ModulePlan", "Term", "Workspace", "core_svd", "fixed_stored", "plan_cell",
           "realise", "single_threaded", "work_dtype"]
