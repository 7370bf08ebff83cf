"""Bake LoRAs into a base checkpoint: `W' = W + sum_i strength_i * dW_i`, streamed tensor by tensor.

BASE (opened by base_checkpoint.py) is a safetensors file or a directory of shards with a
`*.safetensors.index.json`, its tensors named in any scheme of the naming table (LongCat's original
names, FastVideo's split ones, ComfyUI-WanVideoWrapper's Wan-style ones; recognised per tensor, a split
q/k/v or k/v layer taking its rows of the fused module's change). OUT mirrors BASE: same shard names, the
same weight_map, every other file copied (side_files.py). Untouched tensors are copied byte for byte
(copy_file_range); each element of an adapted weight is the correctly rounded value of the exact sum
(merge_compute.py, exact.py), so the output bytes are the same on every machine. Quantized bases keep
their scheme by default: the official INT8 layout (merge_int8.py) and scaled fp8 weights (fp8.py:
requantized with fresh power-of-two scales of the same shape); `dtype` dequantizes either instead.
`layout="wanvideo"` repacks BASE into the wrapper's single file instead (repack.py), LoRAs baked in or
none, optionally as fp8_e4m3fn_scaled. The adapted weights go through a pipeline (pipeline.py): the next
one is read while the current one is computed and the previous one is written, at most DEPTH of each in
memory. Everything is validated before anything is written, and OUT is built in a temp file or
directory beside it and renamed into place at the end.
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
from . import fp8, repack
from .merge_compute import CpuStages, DeviceStages, Fp8Out, Job, Scaled, gflop, resolve_device
from .base_checkpoint import open_base
from .int8_layout import check_fit, scan
from .merge_int8 import Int8Merge, Requant
from .pipeline import Pipeline
from .side_files import copy_rest, copy_side_file
from ..io.dtypes import FLOATS
from ..io.writer import Entry, layout as header_layout, write_safetensors
from ..io.reader import FileRange, SafeFile, file_kind
from ..io.outputs import atomic_output, check_output, dir_problem
from .repack import FP8_SCALED, cast
from .targets import Target, find_targets

DTYPES = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32", FP8_SCALED: None}
LAYOUTS = ("keep", "wanvideo")
PREFIXES = ("model.diffusion_model.",)  # a prefix every tensor name of BASE may carry (module docstring)
DEPTH = 2  # adapted weights in flight: one read, one computed, one written (see pipeline.py)


@dataclass
class MergeReport:
    merged: list[str]  # base tensors changed
    skipped: list[str]  # LoRA modules left out (skip_unmapped)
    out: str
    requantized: dict[str, Requant] = field(default_factory=dict)  # INT8 / fp8 layer -> requantization error
    summary: str = ""  # one line about quantized weights (requantized, dequantized) or the repack
    device: str = "cpu"  # where the weight changes were computed (what device="auto" chose)


class _Jobs:
    """The pipeline's jobs in the order their outputs are written; `add` gives a job's output producer."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.pipe: Pipeline | None = None

    def add(self, job: Job) -> Callable[[], np.ndarray]:
        self.jobs.append(job)
        i = len(self.jobs) - 1
        return lambda: self.pipe.take(i)  # type: ignore[union-attr]

    def place(self, first: int, entries: list[Entry], metadata: dict | None) -> None:
        """Tell jobs first.. where their bytes will lie in the file `entries` make (known from the header
        before anything runs): the CPU stages lay their output out congruent to it, so direct writes need
        no staging copy."""
        starts = dict(zip((e.name for e in entries), header_layout(entries, metadata)[1]))
        for j in range(first, len(self.jobs)):
            self.jobs[j] = replace(self.jobs[j], out_offset=starts.get(self.jobs[j].label or self.jobs[j].name))


