"""Bake LoRAs into a base checkpoint: `W' = W + sum_i strength_i * dW_i`, streamed tensor by tensor.

BASE is a safetensors file or a directory of shards with a `*.safetensors.index.json`, in LongCat's
original naming or FastVideo's split naming (recognised per tensor through the naming table). OUT
mirrors BASE: same shard names, the same weight_map, every other file copied. Untouched tensors are
copied byte for byte (copy_file_range); each adapted weight is computed in fp32 (one in-place addmm per
LoRA part, on the chosen device) and cast once (merge_compute.py). The adapted weights go through a
pipeline (pipeline.py): the next one is read while the current one is computed and the previous one is
written, at most DEPTH of each in memory. Everything is validated before anything is written, and OUT
is built in a temp directory beside it and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ..io import jsonsafe
from ..model.adapter import LoraAdapter
from ..errors import LoraError, Param
from ..formats import load_lora
from .merge_compute import CpuStages, DeviceStages, Job, exact_fp32, gflop, resolve_device
from .merge_int8 import Int8Merge, Requant, check_fit, scan
from .pipeline import Pipeline
from ..io.dtypes import FLOATS, ITEMSIZE, tensor_bytes, torch_dtype
from ..io.writer import Entry, write_safetensors
from ..io.reader import FileRange, SafeFile, file_kind
from ..io.outputs import atomic_output, check_output, dir_problem
from .targets import Target, find_targets

INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
DTYPES = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
DEPTH = 2  # adapted weights in flight: one read, one computed, one written (see pipeline.py)


@dataclass
class Base:
    """A base checkpoint laid out as shards (one, for a single file)."""

    path: str
    directory: bool
    shards: dict[str, SafeFile]  # file name -> open file
    index_name: str | None = None
    index: dict | None = None
    tensors: dict[str, str] = field(default_factory=dict)  # tensor -> shard file name

    def shape(self, tensor: str) -> tuple[int, ...] | None:
        shard = self.tensors.get(tensor)
        return None if shard is None else self.shards[shard].info(tensor).shape

    def close(self) -> None:
        for f in self.shards.values():
            f.close()


def open_base(path: str) -> Base:
    """Open and validate a base checkpoint: index, shards, and every tensor the index names."""
    path = str(path)
    if os.path.isfile(path):
        sf = SafeFile(path)
        base = Base(path, False, {os.path.basename(path): sf})
        base.tensors = {k: os.path.basename(path) for k in sf.keys()}
        return base
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise LoraError(f"{path}: not a regular file or directory ({file_kind(os.stat(path).st_mode)})")
        raise LoraError(f"{path}: no such file or directory")
    indexes = [n for n in os.listdir(path) if n.endswith(".safetensors.index.json")]
    if not indexes:
        single = [n for n in os.listdir(path) if n.endswith(".safetensors")]
        if len(single) != 1:
            raise LoraError(f"{path}: no *.safetensors.index.json and {len(single)} .safetensors files; "
                            f"cannot tell which are the shards")
        base = Base(path, True, {single[0]: SafeFile(os.path.join(path, single[0]))})
        base.tensors = {k: single[0] for k in base.shards[single[0]].keys()}
        return base
    preferred = [n for n in INDEX_NAMES if n in indexes]
    name = preferred[0] if preferred else sorted(indexes)[0]
    ipath = os.path.join(path, name)
    if os.path.exists(ipath) and not os.path.isfile(ipath):  # a FIFO would block the read forever
        raise LoraError(f"{ipath}: not a regular file ({file_kind(os.stat(ipath).st_mode)})")
    index = jsonsafe.load_file(ipath, "the safetensors index", jsonsafe.MAX_INDEX_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise LoraError(f"{ipath}: not a valid safetensors index (needs a weight_map object, tensor -> shard)")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise LoraError(f"{ipath}: weight_map[{tensor!r}] must be a shard file name, not "
                            f"{jsonsafe.type_name(shard)}")
    if not isinstance(index.get("metadata", {}), dict):
        raise LoraError(f"{ipath}: the index's metadata must be an object, not {jsonsafe.type_name(index['metadata'])}")
    base = Base(path, True, {}, name, index)
    try:
        for shard in sorted(set(weight_map.values())):
            spath = os.path.join(path, shard)
            if not _plain_name(shard):  # a path from a file never leaves BASE
                raise LoraError(f"{ipath}: shard {shard!r} is not a file name inside {path}; refusing")
            if not os.path.exists(spath):  # (a FIFO or device is refused by SafeFile, never read)
                raise LoraError(f"{ipath}: shard {shard!r} is missing from {path}")
            base.shards[shard] = SafeFile(spath)
        for tensor, shard in weight_map.items():
            if tensor not in base.shards[shard].tensors:
                raise LoraError(f"{ipath}: names tensor {tensor!r} in {shard!r}, which does not hold it")
        for shard, sf in base.shards.items():
            for tensor in sf.keys():
                if base.tensors.setdefault(tensor, shard) != shard:
                    raise LoraError(f"{path}: tensor {tensor!r} is in both {base.tensors[tensor]!r} and {shard!r}")
    except BaseException:
        base.close()
        raise
    return base


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
        bar = _progress(b, progress)
        q8 = None
        if int8 is not None:
            adds = {k.removesuffix(".weight_int8"): v for k, v in per_weight.items() if k.endswith(".weight_int8")}
            q8 = Int8Merge(b, int8, adds, out_dtype, device)
            q8.check_names()
        jobs: list[Job] = []
        plan = [(shard, sf, _entries(sf, per_weight, out_dtype, q8, shard, jobs, lambda i: pipe.take(i)))
                for shard, sf in b.shards.items()]
        stages = _stages(jobs, device)
        pipe = Pipeline(jobs, stages, DEPTH)
        try:
            with exact_fp32(device), atomic_output(out, overwrite=overwrite, inputs=inputs, directory=b.directory,
                                                    replaceable=_earlier_output(str(base))) as tmp:
                for shard, sf, entries in plan:
                    target = os.path.join(tmp, q8.out_shard(shard) if q8 else shard) if b.directory else tmp
                    # pipelined=False: the pipeline already computes ahead, and a job's bytes must be
                    # written before the next job is taken (its slot is then reused)
                    write_safetensors(target, entries, sf.metadata or None, bar.update if bar else None,
                                      pipelined=False)
                if b.directory and q8 is not None and out_dtype is not None:
                    q8.copy_rest(tmp, lambda src, dst: _copy_side_file(src, dst, b.path))
                elif b.directory:
                    _copy_rest(b, tmp, out_dtype)
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


def _plain_name(name: object) -> bool:
    """True for a file name that stays inside its folder (no separator, not '.', '..' or empty, no NUL)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and os.sep not in name
            and "\0" not in name)


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


