"""`combine_loras`: several LoRAs (any formats, with strengths) as one, dW = sum_i s_i dW_i.

Without a rank option the result is exact: on every up block the inputs' ranks are concatenated (up
blocks side by side, down rows stacked), each input's strength and scale folded into its up block in
float64 (stored at least float32 where a factor is not 1), so the weight change equals the sum to float
rounding. With a rank option the same stacked factors go through resize's SVD machinery and are reported
the same way. Modules present in some inputs only are kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import ExitStack

import numpy as np

from ..model.adapter import LoraAdapter, LoraModule, Part
from ..model.sources import Computed, Source, cat_rows, fold_into, placed, promote
from ..errors import LoraError
from ..formats import load_lora, save_lora
from ..formats._common import in_file_order
from ..io.dtypes import decode
from .cells import Cell, ModulePlan, Term
from .engine import build_adapter, output_dtype, plan_modules, write_report
from .realised import Realised
from .lowrank import RankRule, Report
from .resize import check_target


def _cells(name: str, found: list[tuple[str, LoraModule, float]]) -> list[Cell]:
    """The module's rows cut at every part boundary of every input; each piece a cell with one term per
    input part covering it (an up matrix restricted to the piece's rows, its down unchanged)."""
    cuts = sorted({r for _, m, _ in found for p in m.parts for r in p.rows})
    cells = []
    for lo, hi in zip(cuts, cuts[1:]):
        terms = []
        for _, m, strength in found:
            for p in sorted(m.parts, key=lambda p: p.rows):
                if p.rows[0] <= lo and hi <= p.rows[1]:
                    terms.append(Term(p.up.rows(lo - p.rows[0], hi - p.rows[0]), p.down, strength * p.scale))
        if terms:
            cells.append(Cell((lo, hi), terms))
    return cells


def _folded_ups(ups: list[tuple[Source, float]]) -> Source:
    """Up blocks side by side, each multiplied by its ratio: one pass into the output buffer per cell.

    A ratio of 1 is a widening copy (exact); any other is computed in float64 and rounded once to the
    output dtype (float32, or float64 for float64 inputs), the one rounding of an exact combine
    (`fold_into`, which also refuses a product that overflows)."""
    h = ups[0][0].shape[0]
    cols = sum(u.shape[1] for u, _ in ups)
    dtype = promote("F32", *(u.dtype for u, _ in ups))

    def make() -> np.ndarray:
        out = np.empty((h, cols), dtype=np.float64 if dtype == "F64" else np.float32)
        c = 0
        for u, ratio in ups:
            dst = out[:, c:c + u.shape[1]]
            c += u.shape[1]
            if ratio == 1.0:
                decode(u.raw(), u.dtype, dst)
            else:
                fold_into(u, ratio, dst)
        return out.view(np.uint8)

    return Computed((h, cols), dtype, make, tuple(u for u, _ in ups))


def _exact_module(mp: ModulePlan) -> LoraModule:
    """Ranks concatenated per cell; factors folded into the ups relative to one common scale (the first
    input's, so a module with one input, or inputs of equal strength x scale, is copied as it is)."""
    parts = []
    for cell in mp.cells:
        scale = next((t.factor for t in cell.terms if t.factor != 0.0), 0.0)
        ratios = [t.factor / scale if scale else 0.0 for t in cell.terms]
        if all(r == 1.0 for r in ratios):
            ups, col = [], 0
            for t in cell.terms:
                ups.append((0, col, t.up))
                col += t.down.shape[0]
            up = ups[0][2] if len(ups) == 1 else placed((cell.rows[1] - cell.rows[0], col), ups)
        else:
            up = _folded_ups([(t.up, r) for t, r in zip(cell.terms, ratios)])
        parts.append(Part(cell.rows, cat_rows([t.down for t in cell.terms]), up, scale))
    return LoraModule(mp.name, mp.out_features, mp.in_features, parts, mp.naming)


def combine_loras(out: str, loras: Iterable[tuple[str, float]], *, rank: int | None = None,
                  energy: float | None = None, max_error: float | None = None, format: str = "longcat",
                  dtype: str = "keep", overwrite: bool = False, skip_unmapped: bool = False,
                  progress: bool = False) -> Report:
    """Write sum_i strength_i * dW_i of `loras` ([(path, strength), ...], any formats) to `out` as one LoRA.

    No rank option: exact (ranks concatenated). One of `rank`, `energy`, `max_error` (as `resize_lora`):
    compressed by the SVD of the stacked factors, with the true errors reported. `dtype` applies to a
    compressed result ("keep" = the widest input dtype); an exact one keeps the inputs' dtypes.
    """
    loras = [(str(p), float(s)) for p, s in loras]
    if not loras:
        raise LoraError("loras: give at least one LoRA to combine")
    for p, s in loras:
        if not math.isfinite(s):
            raise LoraError(f"{p}: strength must be a finite number, got {s}")
    exact = rank is None and energy is None and max_error is None
    rule = None if exact else RankRule.parse(rank=rank, energy=energy, max_error=max_error)
    if exact and dtype != "keep":
        raise LoraError("dtype: an exact combine keeps the inputs' dtypes; give a rank option to choose one")
    paths = [p for p, _ in loras]
    check_target(out, format, overwrite, paths)
    with ExitStack() as stack:
        adapters: list[LoraAdapter] = [stack.enter_context(load_lora(p)) for p, _ in loras]
        found: dict[str, list[tuple[str, LoraModule, float]]] = {}
        for (path, strength), ad in zip(loras, adapters):
            for m in in_file_order(ad):
                prev = found.setdefault(m.name, [])
                if prev and (prev[0][1].out_features, prev[0][1].in_features) != (m.out_features, m.in_features):
                    raise LoraError(f"module {m.name}: {prev[0][0]} has shape [{prev[0][1].out_features}, "
                                    f"{prev[0][1].in_features}] but {path} has [{m.out_features}, {m.in_features}]")
                prev.append((path, m, strength))
        mps = []
        for name, ms in found.items():
            cells = _cells(name, ms)
            mps.append(ModulePlan(name, ms[0][1].out_features, ms[0][1].in_features, ms[0][1].naming, cells,
                                  max(c.rank for c in cells)))
        realised = None
        if rule is not None:
            dt = output_dtype(dtype, [s.dtype for ad in adapters for m in ad.modules.values() for p in m.parts
                                      for s in (p.up, p.down)])
            plan_modules(mps, rule, dt, progress, "combine: SVD")
            realised = stack.enter_context(Realised(dt))
        result = build_adapter(mps, realised, _exact_module)
        result.path = out
        skipped = save_lora(result, out, format, overwrite=overwrite, skip_unmapped=skip_unmapped, inputs=paths,
                            progress=progress)
        kept = [mp for mp in mps if mp.name not in set(skipped)]
        report = write_report("combine", rule.describe() if rule else "exact", kept, realised, paths, out, format)
    report.skipped = list(skipped)
    if rule is None:
        report.notes.append("exact: ranks concatenated per up block; errors are 0 up to the one float32 rounding "
                            "of up blocks whose strength x scale is not a common factor")
    elif realised is not None and realised.dtype != "F64":
        report.notes.append(f"factors stored as {realised.dtype}; the errors include that rounding")
    return report


__all__ = ["combine_loras"]
