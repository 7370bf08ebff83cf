"""diffusers LoRA file: one safetensors file for `PeftAdapterMixin.load_lora_adapter(prefix="transformer")`.

Keys `transformer.<module>.lora_A.weight` / `.lora_B.weight` (original module names). diffusers ignores
`.alpha` tensors and unprefixed metadata without a word, so the scale travels in the safetensors
metadata `lora_adapter_metadata`: the LoRA config JSON with every key prefixed `transformer.`.
"""

from __future__ import annotations

import json
import re

from ..io import jsonsafe
from ..model.adapter import LoraAdapter
from ..errors import LoraError
from ..io.reader import SafeFile
from ..io.writer import write_safetensors
from ._common import (WriteOptions, add_standard_layer, finish, group_keys, metadata, peft_config, peft_scales,
                      layer_entries, standard_key)
from ._common import exact_alpha
from ..model.naming import Scheme
from .base import Format

NAME = "diffusers"
PREFIX = "transformer."
METADATA_KEY = "lora_adapter_metadata"
_PATTERNS = [(re.compile(rf"^{re.escape(PREFIX)}(?P<layer>.+)\.lora_{x}\.weight$"), role)
             for x, role in (("A", "a"), ("B", "b"))]


def owns_key(key: str) -> bool:
    return key.startswith(PREFIX) and standard_key(key)


def read(sf: SafeFile) -> LoraAdapter:
    adapter = LoraAdapter({}, NAME, sf.path, files=[sf])
    raw = sf.metadata.get(METADATA_KEY)
    if raw is None:
        config = {}
        adapter.notes.append(f"no {METADATA_KEY} metadata: scale 1 (alpha = rank), as diffusers assumes")
    else:
        meta = jsonsafe.loads(raw, sf.path, f"metadata {METADATA_KEY}")
        if not isinstance(meta, dict):
            raise LoraError(f"{sf.path}: metadata {METADATA_KEY} is not a JSON object")
        config = {k[len(PREFIX):]: v for k, v in meta.items() if k.startswith(PREFIX)}
    scale = peft_scales(config, sf.path) if config else None
    for layer, keys in group_keys(sf, _PATTERNS, "diffusers LoRA").items():
        fn = (lambda r: 1.0) if scale is None else (lambda r, layer=layer: scale(layer, r))
        add_standard_layer(adapter, sf, layer, keys, fn)
    return finish(adapter, sf.path)


def write(adapter: LoraAdapter, path: str, opts: WriteOptions) -> None:
    entries, infos = layer_entries(adapter, opts, Scheme.LONGCAT, lambda m: f"{PREFIX}{m}.lora_A.weight",
                                   lambda m: f"{PREFIX}{m}.lora_B.weight",
                                   lambda scale, rank: exact_alpha(scale, rank, positive=False),
                                   "LongCat naming")
    config = peft_config(infos)
    config.pop("peft_type")
    meta = json.dumps({PREFIX + k: v for k, v in config.items()}, sort_keys=True)
    write_safetensors(path, entries, metadata(adapter, **{METADATA_KEY: meta}), opts.progress)


FORMAT = Format(NAME, owns_key, read, write)