def merge_checkpoint(base: str, out: str, loras: Iterable[tuple[str | LoraAdapter, float]], *, dtype: str = "keep",
                     layout: str = "keep", overwrite: bool = False, skip_unmapped: bool = False, device: str = "auto",
                     progress: bool = False) -> MergeReport:
    """Write `base` with every LoRA folded in to `out` (see the module docstring).

    `layout="wanvideo"` repacks BASE into ComfyUI-WanVideoWrapper's single-file layout (repack.py;
    `loras` may then be empty, and `dtype` may be "fp8_e4m3fn_scaled"). `device`: "cpu", "cuda" (or
    "cuda:N"), or "auto" (CUDA when available and the LoRA products reach merge_compute.AUTO_CUDA_GFLOP);
    `MergeReport.device` says which ran.
    """
    if dtype not in DTYPES:
        raise LoraError(Param("dtype", dtype), f": must be one of {', '.join(map(repr, DTYPES))}")
    if layout not in LAYOUTS:
        raise LoraError(Param("layout", layout), f": must be one of {', '.join(map(repr, LAYOUTS))}")
    repacking = layout == "wanvideo"
    if dtype == FP8_SCALED and not repacking:
        raise LoraError(Param("dtype", dtype), " writes the wrapper's layout: give ", Param("layout", "wanvideo"))
    if device != "auto":
        resolve_device(device, 0.0)  # refuses cuda without CUDA before anything is read
    out_dtype = DTYPES[dtype]
    loras = list(loras)
    if not loras and not repacking:
        raise LoraError("loras is empty: give at least one (LoRA, strength)")
    for lora, strength in loras:
        if not math.isfinite(float(strength)):
            what = "a LoRA in memory" if isinstance(lora, LoraAdapter) else lora
            raise LoraError(f"loras: the strength of {what} must be a finite number, got {strength}")
    inputs = [str(base)] + [str(x) for x, _ in loras if not isinstance(x, LoraAdapter)]
    directory = os.path.isdir(base) and not repacking  # a repack writes one file
    replaceable = _earlier_output(str(base)) if directory else None
    check_output(out, overwrite=overwrite, inputs=inputs, directory=directory, replaceable=replaceable)  # before reading
    b = open_base(base)
    opened: list[LoraAdapter] = []
    try:
        int8 = scan(b)  # INT8 layers (validated), or None
        f8 = fp8.scan(b)  # scaled fp8 weights (validated), or None
        if int8 is not None and f8 is not None and f8.layers:
            raise LoraError(f"{base}: holds both INT8 and fp8 weights; refusing a checkpoint mixing the two schemes")
        if repacking and f8 is not None:
            raise LoraError(f"{base}: holds scaled fp8 weights, so it is in the wrapper's layout already: merge into it "
                            "without ", Param("layout", "wanvideo"))
        per_weight: dict[str, list[tuple[Target, float]]] = {}
        skipped: list[str] = []

        # ComfyUI saves checkpoints with every name under `model.diffusion_model.` (the wrapper strips it)
        prefix = next((p for p in PREFIXES if b.tensors and all(t.startswith(p) for t in b.tensors)), "")
        if prefix and repacking:
            raise LoraError(f"{base}: its tensors are named under {prefix!r} (a ComfyUI checkpoint): it is in a "
                            "runtime's layout already; merge into it without ", Param("layout", "wanvideo"))

        def layer_shape(layer: str) -> tuple[int, int] | None:
            layer = prefix + layer
            shape = b.shape(layer + ".weight")
            if shape is None and int8 is not None and layer in int8:
                shape = int8[layer].shape
            return shape if shape is not None and len(shape) == 2 else None  # type: ignore[return-value]

        for lora, strength in loras:
            adapter = lora if isinstance(lora, LoraAdapter) else load_lora(str(lora))
            if adapter is not lora:
                opened.append(adapter)
            if int8 is not None and not prefix:
                check_fit(int8, b, adapter, str(lora) if adapter is not lora else "(in memory)")
            targets, missing = find_targets(adapter, layer_shape, skip_unmapped, f"base {base}")
            skipped += missing
            for t in targets:
                suffix = ".weight_int8" if int8 is not None and prefix + t.layer in int8 else ".weight"
                per_weight.setdefault(prefix + t.layer + suffix, []).append((t, float(strength)))
        for tensor in per_weight:
            d = b.shards[b.tensors[tensor]].info(tensor).dtype
            quantized = tensor.endswith(".weight_int8") or (f8 is not None and tensor[:-len(".weight")] in f8.layers)
            if d not in FLOATS and not quantized:
                raise LoraError(f"{base}: tensor {tensor!r} has dtype {d}; cannot add a LoRA to it")
        device = resolve_device(device, sum(gflop(adds) for adds in per_weight.values()))
        bar = progress_bar(progress, "merge", sum(sf.size for sf in b.shards.values()))
        q8 = None
        if int8 is not None and not repacking:
            adds = {k.removesuffix(".weight_int8"): v for k, v in per_weight.items() if k.endswith(".weight_int8")}
            q8 = Int8Merge(b, int8, adds, out_dtype, device)
            q8.check_names()
        jobs = _Jobs()
        files: list[tuple[str | None, list[Entry], dict | None]] = []  # (file in OUT or None for OUT itself, ...)
        packed = None
        if repacking:
            packed = repack.plan(b, int8, per_weight, out_dtype, dtype == FP8_SCALED, jobs.add)
            meta = {"format": "pt"}
            jobs.place(0, packed.entries, meta)
            files.append((None, packed.entries, meta))
        else:
            f8_plan = _Fp8Plan(b, f8, out_dtype) if f8 is not None else None
            for shard, sf in b.shards.items():
                first = len(jobs.jobs)
                entries = _entries(sf, per_weight, out_dtype, q8, f8_plan, shard, jobs)
                jobs.place(first, entries, sf.metadata or None)
                files.append((q8.out_shard(shard) if q8 else shard, entries, sf.metadata or None))
        stages = _stages(jobs.jobs, device)
        pipe = jobs.pipe = Pipeline(jobs.jobs, stages, DEPTH)
        try:
            with atomic_output(out, overwrite=overwrite, inputs=inputs, directory=directory,
                               replaceable=replaceable) as tmp:
                for name, entries, metadata in files:
                    target = os.path.join(tmp, name) if name is not None and directory else tmp
                    # pipelined=False: the pipeline already computes ahead, and a job's bytes must be
                    # written before the next job is taken (its slot is then reused)
                    write_safetensors(target, entries, metadata, bar.update if bar else None,
                                      pipelined=False, direct=True)
                if directory and q8 is not None and out_dtype is not None:
                    q8.copy_rest(tmp, lambda src, dst: copy_side_file(src, dst, b.path))
                elif directory:
                    dropped = frozenset(f8.scheme_tensors()) if f8 is not None and out_dtype is not None else frozenset()
                    copy_rest(b, tmp, out_dtype, dropped)
                for sf in [*b.shards.values(), *(f for a, _ in loras if isinstance(a, LoraAdapter) for f in a.files),
                           *(f for a in opened for f in a.files)]:
                    sf.check_unchanged()  # an input rewritten meanwhile: what was read may mix two versions
        finally:
            pipe.close()  # before the inputs are closed: the reader thread uses their descriptors
            stages.close()
        if bar:
            bar.close()
        merged = sorted(per_weight)
        if packed is not None:
            report = _fp8_report(packed.fp8)
            return MergeReport(merged, skipped, out, report, _repack_summary(packed, dtype, report), device)
        if q8 is not None:
            return MergeReport(merged, skipped, out, dict(sorted(q8.report.items())), q8.summary(), device)
        if f8 is not None and f8.layers:
            fp8_jobs = [j for j in jobs.jobs if j.fp8 is not None and not j.scale_only]
            report = _fp8_report(fp8_jobs)
            return MergeReport(merged, skipped, out, report, _fp8_summary(f8, out_dtype, report, directory), device)
        return MergeReport(merged, skipped, out, device=device)
    finally:
        b.close()
        for a in opened:
            a.close()


