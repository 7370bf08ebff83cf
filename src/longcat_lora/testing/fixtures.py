"""Generate full-structure LongCat native LoRA files (the published key sets) for tests and benchmarks.

Files are generated on demand, never committed. Tensors are written one at a time, so a full-size
1.6 GB refinement file is produced with bounded memory. Values are seeded per tensor and deterministic.
"""

from __future__ import annotations

import math
import zlib

import torch

from ..model import naming
from ..model.naming import DitDims
from ..formats.longcat import encode
from ..io.writer import Entry, write_safetensors
from ..io.dtypes import dtype_name, tensor_bytes


def layout_kinds(layout: str) -> frozenset[str]:
    """The module kinds of a layout: the published cfg_step and refinement files, and avatar (cfg_step's
    kinds plus every Avatar audio kind in the naming table)."""
    if layout == "avatar":
        return naming.CFG_STEP_KINDS | naming.avatar_kinds()
    return {"cfg_step": naming.CFG_STEP_KINDS, "refinement": naming.REFINEMENT_KINDS}[layout]


def native_modules(layout: str, dims: DitDims) -> list[tuple[str, int, int, int]]:
    """(module, out, in, up blocks) for every module of a layout, in file order; shapes and up blocks
    from the naming table."""
    kinds = layout_kinds(layout)
    out = []
    for i in range(dims.depth):
        for k in naming.TABLE:
            if k.per_block and k.kind in kinds:
                out.append((k.longcat.format(i=i), *k.shape(dims), k.chunks))
    for k in naming.TABLE:
        if not k.per_block and k.kind in kinds:
            out.append((k.longcat, *k.shape(dims), k.chunks))
    return out


def _random(key: str, shape: tuple, dtype: torch.dtype, seed: int, std: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()) ^ seed)
    return (torch.randn(shape, generator=g, dtype=torch.float32) * std).to(dtype)


