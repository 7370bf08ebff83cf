"""Repack a checkpoint into ComfyUI-WanVideoWrapper's layout (`merge --layout wanvideo`), LoRAs baked in or not.

The output is the one safetensors file the wrapper loads: every tensor of BASE (the official `dit/`
folder in LongCat's names, the official INT8 folder, or a checkpoint already in FastVideo's or the
wrapper's names) goes through the naming table, `naming.param_from` then `naming.param_to(...,
WANVIDEO)`: renamed (patch, time and text embeddings, norms, modulation, head) or split by rows (the
fused `attn.qkv` into `self_attn.q/k/v`, `cross_attn.kv_linear` into `cross_attn.k/v`, weights and
biases alike). A tensor the table does not know, or one the wrapper has no counterpart for (the
Avatar's optional `pre_audio_crs_attn_norm`, which its loader would silently ignore), is refused, never
dropped. LongCat-Video and LongCat-Video-Avatar (1.0 and 1.5 sizes: the table renames the audio modules
so the wrapper's Avatar detection, `multitalk_audio_proj.proj1.weight` + `blocks.0.audio_cross_attn.
q_norm.weight`, finds them).

Values: a renamed or split tensor in its own dtype is its input bytes (a split copies the row range);
with `dtype` every float tensor is cast, correctly rounded; an INT8 weight is dequantized
(`weight_int8 * weight_scale`, exact) and rounded to the output dtype, LoRAs added exactly first.

`fp8_e4m3fn_scaled`: the block Linear weights the wrapper runs through its scaled `CustomLinear`
(self_attn q/k/v/o, cross_attn q/k/v/o, ffn w1/w2/w3, and Avatar's audio_cross_attn q_linear/kv_linear/
proj) become float8_e4m3fn with one float32 `scale_weight` each (shape [], as ComfyUI's scaled_fp8 ops
hold it: the wrapper's fp8 path works with per-tensor scales only), a power of two chosen by fp8.py's
rule, plus the `scaled_fp8` marker (an empty float8_e4m3fn tensor, as ComfyUI writes it). Everything
else keeps its dtype (INT8 sources: bf16): embeddings, modulation (the wrapper keeps any name holding
`modulation`, `time_`, `text_embedding`, `patch_embedding` at its base dtype and would cast an fp8 one
without its scale), norms, biases, the head (`head.head`, left unquantized by the official INT8 scheme
too) and the Avatar's audio projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import LoraError, q
from ..io.dtypes import FLOATS, tensor_bytes, torch_dtype
from ..io.reader import FileRange, SafeFile
from ..io.writer import Entry
from ..model import naming
from .base_checkpoint import Base
from .exact import from_bits, round_f64
from .fp8 import E4M3, MARKER, ScaleLayout
from .int8_layout import INT8, SCALE, Int8Layer
from .merge_compute import Fp8Out, Job, Scaled
from .targets import Target

FP8_SCALED = "fp8_e4m3fn_scaled"
# LongCat module kinds whose weight is fp8 in an fp8_e4m3fn_scaled repack (module docstring)
FP8_KINDS = frozenset({"attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
                       "ffn.w1", "ffn.w2", "ffn.w3", "audio_cross_attn.q_linear", "audio_cross_attn.kv_linear",
                       "audio_cross_attn.proj"})


def _known(param: str) -> bool:
    """Whether the naming table knows a LongCat base parameter (a Linear's or another module's weight or bias)."""
    module, leaf = naming.split_param(param)
    if leaf not in ("weight", "bias"):
        return False
    if naming.kind_of(module) is not None:
        return True
    return any(naming.param_to(param, s) != [(param, 0, 1)] for s in naming.Scheme)


def wanvideo_names(name: str, where: str) -> list[tuple[str, int, int]]:
    """The wrapper's tensor(s) for one base parameter named in any scheme: [(name, split j, of n)], the
    stored tensor's rows split into n equal parts; refuses what the table does not know or the wrapper
    cannot hold."""
    longcat, j, n = naming.param_from(name)
    if not _known(longcat):
        raise LoraError(f"{where}: tensor {q(name)} is not a parameter the naming table knows; the wrapper's "
                        f"layout has no name for it (refusing to drop it)")
    outs = naming.param_to(longcat, naming.Scheme.WANVIDEO)
    if outs is None:
        raise LoraError(f"{where}: tensor {q(name)} has no counterpart in ComfyUI-WanVideoWrapper's model (its "
                        f"loader would ignore it); refusing to drop it")
    if n == 1:
        return outs
    if len(outs) == n:  # already split the wrapper's way (FastVideo's to_q -> q ...)
        return [(outs[j][0], 0, 1)]
    raise LoraError(f"{where}: tensor {q(name)} holds part {j + 1} of {n} of {q(longcat)}, which the wrapper "
                    f"keeps whole; refusing to fuse parts")


@dataclass
class Repack:
    """The output file's entries and the jobs behind them (`plan`)."""

    entries: list[Entry] = field(default_factory=list)
    tensors_in: int = 0
    split: int = 0  # input tensors written as several
    fp8: list[Job] = field(default_factory=list)  # weights quantized to fp8
    dequantized: int = 0  # INT8 weights written as floats