def _fp8_report(jobs: list[Job]) -> dict[str, Requant]:
    return dict(sorted(((j.label or j.name).removesuffix(".weight"), Requant(*j.result["report"])) for j in jobs
                       if "report" in j.result))


def _worst(report: dict[str, Requant]) -> str:
    worst = max(report, key=lambda k: (report[k].rel, k))
    far = max(report, key=lambda k: (report[k].steps, k))
    return (f"worst relative error {report[worst].rel:.1e} at {worst} (worst element {report[far].steps:.2f} "
            f"fp8 steps, at {far})")


def _fp8_summary(f8: fp8.Fp8Scan, out_dtype: str | None, report: dict[str, Requant], directory: bool) -> str:
    if out_dtype is not None:
        dt = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}[out_dtype]
        return (f"dequantized {len(f8.layers)} fp8 weights to {dt} (no scales, no {fp8.MARKER} marker: the wrapper "
                f"loads it as non-scaled)")
    if not report:
        return "no fp8 weight adapted"
    fmts = sorted({f8.layers[k].fmt.name for k in report if k in f8.layers})
    return f"requantized {len(report)} fp8 weights ({', '.join(fmts)}, fresh power-of-two scales); " + _worst(report)


def _repack_summary(p: repack.Repack, dtype: str, report: dict[str, Requant]) -> str:
    line = (f"repacked {p.tensors_in} tensors into the wrapper's layout ({p.split} split by rows, "
            f"{len(p.entries)} written)")
    if p.dequantized:
        line += f"; {p.dequantized} INT8 weights dequantized"
    if dtype == FP8_SCALED:
        line += f"; {len(report)} weights float8_e4m3fn, one power-of-two scale each"
        if report:
            line += ": " + _worst(report)
    return line