def _copy_side_file(src: str, dst: str, root: str) -> None:
    """Copy one non-shard entry of BASE: a regular file, a directory (recursively), or a symlink as a link.

    Links are never followed: a link whose target stays inside BASE (`root`) keeps its text (it resolves
    the same way in OUT, which mirrors BASE); one pointing out of BASE becomes a link to the same absolute
    target.
    Nothing is read through a link, so a link to `/` or to a secret never copies its contents into OUT.
    FIFOs, sockets and devices are refused (copying one would block or read forever).
    """
    mode = os.lstat(src).st_mode
    if stat.S_ISLNK(mode):
        target = os.readlink(src)
        inside = _inside(os.path.join(os.path.dirname(src), target), root)
        os.symlink(target if inside else os.path.realpath(src), dst)
    elif stat.S_ISDIR(mode):
        os.mkdir(dst, 0o777)
        for n in sorted(os.listdir(src)):
            _copy_side_file(os.path.join(src, n), os.path.join(dst, n), root)
        shutil.copystat(src, dst, follow_symlinks=False)
    elif stat.S_ISREG(mode):
        shutil.copy2(src, dst, follow_symlinks=False)
    else:
        raise LoraError(f"{src}: {file_kind(mode)} in the base checkpoint; refusing to copy it")


def _inside(path: str, folder: str) -> bool:
    """True if `path`, resolved through every link, lies in `folder` (also resolved)."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _copy_rest(b: Base, tmp: str, out_dtype: str | None) -> None:
    """Every file of BASE that is not a shard, the index rewritten only where sizes changed (see _copy_side_file)."""
    for entry in os.listdir(b.path):
        src, dst = os.path.join(b.path, entry), os.path.join(tmp, entry)
        if entry in b.shards:
            continue
        if entry == b.index_name and b.index is not None:
            index = json.loads(json.dumps(b.index))
            if out_dtype is not None:
                total = sum(_out_nbytes(sf, k, out_dtype) for sf in b.shards.values() for k in sf.keys())
                index.setdefault("metadata", {})["total_size"] = total
            with open(dst, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
        else:
            _copy_side_file(src, dst, b.path)


def _out_nbytes(sf: SafeFile, name: str, out_dtype: str) -> int:
    info = sf.info(name)
    dt = out_dtype if info.dtype in FLOATS else info.dtype
    return info.nbytes // ITEMSIZE[info.dtype] * ITEMSIZE[dt]


def _progress(b: Base, enabled: bool):
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    total = sum(sf.size for sf in b.shards.values())
    return tqdm(total=total, unit="B", unit_scale=True, desc="merge", leave=False)


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """PATH[:STRENGTH]: the strength is taken from the last ':' when it parses as a number."""
    path, sep, tail = arg.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return arg, 1.0


__all__ = ["merge_checkpoint", "open_base", "parse_lora_arg", "MergeReport"]
