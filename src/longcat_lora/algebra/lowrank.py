"""Low-rank linear algebra shared by resize, combine and extract: rank rules, SVDs, the report.

The factored SVD works in numpy float64 (`svd_of_product`; `factored_svd` is its torch face) and never
builds an m x n weight change from factors: it orthogonalises the two thin factors and takes the SVD of
the small r x r core, which is the exact SVD of `up @ down` (to float64 rounding) at a cost linear in
m + n. `dense_svd` (for extract, whose changes are dense and may live on a GPU) works on torch tensors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import NAME_ONLY, LoraError, Param

if TYPE_CHECKING:
    import torch


# ---------------------------------------------------------------- rank rules


@dataclass(frozen=True)
class RankRule:
    """How many singular values to keep: exactly one of a fixed rank, an energy share, a maximum error.

    - `rank`: keep min(rank, len(s)) values.
    - `energy` F in (0, 1]: the smallest k with sum(s[:k]^2) / total >= F.
    - `max_error` E in [0, 1): the smallest k with sqrt(sum(s[k:]^2) / total) <= E (relative Frobenius error).

    `total` is sum(s^2) unless the caller knows the full squared norm of the change (extract, where only
    the leading singular values are computed). A change that is exactly zero gets rank 0; callers that
    write files store at least rank 1 (zeros), so every module stays present.
    """

    rank: int | None = None
    energy: float | None = None
    max_error: float | None = None

    @classmethod
    def parse(cls, rank: int | None = None, energy: float | None = None,
              max_error: float | None = None) -> RankRule:
        """Validate the user's choice; LoraError naming the parameter when it is missing or out of range."""
        given = [n for n, v in (("rank", rank), ("energy", energy), ("max_error", max_error)) if v is not None]
        if len(given) != 1:
            raise LoraError("give exactly one of rank, energy, max_error"
                            + (f" (got {', '.join(given)})" if given else ""))
        if rank is not None:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise LoraError(Param("rank", NAME_ONLY), f" must be an integer >= 1, got {rank!r}")
        if energy is not None:
            if not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
                raise LoraError(Param("energy", NAME_ONLY), f" must be in (0, 1], got {energy!r}")
        if max_error is not None:
            if not (isinstance(max_error, (int, float)) and 0.0 <= max_error < 1.0):
                raise LoraError(Param("max_error", NAME_ONLY), f" must be in [0, 1), got {max_error!r}")
        return cls(rank=rank, energy=None if energy is None else float(energy),
                   max_error=None if max_error is None else float(max_error))

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank}"
        if self.energy is not None:
            return f"energy >= {self.energy:g}"
        return f"error <= {self.max_error:g}"

    def choose(self, s: np.ndarray | torch.Tensor, total: float | None = None) -> int:
        """The rank to keep for singular values `s` (descending, >= 0); see the class docstring."""
        s = _np64(s).reshape(-1)
        q = s.size
        if self.rank is not None:
            return 0 if q == 0 or not bool((s > 0).any()) else min(self.rank, q)
        sq = s * s
        kept = np.cumsum(sq)  # kept[k-1] = sum(s[:k]^2)
        # the total as the same running sum when not given: energy 1 then stops at the last nonzero value
        # instead of at whichever end the rounding of two different summations picks
        tot = float(kept[-1]) if total is None and q else float(total or 0.0)
        if q == 0 or tot <= 0.0:
            return 0
        if self.energy is not None:
            ok = np.flatnonzero(kept >= self.energy * tot)
            return int(ok[0]) + 1 if ok.size else q
        # tail[k] = sum(s[k:]^2), summed from the small end so small tails are accurate
        tail = np.cumsum(sq[::-1])[::-1]  # keeping all q values (tail 0) is the fallback below
        if total is not None:
            tail = tail + max(tot - float(sq.sum()), 0.0)  # energy never captured by s
        ok = np.flatnonzero(tail <= (self.max_error ** 2) * tot)  # type: ignore[operator]
        return int(ok[0]) if ok.size else q


def _np64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A float64 numpy array of a numpy array or a torch tensor (on any device)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------- SVDs