class _Fp8Plan:
    """How a scaled fp8 base's tensors are written: kept (adapted weights requantized, each new scale right
    after its weight, or computed first where it lies in an earlier shard) or dequantized (`out_dtype`)."""

    def __init__(self, b, f8: fp8.Fp8Scan, out_dtype: str | None):
        self.b, self.f8, self.out_dtype = b, f8, out_dtype
        self.by_scale = {x.scale: x for x in f8.layers.values()}
        self.order = {s: k for k, s in enumerate(b.shards)}
        self.results: dict[str, dict] = {}  # layer -> the result dict its jobs share

    def scaled(self, x: fp8.Fp8Layer) -> Scaled:
        return Scaled(self.b.shards[x.s_shard], x.scale, x.layout)

    def job(self, x: fp8.Fp8Layer, adds, scale_only: bool = False) -> Job:
        result = self.results.setdefault(x.name, {})
        return Job(self.b.shards[x.w_shard], x.weight, tuple(adds), x.fmt.dtype, scale=self.scaled(x),
                   fp8=fp8_out(x), scale_only=scale_only, label=x.weight, result=result)

    def entries(self, shard: str, sf, per_weight, plain: Callable[[str], Entry], jobs: _Jobs) -> list[Entry]:
        out: list[Entry] = []
        for name in sorted(sf.keys(), key=lambda k: sf.info(k).start):
            x = self.f8.layers.get(name[:-len(".weight")]) if name.endswith(".weight") else None
            if self.out_dtype is not None:  # dequantized: fp8 weights as floats, the scheme's tensors left out
                if x is not None:
                    jb = Job(sf, name, tuple(per_weight.get(name, [])), self.out_dtype, scale=self.scaled(x), label=name)
                    out.append(Entry(name, self.out_dtype, x.shape, jobs.add(jb)))
                elif name not in self.f8.scheme_tensors():
                    out.append(plain(name))
                continue
            if x is not None and name in per_weight:
                jb = self.job(x, per_weight[name])
                out.append(Entry(name, x.fmt.dtype, x.shape, jobs.add(jb)))
                if x.s_shard == shard:
                    out.append(self._scale_entry(x, lambda r=jb.result: r["scale"]))
                continue
            y = self.by_scale.get(name)
            if y is not None and y.weight in per_weight:
                if y.w_shard == shard:
                    continue  # written right after its weight
                if self.order[y.s_shard] < self.order[y.w_shard]:  # computed here first, again with the weight
                    out.append(self._scale_entry(y, jobs.add(self.job(y, per_weight[y.weight], scale_only=True))))
                else:  # the weight's shard came first: its job left the scales here
                    out.append(self._scale_entry(y, lambda r=self.results[y.name]: r["scale"]))
                continue
            out.append(plain(name))
        return out

    def _scale_entry(self, x: fp8.Fp8Layer, produce) -> Entry:
        return Entry(x.scale, x.s_dtype, x.layout.shape, produce)


def fp8_out(x: fp8.Fp8Layer) -> Fp8Out:
    return Fp8Out(x.fmt, x.layout, x.s_dtype)


def _stages(jobs: list[Job], device: str) -> CpuStages | DeviceStages:
    """The merge arithmetic for `device`: cache-sized chunks on the CPU, staged streams on a GPU."""
    return CpuStages(DEPTH) if device == "cpu" else DeviceStages(jobs, device, DEPTH)


def _entries(sf: SafeFile, per_weight: dict[str, list[tuple[Target, float]]], out_dtype: str | None,
             q8: Int8Merge | None, f8: _Fp8Plan | None, shard: str, jobs: _Jobs) -> list[Entry]:
    """One shard's entries in write order; each adapted weight becomes the next pipeline job."""
    def plain(name: str) -> Entry:
        return _entry(sf, name, per_weight.get(name), out_dtype, jobs)

    if q8 is not None:
        return q8.entries(shard, sf, plain)
    if f8 is not None:
        return f8.entries(shard, sf, per_weight, plain, jobs)
    return [plain(name) for name in sorted(sf.keys(), key=lambda k: sf.info(k).start)]


def _entry(sf: SafeFile, name: str, adds: list[tuple[Target, float]] | None, out_dtype: str | None,
           jobs: _Jobs) -> Entry:
    info = sf.info(name)
    dt = out_dtype if out_dtype and info.dtype in FLOATS else info.dtype
    if not adds:
        if dt == info.dtype:
            return Entry(name, dt, info.shape, lambda: FileRange(sf.fd, info.start, info.nbytes, sf.path, name))
        return Entry(name, dt, info.shape, lambda: cast(sf, name, None, dt))  # rounded once; overflow refused
    return Entry(name, dt, info.shape, jobs.add(Job(sf, name, tuple(adds), dt)))


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