def native_entries(layout: str = "refinement", dims: DitDims = naming.OFFICIAL, rank: int = 128,
                   dtype: torch.dtype = torch.bfloat16, alpha_scale: float | None = 0.5,
                   scale_dtype: torch.dtype | None = None, seed: int = 0) -> list[Entry]:
    """Entries of a native LoRA file: lora_down, lora_up(.blocks.i), alpha_scale per module."""
    entries = []
    for module, out, inp, n in native_modules(layout, dims):
        base = encode(module)

        def mk(key: str, shape: tuple[int, int], std: float) -> Entry:
            return Entry(key, dtype_name(dtype), shape, lambda: tensor_bytes(_random(key, shape, dtype, seed, std)))

        entries.append(mk(f"{base}.lora_down.weight", (n * rank, inp), inp ** -0.5))
        if n == 1:
            entries.append(mk(f"{base}.lora_up.weight", (out, rank), 0.02))
        else:
            entries += [mk(f"{base}.lora_up.blocks.{i}.weight", (out // n, rank), 0.02) for i in range(n)]
        if alpha_scale is not None:
            sd = scale_dtype or dtype
            entries.append(Entry(f"{base}.alpha_scale", dtype_name(sd), (),
                                 lambda sd=sd: tensor_bytes(torch.tensor(alpha_scale, dtype=sd))))
    return entries


def write_native_lora(path: str, layout: str = "refinement", **kwargs) -> str:
    """Write a full-structure native LoRA (1,152 keys for cfg_step, 1,543 for refinement at depth 48)."""
    write_safetensors(path, native_entries(layout, **kwargs), {"format": "pt"})
    return path


def base_value(name: str, shape: tuple, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A base checkpoint tensor's fixture value: norm weights 1, everything else random (std 0.02), seeded
    by its LongCat name, so one model has the same values in every layout written here."""
    ones = name.endswith("norm.weight") or name.endswith("norm_cross.weight") or "_norm." in name
    if ones and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype)
    return _random(name, shape, dtype, seed)


def official_specs(config, naming_: str = "longcat", audio_prenorm: bool = False) -> list[tuple[str, tuple]]:
    """(name, shape) of every tensor of a reference DiT (`dit.DiTConfig`; an `AvatarConfig` for "avatar"),
    in state-dict order: LongCat's names ("longcat"), FastVideo's ("fastvideo") or LongCat-Video-Avatar's
    ("avatar": the official Avatar block's `pre_video_crs_attn_norm` affine LayerNorm too, and its
    optional `pre_audio_crs_attn_norm` with audio_prenorm)."""
    from .dit import LongCatAvatarDiT, LongCatDiT, LongCatDiTSplit

    cls = {"longcat": LongCatDiT, "fastvideo": LongCatDiTSplit, "avatar": LongCatAvatarDiT}[naming_]
    with torch.device("meta"):
        model = cls(config)
    specs = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
    if naming_ == "avatar":
        extra = [(f"blocks.{i}.pre_video_crs_attn_norm.{leaf}", (config.hidden_size,))
                 for i in range(config.depth) for leaf in ("weight", "bias")]
        if audio_prenorm:
            extra += [(f"blocks.{i}.pre_audio_crs_attn_norm.{leaf}", (config.audio_dim,))
                      for i in range(config.depth) for leaf in ("weight", "bias")]
        specs += extra
    return specs


def write_base_checkpoint(path: str, config, naming_: str = "longcat", shards: int = 2,
                          dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                          index_name: str = "diffusion_pytorch_model.safetensors.index.json",
                          audio_prenorm: bool = False) -> str:
    """A sharded base checkpoint of a reference DiT (`dit.DiTConfig`), in either naming (or "avatar":
    LongCat-Video-Avatar's official tensors, `official_specs`), streamed.

    Tensors are random (std 0.02, norms 1) and written one at a time; shards split by size like
    diffusers' `save_pretrained` (`...-0000k-of-0000n.safetensors` plus an index and config.json).
    """
    import json
    import math
    import os

    os.makedirs(path, exist_ok=True)
    specs = official_specs(config, naming_, audio_prenorm)
    total = sum(math.prod(s) for _, s in specs) * torch.empty((), dtype=dtype).element_size()
    per_shard = total / shards
    groups: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if groups[-1] and size + nbytes > per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append((name, shape))
        size += nbytes
    stem = index_name.removesuffix(".index.json").removesuffix(".safetensors")
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"{stem}-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        entries = []
        for name, shape in group:
            weight_map[name] = fname
            entries.append(Entry(name, dtype_name(dtype), shape,
                                 lambda name=name, shape=shape: tensor_bytes(base_value(name, shape, dtype, seed))))
        write_safetensors(os.path.join(path, fname), entries, {"format": "pt"})
    with open(os.path.join(path, index_name), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "LongCatVideoTransformer3DModel", "hidden_size": config.hidden_size,
                   "depth": config.depth, "num_heads": config.num_heads}, f, indent=2)
    return path


# the wrapper-style fixtures' fp8 weights: the block attention / FFN Linears (those an fp8_e4m3fn_scaled
# repack quantizes: apply/repack.py FP8_KINDS)
FP8_FIXTURE_KINDS = frozenset({"attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear",
                               "cross_attn.proj", "ffn.w1", "ffn.w2", "ffn.w3", "audio_cross_attn.q_linear",
                               "audio_cross_attn.kv_linear", "audio_cross_attn.proj"})


def _fp8_scale_shape(kind: str, out: int, inp: int, block: int) -> tuple[int, ...]:
    return {"tensor": (), "tensor1": (1,), "row": (out,), "row2d": (out, 1),
            "block": (out // block, inp // block)}[kind]


def fp8_quantize(w: torch.Tensor, scale_shape: tuple[int, ...], fmt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixture's fp8 weight: per block of the scale's shape, scale = absmax / the format's max (1 for a
    zero block), float32, and the codes torch's cast gives (not the library's quantizer)."""
    out, inp = w.shape
    fmax = torch.finfo(fmt).max
    if len(scale_shape) == 2 and math.prod(scale_shape) > 1:
        R, C = scale_shape
        blocks = w.float().abs().view(R, out // R, C, inp // C).amax(dim=(1, 3))
    elif scale_shape == (out,):
        blocks = w.float().abs().amax(dim=1).view(out, 1)
    else:
        blocks = w.float().abs().amax().view(1, 1)
    s = torch.where(blocks > 0, blocks / fmax, torch.ones_like(blocks))
    R, C = s.shape
    full = s.repeat_interleave(out // R, 0).repeat_interleave(inp // C, 1)
    q = (w.float() / full).clamp(-fmax, fmax).to(fmt)
    return q, s.reshape(scale_shape).contiguous()


def wanvideo_tensors(config, naming_: str = "longcat", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     fp8: str | None = None, scale: str = "tensor", scale_name: str = "scale_weight",
                     block: int = 16, marker: bool = True) -> list[Entry]:
    """Entries of the same model as `write_base_checkpoint` (same values), in ComfyUI-WanVideoWrapper's
    layout: every tensor renamed and split by the naming table (`naming.param_to`). With `fp8`
    ("e4m3fn" or "e5m2") the weights of FP8_FIXTURE_KINDS are quantized (`fp8_quantize`, from float32
    values) with a scale of kind `scale` (tensor, tensor1, row, row2d, block) named `<m>.<scale_name>`,
    plus the `scaled_fp8` marker (when `marker`)."""
    fmt = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, None: None}[fp8]
    entries: list[Entry] = []
    for name, shape in official_specs(config, naming_):
        outs = naming.param_to(name, naming.Scheme.WANVIDEO)
        assert outs is not None, name
        for oname, j, n in outs:
            h = shape[0] // n
            oshape = (h, *shape[1:])
            module, leaf = naming.split_param(oname)
            found = naming.resolve(module)
            quantized = (fmt is not None and leaf == "weight" and found is not None
                         and found.kind.kind in FP8_FIXTURE_KINDS)

            def value(name=name, shape=shape, j=j, h=h, d=dtype) -> torch.Tensor:
                return base_value(name, shape, d, seed)[j * h:(j + 1) * h]

            if not quantized:
                entries.append(Entry(oname, dtype_name(dtype), oshape, lambda v=value: tensor_bytes(v())))
                continue
            sshape = _fp8_scale_shape(scale, *oshape, block)

            def pair(v=value, sshape=sshape) -> tuple[torch.Tensor, torch.Tensor]:
                return fp8_quantize(v(d=torch.float32), sshape, fmt)

            entries.append(Entry(oname, dtype_name(fmt), oshape, lambda p=pair: tensor_bytes(p()[0])))
            entries.append(Entry(f"{module}.{scale_name}", "F32", sshape, lambda p=pair: tensor_bytes(p()[1])))
    if fmt is not None and marker:
        entries.append(Entry("scaled_fp8", dtype_name(fmt), (0,), lambda: b""))
    return entries


def write_wanvideo_checkpoint(path: str, config, **kwargs) -> str:
    """One safetensors file in the wrapper's layout (`wanvideo_tensors`)."""
    write_safetensors(path, wanvideo_tensors(config, **kwargs), {"format": "pt"})
    return path
