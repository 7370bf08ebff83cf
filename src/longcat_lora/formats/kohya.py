"""kohya-style LoRA files: `lora_down` / `lora_up` / `alpha`, as ComfyUI, Wan2GP, musubi-tuner and
diffusion-pipe write and load them.

Writing (`--to kohya`): `diffusion_model.<module>.lora_down.weight` [R, in], `.lora_up.weight` [out, R]
and `.alpha` (a scalar; the scale is alpha / R), LongCat's original module names, every key ending in
`.weight` or `.alpha` (Wan2GP rejects anything else). A fused module is one LoRA with a block-diagonal up
matrix. DiffSynth-Studio's LoRA loader applies these files exactly (it scales the down matrix by
alpha / R), and so do Wan2GP and kohya-style loaders for the official model. ComfyUI's LongCat model
(ComfyUI-WanVideoWrapper) names the fused modules otherwise: write `--to wanvideo` for it.

Reading: the same keys with an optional `diffusion_model.` or `transformer.` prefix, or kohya's
underscore names (`lora_unet_blocks_0_attn_qkv`, musubi-tuner's form), resolved against the naming
table's modules, never by guessing where the dots were. Module names in any scheme of the table are
recognised (the wrapper's Wan-style names too, as diffusion-pipe writes them: such a file is reported as
`wanvideo`). The scale is alpha / rank, 1 without an alpha; an alpha that is zero, negative or not finite
is refused.
"""

from __future__ import annotations

import re

from ..errors import LoraError, q
from ..io.reader import SafeFile
from ..io.writer import write_safetensors
from ..model.adapter import LoraAdapter
from ..model.naming import Scheme
from ._common import (WriteOptions, add_standard_layer, exact_alpha, exact_dtype, finish, group_keys, layer_entries,
                      metadata, scalar, scalar_entry)
from .base import Format

NAME = "kohya"
PREFIX = "diffusion_model."
UNDERSCORED = "lora_unet_"
_PATTERNS = [(re.compile(rf"^(?:diffusion_model\.|transformer\.)?(?P<layer>.+)\.{s}$"), role)
             for s, role in ((r"lora_down\.weight", "a"), (r"lora_up\.weight", "b"), (r"alpha", "alpha"))]


def owns_key(key: str) -> bool:
    """kohya-style suffixes (a fallback: LongCat's native keys share lora_down/lora_up but are its own)."""
    return key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))


def alpha_scale(sf: SafeFile, key: str | None, layer: str):
    """rank -> alpha / rank (1 without an alpha); refuses an alpha that is zero, negative or not finite."""
    if key is None:
        return lambda r: 1.0
    alpha = scalar(sf, key)[0]  # (scalar refuses non-finite values)
    if not alpha > 0:
        raise LoraError(f"{sf.path}: tensor {key!r}: alpha {alpha:g} of layer {q(layer)} must be positive")
    return lambda r: alpha / r


def read(sf: SafeFile) -> LoraAdapter:
    adapter = LoraAdapter({}, NAME, sf.path, files=[sf])
    for layer, keys in group_keys(sf, _PATTERNS, "kohya-style LoRA").items():
        underscored = layer.startswith(UNDERSCORED)
        add_standard_layer(adapter, sf, layer.removeprefix(UNDERSCORED) if underscored else layer, keys,
                           alpha_scale(sf, keys.alpha, layer), underscored)
    if adapter.schemes.get("wanvideo"):
        adapter.format = "wanvideo"
    return finish(adapter, sf.path)


def write(adapter: LoraAdapter, path: str, opts: WriteOptions) -> None:
    # alpha / rank == scale exactly, alpha > 0 (an alpha of 0 means "no alpha" to some loaders, and this reader
    # refuses alphas <= 0); otherwise the scale goes into the up matrix (see layer_entries)
    entries, infos = layer_entries(adapter, opts, Scheme.LONGCAT, lambda m: f"{PREFIX}{m}.lora_down.weight",
                                   lambda m: f"{PREFIX}{m}.lora_up.weight", exact_alpha, "LongCat naming")
    for i in infos:
        entries.append(scalar_entry(f"{PREFIX}{i.module}.alpha", i.alpha, exact_dtype(i.alpha, "F32")))
    write_safetensors(path, entries, metadata(adapter), opts.progress)


FORMAT = Format(NAME, owns_key, read, write, fallback=True)
