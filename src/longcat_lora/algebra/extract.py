"""Extract a LoRA from two checkpoints: a low-rank SVD of `W_tuned - W_base` for each adapted Linear.

BASE and TUNED are read as `merge` reads a base (a safetensors file or a sharded directory with an
index), each in LongCat's or FastVideo's naming, recognised tensor by tensor through the naming table
(`param_from`), so a FastVideo fine-tune of an official base works: FastVideo's split layers
(to_q / to_k / to_v, to_k / to_v) are read back into the fused module's rows. LongCat's INT8 layers
(`weight_int8` int8 + `weight_scale` per row, the official QuantizedLinear) are read as the weight they
stand for, `weight_int8 * weight_scale[:, None]` (exact in float64, one rounding in float32). Every module of the
naming table is extracted the way the native format counts rank: its rows are cut into the module's up
blocks (attn.qkv 3, cross_attn.kv_linear 2, adaLN 6, final adaLN 2, Avatar's audio adaLN 3, else 1), and
each block's change is truncated separately (for qkv and kv_linear these are exactly FastVideo's split
layers, so extracting per split layer would give the same factors).

Streaming: one up block at a time, TUNED's rows are read (one pread into a reused buffer) and converted
into a reused compute buffer, then BASE's rows are read into the same byte buffer and subtracted in
place: about two weights in memory, never a checkpoint. The factors go to an anonymous spool file, not
memory, so a 48-block extraction at rank 128 does not hold gigabytes of factors either. Blocks of up to
`FLOAT64_BELOW` elements (and float64 inputs) are computed in float64 with an exact SVD; larger blocks in
float32 with a randomized SVD (`dense_svd`). Each written block's true error `||dW - up @ down||_F` is
measured against the change itself, with the factors as stored.

Output: the native format by default, `alpha_scale` 1.0 and float32 factors split as `up = U sqrt(S)`,
`down = sqrt(S) Vh` (both factors of the same magnitude, so any dtype a converter picks holds them
well); with a fixed rank every up block has exactly that rank (zero-padded where the change has lower
rank), as the official loader's `lora_network_dim` expects. Any other format through `save_lora`.

The steps live beside this module: extract_plan.py (the checkpoints by LongCat parameter, matched),
change_reader.py (one block's change, streamed), block_svd.py (its truncated SVD), spool.py (the factors).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

from ..progress import progress_bar
from ..apply.merge_compute import resolve_device
from ..model.adapter import LoraAdapter, LoraModule, Part
from ..errors import LoraError
from ..formats import FORMATS, check_lora_output, save_lora
from ..apply.base_checkpoint import open_base
from .block_svd import Block, extract_block
from .cells import single_threaded
from .change_reader import ChangeWorkspace
from .extract_plan import canonical_params, plan_extraction, same_values
from .lowrank import ModuleReport, RankRule, Report
from .spool import Spool

DTYPES = {"keep": "float32", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


# ---------------------------------------------------------------- the report


@dataclass
class ExtractReport(Report):
    """Report plus what extract alone knows: tensors that changed but are not the weight of a LoRA
    target (biases, norms, embedders), which a LoRA cannot carry. `skipped` lists the weights that are
    identical in both checkpoints. A module's `rank_before` is the full rank of a dense change of its up
    block's shape, min(rows / blocks, cols); `rank_after` the rank stored per up block."""

    not_representable: list[str] = field(default_factory=list)

    def format(self, per_module: bool = True) -> str:  # type: ignore[override]
        """The shared report, with the (often long) list of identical weights on one line."""
        lines = [Report.format(replace(self, skipped=[]), per_module)]
        if self.skipped:
            lines.append(f"identical in both checkpoints (skipped): {', '.join(self.skipped)}")
        for name in self.not_representable:
            lines.append(f"changed but not representable as LoRA: {name}")
        return "\n".join(lines)



# ---------------------------------------------------------------- the entry point