def _orth(a: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(Q or None, R) with a = Q R, Q orthonormal columns, R upper triangular [r, r] (a is [m, r], float64).

    Cholesky of the Gram matrix when a's condition number is at most 1e5 (the Gram's rounding then stays
    near 1e-6 in the small directions; Q is implied: a @ R^-1, never formed here: returns None),
    Householder QR otherwise (returns Q).
    """
    r = a.shape[1]
    if r and a.shape[0] >= r:
        c = gram_cholesky(a.T @ a)
        if c is not None and norm2(c) * norm2(np.linalg.inv(c)) <= 1e5:
            return None, c
    q, rr = np.linalg.qr(a, mode="reduced")
    return q, rr


def norm2(m: np.ndarray, iterations: int = 8) -> float:
    """||m||_2 by power iteration on m^T m from a fixed random start (from below: a few percent low at
    worst, for a clustered top of the spectrum); enough to tell a condition number of 10 from 1e4."""
    v = np.random.default_rng(m.shape[1]).standard_normal(m.shape[1])
    for _ in range(iterations):
        w = m.T @ (m @ v)
        n = float(np.linalg.norm(w))
        if not n > 0.0:
            return 0.0
        v = w / n
    return float(np.linalg.norm(m @ v))


def gram_cholesky(g: np.ndarray) -> np.ndarray | None:
    """R (upper triangular, float64) with R^T R = g for a Gram matrix g = a^T a, or None when g is not
    positive definite (or holds NaN). How well conditioned R is, is the caller's question (`norm2`)."""
    try:
        low = np.linalg.cholesky(np.asarray(g, dtype=np.float64))
    except np.linalg.LinAlgError:
        return None
    if not float(np.diagonal(low).min()) > 0.0:  # also refuses NaN
        return None
    return np.ascontiguousarray(low.T)


