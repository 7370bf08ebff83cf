"""Bake LoRAs into a base checkpoint: `W' = W + sum_i strength_i * dW_i`, streamed tensor by tensor.

BASE (opened by base_checkpoint.py) is a safetensors file or a directory of shards with a
`*.safetensors.index.json`, in LongCat's original naming or FastVideo's split naming (recognised per
tensor through the naming table). OUT mirrors BASE: same shard names, the same weight_map, every other
file copied (side_files.py). Untouched tensors are copied byte for byte (copy_file_range); each element
of an adapted weight is the correctly rounded value of the exact sum (merge_compute.py, exact.py), so
the output bytes are the same on every machine. The adapted weights go through a pipeline (pipeline.py): the next one is read while
the current one is computed and the previous one is written, at most DEPTH of each in memory.
Everything is validated before anything is written, and OUT is built in a temp directory beside it and
renamed into place at the end.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from ..progress import progress_bar
from ..model.adapter import LoraAdapter
from ..errors import LoraError, Param
from ..formats import load_lora
from .merge_compute import CpuStages, DeviceStages, Job, gflop, resolve_device
from .base_checkpoint import open_base
from .int8_layout import check_fit, scan
from .merge_int8 import Int8Merge, Requant
from .pipeline import Pipeline
from .side_files import copy_rest, copy_side_file
from ..io.dtypes import FLOATS, tensor_bytes, torch_dtype
from ..io.writer import Entry, layout, write_safetensors
from ..io.reader import FileRange, SafeFile, file_kind
from ..io.outputs import atomic_output, check_output, dir_problem
from .targets import Target, find_targets

DTYPES = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
DEPTH = 2  # adapted weights in flight: one read, one computed, one written (see pipeline.py)


@dataclass
class MergeReport:
    merged: list[str]  # base tensors changed
    skipped: list[str]  # LoRA modules left out (skip_unmapped)
    out: str
    requantized: dict[str, Requant] = field(default_factory=dict)  # INT8 layer -> requantization error
    summary: str = ""  # one line about the INT8 layers of an INT8 base (requantized or dequantized)
    device: str = "cpu"  # where the weight changes were computed (what device="auto" chose)


def merge_checkpoint(base: str, out: str, loras: Iterable[tuple[str | LoraAdapter, float]], *, dtype: str = "keep",
                     overwrite: bool = False, skip_unmapped: bool = False, device: str = "auto",
                     progress: bool = False) -> MergeReport:
    """Write `base` with every LoRA folded in to `out` (see the module docstring).

    `device`: "cpu", "cuda" (or "cuda:N"), or "auto" (CUDA when available and the LoRA products reach
    merge_compute.AUTO_CUDA_GFLOP); `MergeReport.device` says which ran.
    """
    if dtype not in DTYPES:
        raise LoraError(Param("dtype", dtype), f": must be one of {', '.join(map(repr, DTYPES))}")
    if device != "auto":
        resolve_device(device, 0.0)  # refuses cuda without CUDA before anything is read
    out_dtype = DTYPES[dtype]
    loras = list(loras)
    if not loras:
        raise LoraError("loras is empty: give at least one (LoRA, strength)")
    for lora, strength in loras:
        if not math.isfinite(float(strength)):
            what = "a LoRA in memory" if isinstance(lora, LoraAdapter) else lora
            raise LoraError(f"loras: the strength of {what} must be a finite number, got {strength}")
    inputs = [str(base)] + [str(x) for x, _ in loras if not isinstance(x, LoraAdapter)]
    check_output(out, overwrite=overwrite, inputs=inputs, directory=os.path.isdir(base),
                 replaceable=_earlier_output(str(base)))  # before reading anything
    b = open_base(base)
    opened: list[LoraAdapter] = []
    try:
        int8 = scan(b)  # INT8 layers (validated), or None
        per_weight: dict[str, list[tuple[Target, float]]] = {}
        skipped: list[str] = []

        def layer_shape(layer: str) -> tuple[int, int] | None:
            shape = b.shape(layer + ".weight")
            if shape is None and int8 is not None and layer in int8:
                shape = int8[layer].shape
            return shape if shape is not None and len(shape) == 2 else None  # type: ignore[return-value]

        for lora, strength in loras:
            adapter = lora if isinstance(lora, LoraAdapter) else load_lora(str(lora))
            if adapter is not lora:
                opened.append(adapter)
            if int8 is not None:
                check_fit(int8, b, adapter, str(lora) if adapter is not lora else "(in memory)")
            targets, missing = find_targets(adapter, layer_shape, skip_unmapped, f"base {base}")
            skipped += missing
            for t in targets:
                suffix = ".weight_int8" if int8 is not None and t.layer in int8 else ".weight"
                per_weight.setdefault(t.layer + suffix, []).append((t, float(strength)))
        for tensor in per_weight:
            d = b.shards[b.tensors[tensor]].info(tensor).dtype
            if d not in FLOATS and not tensor.endswith(".weight_int8"):
                raise LoraError(f"{base}: tensor {tensor!r} has dtype {d}; cannot add a LoRA to it")
        device = resolve_device(device, sum(gflop(adds) for adds in per_weight.values()))
        bar = progress_bar(progress, "merge", sum(sf.size for sf in b.shards.values()))
        q8 = None
        if int8 is not None:
            adds = {k.removesuffix(".weight_int8"): v for k, v in per_weight.items() if k.endswith(".weight_int8")}
            q8 = Int8Merge(b, int8, adds, out_dtype, device)
            q8.check_names()
        jobs: list[Job] = []
        plan = []
        for shard, sf in b.shards.items():
            first = len(jobs)
            entries = _entries(sf, per_weight, out_dtype, q8, shard, jobs, lambda i: pipe.take(i))
            # where each job's bytes will lie in its shard, known from the header before anything runs:
            # the CPU stages lay their output out congruent to it, so direct writes need no staging copy
            starts = dict(zip((e.name for e in entries), layout(entries, sf.metadata or None)[1]))
            for j in range(first, len(jobs)):
                jobs[j] = replace(jobs[j], out_offset=starts.get(jobs[j].name))
            plan.append((shard, sf, entries))
        stages = _stages(jobs, device)
        pipe = Pipeline(jobs, stages, DEPTH)
        try:
            with atomic_output(out, overwrite=overwrite, inputs=inputs, directory=b.directory,
                               replaceable=_earlier_output(str(base))) as tmp:
                for shard, sf, entries in plan:
                    target = os.path.join(tmp, q8.out_shard(shard) if q8 else shard) if b.directory else tmp
                    # pipelined=False: the pipeline already computes ahead, and a job's bytes must be
                    # written before the next job is taken (its slot is then reused)
                    write_safetensors(target, entries, sf.metadata or None, bar.update if bar else None,
                                      pipelined=False, direct=True)
                if b.directory and q8 is not None and out_dtype is not None:
                    q8.copy_rest(tmp, lambda src, dst: copy_side_file(src, dst, b.path))
                elif b.directory:
                    copy_rest(b, tmp, out_dtype)
                for sf in [*b.shards.values(), *(f for a, _ in loras if isinstance(a, LoraAdapter) for f in a.files),
                           *(f for a in opened for f in a.files)]:
                    sf.check_unchanged()  # an input rewritten meanwhile: what was read may mix two versions
        finally:
            pipe.close()  # before the inputs are closed: the reader thread uses their descriptors
            stages.close()
        if bar:
            bar.close()
        if q8 is not None:
            return MergeReport(sorted(per_weight), skipped, out, dict(sorted(q8.report.items())), q8.summary(), device)
        return MergeReport(sorted(per_weight), skipped, out, device=device)
    finally:
        b.close()
        for a in opened:
            a.close()


def _stages(jobs: list[Job], device: str) -> CpuStages | DeviceStages:
    """The merge arithmetic for `device`: cache-sized chunks on the CPU, staged streams on a GPU."""
    return CpuStages(DEPTH) if device == "cpu" else DeviceStages(jobs, device, DEPTH)


def _entries(sf: SafeFile, per_weight: dict[str, list[tuple[Target, float]]], out_dtype: str | None,
             q8: Int8Merge | None, shard: str, jobs: list[Job], take: Callable[[int], np.ndarray]) -> list[Entry]:
    """One shard's entries in write order; each adapted weight becomes the next pipeline job."""
    def plain(name: str) -> Entry:
        return _entry(sf, name, per_weight.get(name), out_dtype, jobs, take)

    if q8 is not None:
        return q8.entries(shard, sf, plain)
    return [plain(name) for name in sorted(sf.keys(), key=lambda k: sf.info(k).start)]


