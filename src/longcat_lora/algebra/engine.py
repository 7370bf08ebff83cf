"""The low-rank engine under resize and combine: cells, their SVD plans, lazy output modules, the report.

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

Outputs carry scale 1 (alpha_scale 1, alpha = rank): the singular values are split symmetrically between
the two factors, so both have the same magnitude whatever the input's alpha.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from contextlib import contextmanager
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..adapter import Computed, LoraAdapter, LoraModule, Part, Source
from ..errors import LoraError
from ..st import FLOATS, SafeFile, torch_dtype
from .lowrank import ModuleReport, RankRule, Report, _orth, factored_svd

if TYPE_CHECKING:  # torch is imported when the arithmetic starts
    import torch

DTYPES = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32", "fp64": "F64"}


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
    """What pass 1 learnt about a cell: all singular values, the chosen and stored rank, the transforms."""

    s: torch.Tensor  # float64, descending
    k: int  # chosen by the rule (0 for a zero change)
    stored: int  # max(k, 1): every module keeps at least one (zero) rank
    x: torch.Tensor | None  # U = up_stack @ x   (None: recompute by QR, ill-conditioned factors)
    y: torch.Tensor | None  # V = down_stack.T @ y

    @property
    def total(self) -> float:
        return float((self.s * self.s).sum())

    @property
    def kept(self) -> float:
        return float((self.s[:self.k] ** 2).sum())


@dataclass
class ModulePlan:
    name: str
    out_features: int
    in_features: int
    naming: str
    cells: list[Cell]
    rank_before: int
    plans: list[CellPlan] | None = None  # None: exact (no truncation), parts written as they are


def stacked(cell: Cell) -> tuple[torch.Tensor, torch.Tensor]:
    """(up_stack [rows, R], down_stack [R, in]) in float64 with each term's factor folded into its up."""
    import torch

    ups = [t.up.load().to(torch.float64) * t.factor for t in cell.terms]
    downs = [t.down.load().to(torch.float64) for t in cell.terms]
    if len(ups) == 1:
        return ups[0], downs[0]
    return torch.cat(ups, 1), torch.cat(downs, 0)


def plan_cell(cell: Cell, rule: RankRule) -> CellPlan:
    """Pass 1 for one cell: exact singular values of its change and the transforms to its singular vectors."""
    import torch

    a, b = stacked(cell)
    m, r = a.shape
    n = b.shape[1]
    if r <= min(m, n):
        qa, ra = _orth(a)
        qb, rb = _orth(b.T)
        if qa is None and qb is None:  # well conditioned: Cholesky factors, Q = a @ R^-1 never formed
            uc, s, vch = torch.linalg.svd(ra @ rb.T)
            k = rule.choose(s)
            stored = max(k, 1)
            x = torch.linalg.solve_triangular(ra, uc[:, :stored].contiguous(), upper=True)
            y = torch.linalg.solve_triangular(rb, vch[:stored].T.contiguous(), upper=True)
            return CellPlan(s, k, stored, x, y)
    _, s, _ = factored_svd(a, b, k=0)
    k = rule.choose(s)
    return CellPlan(s, k, max(k, 1), None, None)


def _tail_sq(s: torch.Tensor, k: int) -> float:
    """sum(s[k:]^2), summed from the small end."""
    import torch

    t = s[k:]
    return float(torch.flip(t * t, [0]).sum()) if t.numel() else 0.0


