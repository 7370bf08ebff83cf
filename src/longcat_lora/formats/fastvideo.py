"""FastVideo's LoRA format, as its LoRAPipeline consumes it.

Per layer (FastVideo's split names, see `naming.TABLE`): `<layer>.lora_A` [r, in], `<layer>.lora_B`
[out, r], `<layer>.lora_alpha` (float32 scalar). FastVideo's loader strips `diffusion_model.` and
`.weight`, takes rank = lora_A.shape[0], alpha = int(lora_alpha) (truncated), alpha = rank when absent,
and merges `W += strength * (alpha / rank) * B @ A` (scale 1 when int(alpha) is 0).

Writing stays exact under that loader: when scale * rank is a whole number >= 1 it is stored as
lora_alpha and the tensors are untouched; otherwise the scale is folded into lora_B (computed in float64,
stored in float32 or wider) and lora_alpha = rank. Reading applies the same semantics, truncation
included, so `verify` reports what FastVideo would actually do with a file.
"""

from __future__ import annotations

import math
import re

from ..model import naming
from ..model.adapter import LoraAdapter
from ..errors import q
from ..io.writer import write_safetensors
from ..io.dtypes import representable
from ..io.reader import SafeFile
from ._common import (WriteOptions, add_standard_layer, finish, group_keys, layer_entries, metadata, scalar,
                      scalar_entry, standard_key)
from .base import Format

NAME = "fastvideo"
_PATTERNS = [(re.compile(rf"^(?:diffusion_model\.)?(?P<layer>.+)\.{s}$"), role)
             for s, role in ((r"lora_A(?:\.weight)?", "a"), (r"lora_B(?:\.weight)?", "b"),
                             (r"lora_alpha(?:\.weight)?", "alpha"))]


def owns_key(key: str) -> bool:
    """Standard A/B/alpha keys (a fallback: those of a format with a prefix are that format's)."""
    return standard_key(key)


def loader_scale(alpha: float | None, rank: int) -> float:
    """The scale FastVideo's loader applies: int(alpha) / rank, rank if absent, 1 when int(alpha) is 0."""
    if alpha is None:
        return 1.0
    a = int(alpha)
    return a / rank if a else 1.0


def read(sf: SafeFile) -> LoraAdapter:
    adapter = LoraAdapter({}, NAME, sf.path, files=[sf])
    truncated = []
    for layer, keys in group_keys(sf, _PATTERNS, "FastVideo LoRA").items():
        alpha = scalar(sf, keys.alpha)[0] if keys.alpha else None
        if alpha is not None and alpha != int(alpha):
            truncated.append(f"{q(layer)} ({alpha:g} -> {int(alpha)})")
        add_standard_layer(adapter, sf, layer, keys, lambda rank, alpha=alpha: loader_scale(alpha, rank))
    if truncated:
        adapter.notes.append(f"{len(truncated)} layers have a non-integer lora_alpha that FastVideo's loader "
                             f"truncates, read as FastVideo applies it: e.g. {truncated[0]}")
    return finish(adapter, sf.path)


def alpha_for(scale: float, rank: int) -> float | None:
    """The lora_alpha FastVideo's loader turns into exactly `scale` (int(alpha) / rank), stored as float32;
    None when there is none (the scale is then folded into lora_B)."""
    alpha = scale * rank
    if (math.isfinite(alpha) and alpha == int(alpha) and int(alpha) != 0 and int(alpha) / rank == scale
            and representable(alpha, "F32")):
        return alpha
    return None


def write(adapter: LoraAdapter, path: str, opts: WriteOptions) -> None:
    out, infos = layer_entries(adapter, opts, naming.Scheme.FASTVIDEO, lambda layer: f"{layer}.lora_A",
                               lambda layer: f"{layer}.lora_B", alpha_for, "FastVideo's naming")
    alphas = [scalar_entry(f"{i.module}.lora_alpha", i.alpha, "F32") for i in infos]
    write_safetensors(path, out + alphas, metadata(adapter), opts.progress)


FORMAT = Format(NAME, owns_key, read, write, fallback=True)