def plan(b: Base, int8: dict[str, Int8Layer] | None, per_weight: dict[str, list[tuple[Target, float]]],
         dtype: str | None, fp8: bool, job: Callable[[Job], Callable[[], np.ndarray]]) -> Repack:
    """Entries of the repacked file, in BASE's order (shard by shard, tensor by tensor). `per_weight`:
    stored tensor -> its LoRA adds (targets on BASE's layers); `dtype`: the float output dtype (None:
    keep each tensor's); `fp8`: the fp8_e4m3fn_scaled repack; `job(j)` queues a pipeline job and gives its
    output's producer."""
    if dtype is None and not fp8 and int8:
        raise LoraError(f"{b.path}: INT8 weights; the wrapper cannot load them: choose a float output dtype "
                        f"(bf16, fp16, fp32) or {FP8_SCALED}")
    r = Repack()
    seen: dict[str, str] = {}
    for shard, sf in b.shards.items():
        for name in sorted(sf.keys(), key=lambda k: sf.info(k).start):
            layer = name[:-len(INT8)] if name.endswith(INT8) else None
            if name.endswith(SCALE) and int8 is not None and name[:-len(SCALE)] in int8:
                continue  # an INT8 layer's scales: consumed by its weight
            if layer is not None and int8 is not None and layer in int8:
                logical = layer + ".weight"
            else:
                logical, layer = name, None
            outs = wanvideo_names(logical, sf.path)
            r.tensors_in += 1
            r.split += len(outs) > 1
            for oname, j, n in outs:
                if oname in seen:
                    raise LoraError(f"{b.path}: tensors {q(seen[oname])} and {q(name)} both become {q(oname)} in the "
                                    f"wrapper's layout")
                seen[oname] = name
                r.entries += _outputs(b, sf, name, layer, int8, oname, j, n, per_weight.get(name, []), dtype, fp8,
                                      job, r)
    if fp8:
        r.entries.append(Entry(MARKER, E4M3.dtype, (0,), lambda: b""))
    return r


def _outputs(b: Base, sf: SafeFile, name: str, int8_layer: str | None, int8: dict[str, Int8Layer] | None,
             oname: str, j: int, n: int, adds: list[tuple[Target, float]], dtype: str | None, fp8: bool,
             job: Callable[[Job], Callable[[], np.ndarray]], r: Repack) -> list[Entry]:
    """The entries of output tensor `oname`: rows j of n of stored tensor `name` (and its scale, for fp8)."""
    info = sf.info(name)
    shape = tuple(info.shape)
    if n > 1 and (not shape or shape[0] % n):
        raise LoraError(f"{sf.path}: tensor {q(name)} {list(shape)} does not split into {n} equal row parts")
    h = shape[0] // n if shape else 0
    rows = (j * h, (j + 1) * h) if n > 1 else None
    oshape = (h, *shape[1:]) if n > 1 else shape
    module, leaf = naming.split_param(oname)
    found = naming.resolve(module)
    quantize = (fp8 and leaf == "weight" and found is not None and found.kind.kind in FP8_KINDS
                and len(oshape) == 2)
    moved = [(Target(module, t.module, t.lo + j * h, t.lo + (j + 1) * h) if rows else
              Target(module, t.module, t.lo, t.hi), s) for t, s in adds]
    scaled = None
    if int8_layer is not None:
        assert int8 is not None
        lay = int8[int8_layer]
        s_sf = b.shards[lay.s_shard]
        scaled = Scaled(s_sf, int8_layer + SCALE, ScaleLayout(oshape[0], oshape[1], 1, oshape[1], (oshape[0],)), rows)
        r.dequantized += 1
    if quantize:
        layout = ScaleLayout(oshape[0], oshape[1], oshape[0], oshape[1], ())
        jb = Job(sf, name, tuple(moved), E4M3.dtype, rows=rows, scale=scaled, fp8=Fp8Out(E4M3, layout, "F32"),
                 label=oname)
        r.fp8.append(jb)
        return [Entry(oname, E4M3.dtype, oshape, job(jb)),
                Entry(module + ".scale_weight", "F32", (), lambda jb=jb: jb.result["scale"])]
    if scaled is not None:  # INT8: dequantized to the output dtype (bf16 for fp8 repacks)
        dt = dtype or "BF16"
        return [Entry(oname, dt, oshape, job(Job(sf, name, tuple(moved), dt, rows=rows, scale=scaled, label=oname)))]
    if info.dtype not in FLOATS:
        raise LoraError(f"{sf.path}: tensor {q(name)} is {info.dtype}; the wrapper's layout takes float tensors here")
    dt = dtype or info.dtype
    if moved:
        return [Entry(oname, dt, oshape, job(Job(sf, name, tuple(moved), dt, rows=rows, label=oname)))]
    if dt == info.dtype:
        start, nbytes = sf.byte_range(name, rows)
        return [Entry(oname, dt, oshape, lambda: FileRange(sf.fd, start, nbytes, sf.path, name))]
    return [Entry(oname, dt, oshape, lambda: cast(sf, name, rows, dt))]


def cast(sf: SafeFile, name: str, rows: tuple[int, int] | None, dt: str) -> np.ndarray:
    """A float tensor (or rows of it) in dtype `dt`, each element rounded once to nearest even (float64
    inputs directly, not through float32); a finite value the dtype cannot hold is an error naming it."""
    t = sf.read(name, rows)
    if t.dtype == torch.float64 and dt != "F64":
        bits = round_f64(t.numpy().reshape(-1), dt)
        finite = np.isfinite(from_bits(bits, dt))
        out = bits.view(np.uint8)
    else:
        o = t.to(torch_dtype(dt))
        finite = torch.isfinite(o).numpy().reshape(-1)
        out = tensor_bytes(o)
    if not finite.all() and np.isfinite(t.double().numpy().reshape(-1)[~finite]).any():
        raise LoraError(f"{sf.path}: tensor {q(name)} has values {dt} cannot hold (they would become infinite)")
    return out


__all__ = ["FP8_SCALED", "FP8_KINDS", "Repack", "plan", "wanvideo_names", "cast"]
