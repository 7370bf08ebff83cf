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
from ..model.adapter import LoraAdapter, Naming
from ..model.layout import standard_layer
from ..model.sources import folded
from ..errors import LoraError, q
from ..io.writer import Entry, write_safetensors
from ..io.dtypes import representable
from ..io.reader import SafeFile
from ._common import (WriteOptions, add_standard_layer, entry, finish, group_keys, in_file_order, metadata, scalar,
                      scalar_entry, standard_key, unmapped)
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
        add_standard_layer(adapter.modules, sf, layer, keys,
                           lambda rank, alpha=alpha: loader_scale(alpha, rank), naming_=Naming.FASTVIDEO)
    if truncated:
        adapter.notes.append(f"{len(truncated)} layers have a non-integer lora_alpha that FastVideo's loader "
                             f"truncates, read as FastVideo applies it: e.g. {truncated[0]}")
    return finish(adapter, sf.path)


def write(adapter: LoraAdapter, path: str, opts: WriteOptions) -> None:
    out: list[Entry] = []
    alphas: list[Entry] = []
    todo = []
    missing = []
    for m in in_file_order(adapter):
        layers = (m.name,) if m.naming is Naming.FASTVIDEO else naming.layers(m.name, naming.Scheme.FASTVIDEO)
        if layers is None:
            missing.append(m.name)
        else:
            todo.append((m, layers))
    unmapped(missing, opts, "FastVideo's naming")
    for m, layers in todo:
        if m.out_features % len(layers):
            raise LoraError(f"module {q(m.name)}: {m.out_features} outputs do not split into {len(layers)} "
                            f"FastVideo layers")
        h = m.out_features // len(layers)
        a_entries, b_entries = [], []
        for j, layer in enumerate(layers):
            std = standard_layer(m, j * h, (j + 1) * h)
            if std is None:
                continue
            rank, b = std.rank, std.b
            alpha = std.scale * rank
            if not (math.isfinite(alpha) and alpha == int(alpha) and int(alpha) != 0
                    and int(alpha) / rank == std.scale and representable(alpha, "F32")):  # stored as F32
                b, alpha = folded(b, std.scale), float(rank)
            a_entries.append(entry(f"{layer}.lora_A", std.a, opts, m.name))
            b_entries.append(entry(f"{layer}.lora_B", b, opts, m.name))
            alphas.append(scalar_entry(f"{layer}.lora_alpha", alpha, "F32"))
        out += a_entries + b_entries
    write_safetensors(path, out + alphas, metadata(adapter), opts.progress)


FORMAT = Format(NAME, owns_key, read, write, fallback=True)