def realise(cell: Cell, plan: CellPlan, dtype: str, where: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Pass 2: (up' [rows, stored], down' [stored, in]) in `dtype` and the true ||dW - up' down'||_F^2.

    With U S Vh the truncated SVD and dA, dB the rounding of the stored factors (up' = U sqrt(S) + dA,
    down' = sqrt(S) Vh + dB), the error is E = T - R with T = dW - U S Vh (the discarded tail, ||T||^2 =
    sum of the discarded s^2) and R = dA down' + U sqrt(S) dB (the rounding). So
    ||E||^2 = ||T||^2 + ||R||^2 - 2 <T, R>, each term computed from factors (Gram matrices of thin
    matrices): no large terms cancel, so the result is accurate even when the error is tiny.
    """
    import torch

    a, b = stacked(cell)
    k = plan.stored
    if plan.x is not None:
        u = a @ plan.x
        v = b.T @ plan.y
        s = plan.s[:k]
    else:
        u, s, vh = factored_svd(a, b, k=k)
        s, v = s[:k], vh.T
    root = s.sqrt()
    up64 = u * root
    down64 = (v * root).T
    td = torch_dtype(dtype)
    up = up64.to(td).contiguous()
    down = down64.to(td).contiguous()
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise LoraError(f"{where}: the resized factors overflow {dtype} (choose a wider --dtype)")
    err2 = _tail_sq(plan.s, k)
    if td != torch.float64:
        da = up.to(torch.float64) - up64
        db = down.to(torch.float64) - down64
        p = torch.cat([da, u], 1)  # R = p @ q
        q = torch.cat([down.to(torch.float64), root[:, None] * db], 0)
        r2 = float(((p.T @ p) * (q @ q.T)).sum())
        # <T, R> = <a b, R> - <U S Vh, R>
        ab_r = float(((a.T @ p) * (b @ q.T)).sum())
        usv_r = float(((s[:, None] * (p.T @ u).T) * (v.T @ q.T)).sum())
        err2 = err2 + r2 - 2.0 * (ab_r - usv_r)
    return up, down, max(err2, 0.0)


@contextmanager
def single_threaded():
    """Run torch on one thread inside: the work is many small factorisations (r x r SVDs, thin Grams),
    where a thread pool costs more than it gains, and is pathologically slow on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- lazy output modules


class _Realised:
    """Each module's output factors, computed on first use, kept for the last two modules (the writer
    produces the next tensor on a second thread while it writes this one)."""

    def __init__(self, dtype: str, keep: int = 2):
        self.dtype = dtype
        self.keep = keep
        self.cache: OrderedDict[str, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.errors: dict[str, list[float]] = {}
        self.lock = threading.Lock()

    def get(self, mp: ModulePlan) -> list[tuple[torch.Tensor, torch.Tensor]]:
        with self.lock:
            got = self.cache.get(mp.name)
            if got is not None:
                self.cache.move_to_end(mp.name)
                return got
            assert mp.plans is not None
            got, errs = [], []
            with single_threaded():
                for cell, plan in zip(mp.cells, mp.plans):
                    up, down, err2 = realise(cell, plan, self.dtype, f"module {mp.name}")
                    got.append((up, down))
                    errs.append(err2)
            self.errors[mp.name] = errs
            self.cache[mp.name] = got
            while len(self.cache) > self.keep:
                self.cache.popitem(last=False)
            return got


def _raw(t: torch.Tensor) -> np.ndarray:
    import torch

    return t.contiguous().view(torch.uint8).numpy().reshape(t.shape[0], -1)


def _lazy(realised: _Realised, mp: ModulePlan, i: int, which: int, shape: tuple[int, int]) -> Source:
    return Computed(shape, realised.dtype, lambda check: _raw(realised.get(mp)[i][which]))


def lowrank_module(mp: ModulePlan, realised: _Realised) -> LoraModule:
    """The output module of a planned (truncated) module: one part per cell, factors computed on demand."""
    assert mp.plans is not None
    parts = []
    for i, (cell, plan) in enumerate(zip(mp.cells, mp.plans)):
        h = cell.rows[1] - cell.rows[0]
        parts.append(Part(cell.rows, _lazy(realised, mp, i, 1, (plan.stored, mp.in_features)),
                          _lazy(realised, mp, i, 0, (h, plan.stored)), 1.0))
    return LoraModule(mp.name, mp.out_features, mp.in_features, parts, mp.naming)


def plan_modules(mps: list[ModulePlan], rule: RankRule, progress: bool, desc: str) -> None:
    """Pass 1 over every module (in input order), with a progress bar on a terminal."""
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(mps), unit="module", desc=desc, leave=False)
    try:
        with single_threaded():
            for mp in mps:
                mp.plans = [plan_cell(c, rule) for c in mp.cells]
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def output_dtype(requested: str, inputs: Iterable[str]) -> str:
    """The dtype name for the output factors: `keep` = the widest input dtype, else as named."""
    from ..adapter import promote

    if requested not in DTYPES:
        raise LoraError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    named = DTYPES[requested]
    if named is not None:
        return named
    ins = [d for d in inputs if d in FLOATS]
    return promote(*ins) if ins else "F32"


# ---------------------------------------------------------------- sizes and the report


def stored_size(path: str) -> tuple[int, int]:
    """(parameters in 2-D tensors, bytes of the safetensors file) of a LoRA file or PEFT directory."""
    from ..formats import peft

    if os.path.isdir(path):
        found = peft.paths(path)
        if found is None:
            return 0, 0
        path = found[0]
    with SafeFile(path) as sf:
        params = 0
        for key in sf.keys():
            shape = sf.info(key).shape
            if len(shape) == 2:
                params += shape[0] * shape[1]
    return params, os.path.getsize(path)


def module_reports(mps: list[ModulePlan], realised: _Realised | None, dw_sq: Callable[[ModulePlan], float] | None
                   ) -> list[ModuleReport]:
    """Per-module report rows. Truncated modules: the true error from `realised` (computing any module
    a writer did not ask for). Exact modules: error 0, everything retained."""
    rows = []
    for mp in mps:
        if mp.plans is None:
            rows.append(ModuleReport(mp.name, mp.rank_before, max(c.rank for c in mp.cells), 0.0, 1.0,
                                     [c.rank for c in mp.cells]))
            continue
        assert realised is not None
        if mp.name not in realised.errors:
            realised.get(mp)
        total = sum(p.total for p in mp.plans)
        err2 = sum(realised.errors[mp.name])
        kept = sum(p.kept for p in mp.plans)
        rel = (err2 / total) ** 0.5 if total > 0 else 0.0
        rows.append(ModuleReport(mp.name, mp.rank_before, max(p.stored for p in mp.plans), rel,
                                 kept / total if total > 0 else 1.0, [p.k for p in mp.plans]))
    return rows


def write_report(operation: str, rule: str, mps: list[ModulePlan], realised: _Realised | None,
                 inputs: list[str], out: str, fmt: str) -> Report:
    before = [stored_size(p) for p in inputs]
    after = stored_size(out)
    return Report(operation, rule, module_reports(mps, realised, None),
                  params_before=sum(p for p, _ in before), params_after=after[0],
                  bytes_before=sum(b for _, b in before), bytes_after=after[1], output=out, format_out=fmt)


def build_adapter(mps: list[ModulePlan], realised: _Realised | None,
                  exact_module: Callable[[ModulePlan], LoraModule]) -> LoraAdapter:
    modules = {}
    for mp in mps:
        modules[mp.name] = lowrank_module(mp, realised) if mp.plans is not None else exact_module(mp)  # type: ignore[arg-type]
    return LoraAdapter(modules, format="memory")