def extract_lora(base: str, tuned: str, out: str, *, rank: int | None = None, energy: float | None = None,
                 max_error: float | None = None, device: str = "cpu", format: str = "longcat",
                 dtype: str = "keep", overwrite: bool = False, skip_unmapped: bool = False,
                 progress: bool = False) -> ExtractReport:
    """Write the LoRA that best approximates `tuned - base` (see the module docstring) to `out`.

    Exactly one of `rank` (per up block), `energy` (smallest rank keeping that share of each block's
    squared Frobenius norm) or `max_error` (smallest rank whose relative Frobenius error is at most
    that). `dtype`: of the factors, "fp32" (also what "keep" means here: a change has no LoRA dtype to
    keep), "bf16", "fp16" or "fp64"; its rounding is part of the reported error. `skip_unmapped`: leave
    out (and list) modules the output format cannot name. Returns the report: per module ranks, retained
    share and true relative error; weights equal in both; other tensors that changed. Nothing is
    written unless everything succeeds.
    """
    import torch

    rule = RankRule.parse(rank, energy, max_error)
    if format not in FORMATS:
        raise LoraError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if dtype not in DTYPES:
        raise LoraError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    store = getattr(torch, DTYPES[dtype])
    device = resolve_device(str(device), 0.0)  # a name torch knows, CUDA present; "auto" is the CPU here
    base, tuned, out = str(base), str(tuned), str(out)
    check_lora_output(out, format, overwrite=overwrite, inputs=[base, tuned])
    b = open_base(base)
    try:
        t = open_base(tuned)
    except BaseException:
        b.close()
        raise
    spool = None
    try:
        plan = plan_extraction(canonical_params(b), canonical_params(t), base, tuned)
        if not plan.modules:
            raise LoraError(f"{base}: holds no weight of a LongCat DiT Linear (nothing to extract from)")
        report = ExtractReport("extract", rule.describe(), format_out=format, output=out)
        report.bytes_before = sum(sf.size for sf in t.shards.values())
        ws = ChangeWorkspace(device)
        gen = torch.Generator(device=device).manual_seed(0)
        spool = Spool(os.path.dirname(os.path.abspath(out)))
        modules: dict[str, LoraModule] = {}
        bar = progress_bar(progress, "extract", len(plan.modules), "module")
        for module, n, pb, pt in plan.modules:
            rows, cols = pb.shape
            h = rows // n
            blocks: list[tuple[int, Block]] = []
            # one thread: on a shared machine a pool's threads wait on each other far longer than the
            # 2x a free second core could give (a 4096 x 128 Gram: 3.5 ms on one thread, 17 ms on two)
            with single_threaded():
                for i in range(n):
                    d = ws.change(pb, pt, i * h, (i + 1) * h)
                    blk = extract_block(d, rule, gen, f"{tuned}: {module} (rows {i * h}:{(i + 1) * h})", store)
                    if blk is not None:
                        blocks.append((i, blk))
            if bar:
                bar.update(1)
            if not blocks:
                report.skipped.append(module)
                continue
            parts = [Part((i * h, (i + 1) * h), spool.put(blk.down), spool.put(blk.up), 1.0) for i, blk in blocks]
            modules[module] = LoraModule(module, rows, cols, parts)
            total = math.fsum(blk.total for _, blk in blocks)
            kept = math.fsum(blk.kept for _, blk in blocks)
            err2 = math.fsum(blk.err2 for _, blk in blocks)
            by_index = dict(blocks)
            ranks = [by_index[i].rank if i in by_index else 0 for i in range(n)]
            stored = max(p.rank for p in parts)
            report.modules.append(ModuleReport(module, min(h, cols), stored, math.sqrt(err2 / total),
                                               kept / total, ranks))
            report.params_before += rows * cols
            report.params_after += n * stored * (cols + h)
        if bar:
            bar.close()
        for x, y in plan.others:
            if not same_values(x, y):
                report.not_representable.append(x.name)
        if not modules:
            raise LoraError(f"{tuned}: every Linear weight equals {base}'s; there is no change to extract")
        adapter = LoraAdapter(modules, "memory", tuned, scale_dtype="F32")
        left_out = save_lora(adapter, out, format, overwrite=overwrite, skip_unmapped=skip_unmapped,
                             inputs=[base, tuned], progress=progress)
        for m in left_out:
            report.notes.append(f"left out (no name in {format}): {m}")
        report.bytes_after = _size(out)
        return report
    finally:
        if spool is not None:
            spool.close()
        b.close()
        t.close()


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)


__all__ = ["ExtractReport", "extract_lora"]
