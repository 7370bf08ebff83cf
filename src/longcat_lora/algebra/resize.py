"""`resize_lora`: a LoRA at a lower rank, by the exact SVD of each up block's weight change.

Each part of the format-neutral model (one up block of a native module) is truncated separately, as the
native format counts rank per up block (`lora_network_dim`): the optimum in Frobenius norm at that rank
(Eckart-Young). The native output keeps the fused layout, one rank for all up blocks of a module,
zero-padded where the rule picked different ranks for different blocks.
"""

from __future__ import annotations

from ..formats import check_lora_output, load_lora, save_lora
from ..formats._common import in_file_order
from .cells import Cell, ModulePlan, Term
from .engine import build_adapter, output_dtype, plan_modules, write_report
from .realised import Realised
from .lowrank import RankRule, Report


def check_target(out: str, format: str, overwrite: bool, inputs: list[str]) -> None:
    """Refuse an unknown format or an output that cannot be written, before any work is done."""
    check_lora_output(out, format, overwrite=overwrite, inputs=inputs)


def resize_lora(src: str, out: str, *, rank: int | None = None, energy: float | None = None,
                max_error: float | None = None, format: str = "longcat", dtype: str = "keep",
                overwrite: bool = False, skip_unmapped: bool = False, progress: bool = False) -> Report:
    """Write `src` (any format) at a lower rank to `out` in `format`; returns the report.

    Exactly one of `rank` (per up block, capped at each block's rank), `energy` (keep the smallest rank
    whose share of ||dW||_F^2 is >= energy, per up block) or `max_error` (the smallest rank whose relative
    Frobenius error is <= max_error, per up block). `dtype`: "keep" (the input's dtype; rounding the new
    factors to it is part of the reported error), "bf16", "fp16", "fp32" or "fp64". The report's errors
    are the true relative Frobenius errors of the written file against the input.
    """
    rule = RankRule.parse(rank=rank, energy=energy, max_error=max_error)
    check_target(out, format, overwrite, [src])
    with load_lora(src) as adapter:
        mps = []
        for m in in_file_order(adapter):
            parts = sorted(m.parts, key=lambda p: p.rows)
            mps.append(ModulePlan(m.name, m.out_features, m.in_features, m.naming,
                                  [Cell(p.rows, [Term(p.up, p.down, p.scale)]) for p in parts],
                                  max(p.rank for p in parts)))
        dt = output_dtype(dtype, [s.dtype for m in adapter.modules.values() for p in m.parts for s in (p.up, p.down)])
        plan_modules(mps, rule, dt, progress, "resize: SVD")
        with Realised(dt) as realised:
            result = build_adapter(mps, realised)
            result.path = src
            result.scale_dtype = None
            skipped = save_lora(result, out, format, overwrite=overwrite, skip_unmapped=skip_unmapped,
                                inputs=[src], progress=progress)
            kept = [mp for mp in mps if mp.name not in set(skipped)]
            report = write_report("resize", rule.describe(), kept, realised, [src], out, format)
    report.skipped = list(skipped)
    if dt != "F64":
        report.notes.append(f"factors stored as {dt}; the errors include that rounding")
    return report


__all__ = ["resize_lora"]
