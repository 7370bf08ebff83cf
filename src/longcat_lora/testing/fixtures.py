"""Generate full-structure LongCat native LoRA files (the published key sets) for tests and benchmarks.

Files are generated on demand, never committed. Tensors are written one at a time, so a full-size
1.6 GB refinement file is produced with bounded memory. Values are seeded per tensor and deterministic.
"""

from __future__ import annotations

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


def write_base_checkpoint(path: str, config, naming_: str = "longcat", shards: int = 2,
                          dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                          index_name: str = "diffusion_pytorch_model.safetensors.index.json") -> str:
    """A sharded base checkpoint of a reference DiT (`dit.DiTConfig`), in either naming, streamed.

    Tensors are random (std 0.02, norms 1) and written one at a time; shards split by size like
    diffusers' `save_pretrained` (`...-0000k-of-0000n.safetensors` plus an index and config.json).
    """
    import json
    import math
    import os

    from .dit import LongCatDiT, LongCatDiTSplit

    os.makedirs(path, exist_ok=True)
    with torch.device("meta"):
        model = (LongCatDiT if naming_ == "longcat" else LongCatDiTSplit)(config)
    specs = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
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
            ones = name.endswith("norm.weight") or name.endswith("norm_cross.weight") or "_norm." in name
            entries.append(Entry(name, dtype_name(dtype), shape,
                                 lambda name=name, shape=shape, ones=ones: tensor_bytes(
                                     torch.ones(shape, dtype=dtype) if ones and name.endswith("weight")
                                     else _random(name, shape, dtype, seed))))
        write_safetensors(os.path.join(path, fname), entries, {"format": "pt"})
    with open(os.path.join(path, index_name), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "LongCatVideoTransformer3DModel", "hidden_size": config.hidden_size,
                   "depth": config.depth, "num_heads": config.num_heads}, f, indent=2)
    return path

