"""The LoRA form ComfyUI's LongCat model loads: ComfyUI-WanVideoWrapper's Wan-style names, kohya keys.

`diffusion_model.<layer>.lora_down.weight` [r, in], `.lora_up.weight` [out, r] and `.alpha`, with the
wrapper's layer names (`naming.Scheme.WANVIDEO`): `blocks.N.self_attn.q` / `k` / `v` and
`cross_attn.k` / `v` are separate layers there, so each takes its rows of the fused module (its slice of
the down matrix and its own up block); `modulation.1` (adaLN) and `head.modulation.1` take the whole
down matrix and a block-diagonal up matrix. The wrapper (both its merged and its unmerged LoRA path)
applies `strength * alpha / r`, r the rows of lora_down, so alpha is written such that alpha / r is the
part's scale exactly in float64 where any float64 alpha gives it, else within one float64 ulp
(`_common.exact_alpha`; stored as float32 when that holds it, else float64). Alpha is always positive
(the wrapper reads an alpha of 0 as "no alpha" on one path): a negative scale is written as the alpha
of its magnitude on the negated up matrix (exact); a zero scale is folded into the up matrix, alpha = r.

Reading is the kohya reader's (`kohya.py`): a file with these names reads back as `wanvideo`.
`comfyui` is another name for this format (`--to comfyui`).
"""

from __future__ import annotations

from ..io.writer import write_safetensors
from ..model.adapter import LoraAdapter
from ..model.naming import Scheme
from . import kohya
from ._common import WriteOptions, exact_alpha, exact_dtype, layer_entries, metadata, scalar_entry
from .base import Format

NAME = "wanvideo"
PREFIX = "diffusion_model."


def write(adapter: LoraAdapter, path: str, opts: WriteOptions) -> None:
    entries, infos = layer_entries(adapter, opts, Scheme.WANVIDEO, lambda layer: f"{PREFIX}{layer}.lora_down.weight",
                                   lambda layer: f"{PREFIX}{layer}.lora_up.weight", exact_alpha,
                                   "ComfyUI-WanVideoWrapper's naming")
    for i in infos:
        entries.append(scalar_entry(f"{PREFIX}{i.module}.alpha", i.alpha, exact_dtype(i.alpha, "F32")))
    write_safetensors(path, entries, metadata(adapter), opts.progress)


def _owns_none(key: str) -> bool:
    return False  # its keys are kohya's: the kohya reader reads them (and reports this format's name)


FORMAT = Format(NAME, _owns_none, kohya.read, write)