def _entry(sf: SafeFile, name: str, adds: list[tuple[Target, float]] | None, out_dtype: str | None,
           jobs: list[Job], take: Callable[[int], np.ndarray]) -> Entry:
    info = sf.info(name)
    dt = out_dtype if out_dtype and info.dtype in FLOATS else info.dtype
    if not adds:
        if dt == info.dtype:
            return Entry(name, dt, info.shape, lambda: FileRange(sf.fd, info.start, info.nbytes, sf.path, name))
        return Entry(name, dt, info.shape, lambda: tensor_bytes(sf.read(name).to(torch_dtype(dt))))
    jobs.append(Job(sf, name, tuple(adds), dt))
    return Entry(name, dt, info.shape, lambda i=len(jobs) - 1: take(i))


def _earlier_output(base: str):
    """The `--overwrite` rule for an existing OUT directory: it must look like an earlier merge of BASE.

    Every entry is either a regular file named `*.safetensors` / `*.safetensors.index.json` (shards and
    index, whatever their names) or has the name and kind of an entry of BASE (the files merge copies),
    and it holds at least one `*.safetensors`. Anything else (a stray file, a link where BASE has a file)
    means it is not ours to delete.
    """

    def problem(out: str) -> str | None:
        allowed: dict[str, str] = {}
        try:
            for n in os.listdir(base):
                allowed[n] = file_kind(os.lstat(os.path.join(base, n)).st_mode)
            names = os.listdir(out)
        except OSError as e:
            return f"cannot list it ({e.strerror})"
        for n in names:
            if n.endswith((".safetensors", ".safetensors.index.json")):
                allowed.setdefault(n, "a regular file")
        why = dir_problem(out, allowed, set())
        if why is None and not any(n.endswith(".safetensors") for n in names):
            why = "it holds no .safetensors file, so it is not an earlier merge output"
        return why

    return problem




__all__ = ["merge_checkpoint", "MergeReport"]
