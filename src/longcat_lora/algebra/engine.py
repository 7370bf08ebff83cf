"""The low-rank engine's module level, shared by resize and combine: plan every module's cells (pass 1),
build the output adapter whose truncated modules are computed on demand (pass 2, through `Realised`),
pick the output dtype, and report sizes and true errors. The SVD of one cell is in cells.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from ..progress import progress_bar
from ..model.adapter import LoraAdapter, LoraModule, Part
from ..model.sources import Computed, Source
from ..errors import LoraError
from ..io.dtypes import FLOATS
from ..io.reader import SafeFile
from .cells import CellPlan, ModulePlan, Workspace, fixed_stored, plan_cell, single_threaded, work_dtype
from .lowrank import ModuleReport, RankRule, Report
from .realised import Realised

DTYPES = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32", "fp64": "F64"}


def _lazy(realised: Realised, mp: ModulePlan, i: int, which: int, shape: tuple[int, int]) -> Source:
    return Computed(shape, realised.dtype, lambda: realised.get(mp)[i][which])


def lowrank_module(mp: ModulePlan, realised: Realised) -> LoraModule:
    """The output module of a planned (truncated) module: one part per cell, factors computed on demand."""
    assert mp.plans is not None
    parts = []
    for i, (cell, plan) in enumerate(zip(mp.cells, mp.plans)):
        h = cell.rows[1] - cell.rows[0]
        parts.append(Part(cell.rows, _lazy(realised, mp, i, 1, (plan.stored, mp.in_features)),
                          _lazy(realised, mp, i, 0, (h, plan.stored)), 1.0))
    return LoraModule(mp.name, mp.out_features, mp.in_features, parts, mp.naming)


def plan_modules(mps: list[ModulePlan], rule: RankRule, dtype: str, progress: bool, desc: str) -> None:
    """Pass 1 over every module (in input order), with a progress bar on a terminal; `dtype` is the
    output's (it sets the working precision, `work_dtype`)."""
    bar = progress_bar(progress, desc, len(mps), "module")
    try:
        ws = Workspace()
        with single_threaded():
            for mp in mps:
                mp.plans = []
                for c in mp.cells:
                    stored = fixed_stored(c, rule)
                    # a fixed rank needs no pass before writing: the SVD is done once, as the module is written
                    mp.plans.append(plan_cell(c, rule, ws, f"module {mp.name}", work_dtype(dtype, c))
                                    if stored is None
                                    else CellPlan(None, -1, stored, None, None, rule))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def output_dtype(requested: str, inputs: Iterable[str]) -> str:
    """The dtype name for the output factors: `keep` = the widest input dtype, else as named."""
    from ..model.sources import promote

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


def module_reports(mps: list[ModulePlan], realised: Realised | None) -> list[ModuleReport]:
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


def write_report(operation: str, rule: str, mps: list[ModulePlan], realised: Realised | None,
                 inputs: list[str], out: str, fmt: str) -> Report:
    before = [stored_size(p) for p in inputs]
    after = stored_size(out)
    return Report(operation, rule, module_reports(mps, realised),
                  params_before=sum(p for p, _ in before), params_after=after[0],
                  bytes_before=sum(b for _, b in before), bytes_after=after[1], output=out, format_out=fmt)


def build_adapter(mps: list[ModulePlan], realised: Realised | None,
                  exact_module: Callable[[ModulePlan], LoraModule] | None = None) -> LoraAdapter:
    """The output adapter: truncated modules computed on demand through `realised`, exact ones by
    `exact_module`."""
    from ..formats._common import in_file_order

    modules = {}
    for mp in mps:
        if mp.plans is not None:
            assert realised is not None
            modules[mp.name] = lowrank_module(mp, realised)
        else:
            assert exact_module is not None
            modules[mp.name] = exact_module(mp)
    adapter = LoraAdapter(modules, format="memory")
    if realised is not None:  # the helper thread follows the order the writers ask in
        planned = {mp.name: mp for mp in mps if mp.plans is not None}
        realised.follow([planned[m.name] for m in in_file_order(adapter) if m.name in planned])
    return adapter