def _apply_left(a: np.ndarray, q: np.ndarray | None, r: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Q @ x where a = Q R (Q given, or implied as a @ R^-1)."""
    return q @ x if q is not None else a @ np.linalg.solve(r, x)


def svd_of_product(up: np.ndarray, down: np.ndarray, k: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`factored_svd` on numpy arrays (float64 throughout): the exact SVD of up @ down from the factors."""
    a = np.asarray(up, dtype=np.float64)
    b = np.asarray(down, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise LoraError(f"factored_svd: up {list(a.shape)} and down {list(b.shape)} do not multiply")
    m, r = a.shape
    n = b.shape[1]
    if r > m:  # more columns than rows: reduce through up (exact), a = ra.T @ qa.T
        qa, ra = np.linalg.qr(a.T, mode="reduced")
        a, b = ra.T, qa.T @ b
    if a.shape[1] > n:  # likewise through down, b = rb.T @ qb.T
        qb, rb = np.linalg.qr(b.T, mode="reduced")
        a, b = a @ rb.T, qb.T
    r = a.shape[1]
    qa, ra = _orth(a)
    qb, rb = _orth(b.T)  # b = rb.T @ qb.T
    uc, s, vch = np.linalg.svd(ra @ rb.T, full_matrices=False)
    q = min(m, r, n)
    s = s[:q]
    kk = q if k is None else max(0, min(k, q))
    u = _apply_left(a, qa, ra, uc[:, :kk])
    v = _apply_left(b.T, qb, rb, vch[:kk].T)
    return u, s, np.ascontiguousarray(v.T)


def factored_svd(up: torch.Tensor, down: torch.Tensor, k: int | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact SVD of up @ down ([m, r] @ [r, n]) through the factors, in float64.

    Returns (U [m, q], S [q], Vh [q, n]) with q = min(m, r, n), S descending; with `k`, only the leading
    k singular vectors are formed (S is always complete, so rank rules can use it). The m x n product
    is never built: the factors are orthogonalised (Cholesky of their Gram matrices, or QR when those
    are ill conditioned) and the small r x r core is decomposed, at a cost O((m + n) r^2).

    >>> u, s, vh = factored_svd(torch.ones(3, 1), torch.ones(1, 2))
    >>> round(float(s[0]) ** 2, 9)  # ||ones(3, 2)||_F^2
    6.0
    """
    import torch

    u, s, vh = svd_of_product(_np64(up), _np64(down), k)
    device = up.device if isinstance(up, torch.Tensor) else None
    return tuple(torch.from_numpy(x).to(device) for x in (u, s, vh))  # type: ignore[return-value]


def dense_svd(delta: torch.Tensor, max_rank: int, *, oversample: int = 16, power_iters: int = 2,
              exact_below: int = 1024, generator: torch.Generator | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading `max_rank` singular triplets of a dense matrix [m, n].

    Exact (`torch.linalg.svd`) when min(m, n) <= exact_below or the sketch would not be much smaller
    than the matrix; otherwise a randomized range finder (Halko, Martinsson & Tropp 2011, alg. 4.4)
    with `oversample` extra columns and `power_iters` re-orthonormalised power iterations. Runs in
    delta's dtype if that is float64, else float32 (the power iterations keep float32 accurate to
    ~1e-6 of the leading singular value, far below what a LoRA stores); results are float64.
    Returns (U [m, k], S [k], Vh [k, n]) with k = min(max_rank, m, n).
    """
    import torch

    if delta.dim() != 2:
        raise LoraError(f"dense_svd: expected a matrix, got shape {list(delta.shape)}")
    m, n = delta.shape
    k = max(0, min(int(max_rank), m, n))
    work = torch.float64 if delta.dtype == torch.float64 else torch.float32
    a = delta.to(work)
    ell = k + oversample
    if min(m, n) <= exact_below or 2 * ell >= min(m, n):
        u, s, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    transpose = m < n  # sketch the longer side's range: Y is [max, ell]
    if transpose:
        a = a.T
    omega = torch.randn(a.shape[1], ell, dtype=work, device=a.device, generator=generator)
    q, _ = torch.linalg.qr(a @ omega, mode="reduced")
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.T @ q, mode="reduced")
        q, _ = torch.linalg.qr(a @ z, mode="reduced")
    bsmall = (q.T @ a).to(torch.float64)  # [ell, n']
    ub, s, vh = torch.linalg.svd(bsmall, full_matrices=False)
    u = q.to(torch.float64) @ ub[:, :k]
    s, vh = s[:k], vh[:k]
    if transpose:
        return vh.T.contiguous(), s, u.T.contiguous()
    return u, s, vh


# ---------------------------------------------------------------- the report


@dataclass
class ModuleReport:
    """One module: ranks (per up block, as the native format counts), the true relative Frobenius error
    ||dW_out - dW_in||_F / ||dW_in||_F of what was written, and the share of ||dW_in||_F^2 kept."""

    module: str
    rank_before: int
    rank_after: int
    rel_error: float
    retained: float
    part_ranks: list[int] = field(default_factory=list)  # chosen rank of each up block (before padding)


@dataclass
class Report:
    """What resize / combine / extract did, as data (`to_dict()`) or text (`format()`)."""

    operation: str
    rule: str
    modules: list[ModuleReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    output: str | None = None
    format_out: str | None = None
    skipped: list[str] = field(default_factory=list)  # modules left out, with reason in `notes`
    notes: list[str] = field(default_factory=list)

    @property
    def worst_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    @property
    def worst_module(self) -> str | None:
        return max(self.modules, key=lambda m: m.rel_error).module if self.modules else None

    @property
    def mean_error(self) -> float:
        return math.fsum(m.rel_error for m in self.modules) / len(self.modules) if self.modules else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(worst_error=self.worst_error, worst_module=self.worst_module, mean_error=self.mean_error)
        return d

    def format(self, per_module: bool = True) -> str:
        lines = []
        if per_module and self.modules:
            w = max(len(m.module) for m in self.modules)
            lines.append(f"{'module':<{w}}  rank before -> after  rel. error  retained")
            for m in self.modules:
                lines.append(f"{m.module:<{w}}  {m.rank_before:>11} -> {m.rank_after:<5}  "
                             f"{m.rel_error:10.3e}  {m.retained:8.4%}")
        ratio = (self.bytes_after / self.bytes_before) if self.bytes_before else float("nan")
        lines.append(f"{self.operation} ({self.rule}): {len(self.modules)} modules; parameters "
                     f"{self.params_before:,} -> {self.params_after:,}; file {_size(self.bytes_before)} -> "
                     f"{_size(self.bytes_after)} ({ratio:.1%})")
        lines.append(f"relative Frobenius error: worst {self.worst_error:.3e}"
                     + (f" ({self.worst_module})" if self.worst_module else "") + f", mean {self.mean_error:.3e}")
        for s in self.skipped:
            lines.append(f"skipped: {s}")
        lines.extend(self.notes)
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


__all__ = ["ModuleReport", "RankRule", "Report", "dense_svd", "factored_svd", "gram_cholesky", "svd_of_product"]
