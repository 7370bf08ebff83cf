"""ComfyUI / kohya-style LoRA file, which Wan2GP also loads.

Keys `diffusion_model.<module>.lora_down.weight` [R, in], `.lora_up.weight` [out, R] and `.alpha`
(a scalar; the scale is alpha / R), original module names. Every key ends in `.weight` or `.alpha`
(Wan2GP rejects anything else). A fused module is one LoRA with a block-diagonal up matrix.
"""

from __future__ import annotations

import re

from ..model.adapter import LoraAdapter, Naming
from ..io.reader import SafeFile
from ..io.writer import write_safetensors
from ._common import (WriteOptions, add_standard_layer, exact_dtype, finish, group_keys, metadata, scalar,
                      scalar_entry, standard_entries)
from .base import Format

NAME = "comfyui"
PREFIX = "diffusion_model."
_PATTERNS = [(re.compile(rf"^(?:{re.escape(PREFIX)})?(?P<layer>.+)\.{s}$"), role)
             for s, role in ((r"lora_down\.weight", "a"), (r"lora_up\.weight", "b"), (r"alpha", "alpha"))]


def owns_key(key: str) -> bool:
    """kohya-style suffixes (a fallback: LongCat's native keys share lora_down/lora_up but are its own)."""
    return key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))


def read(sf: SafeFile) -> LoraAdapter:
    adapter = LoraAdapter({}, NAME, sf.path, files=[sf])
    for layer, keys in group_keys(sf, _PATTERNS, "ComfyUI LoRA").items():
        alpha = scalar(sf, keys.alpha)[0] if keys.alpha else None
        add_standard_layer(adapter.modules, sf, layer, keys,
                           lambda r, alpha=alpha: 1.0 if alpha is None else alpha / r, naming_=Naming.LONGCAT)
    return finish(adapter, sf.path)


def write(adapter: LoraAdapter, path: str, opts: WriteOptions) -> None:
    entries, infos = standard_entries(adapter, opts, lambda m: f"{PREFIX}{m}.lora_down.weight",
                                      lambda m: f"{PREFIX}{m}.lora_up.weight", "ComfyUI (LongCat naming)")
    for i in infos:
        entries.append(scalar_entry(f"{PREFIX}{i.module}.alpha", i.alpha, exact_dtype(i.alpha, "F32")))
    write_safetensors(path, entries, metadata(adapter), opts.progress)


FORMAT = Format(NAME, owns_key, read, write, fallback=True)
