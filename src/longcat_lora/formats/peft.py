"""PEFT adapter directory: `adapter_model.safetensors` + `adapter_config.json`, original module names.

Keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`; the scale is lora_alpha / r from the
config, with `rank_pattern` / `alpha_pattern` keyed by full module paths (PEFT matches them as regex
suffixes, so short keys would also hit other modules). A fused module with several up blocks is one
LoRA of the summed rank with a block-diagonal lora_B.
"""

from __future__ import annotations

import json
import os
import re

from ..io import jsonsafe
from ..model.adapter import LoraAdapter
from ..errors import LoraError
from ..io.reader import SafeFile
from ..io.outputs import dir_problem
from ..io.writer import write_safetensors
from ._common import (WriteOptions, add_standard_layer, finish, group_keys, metadata, peft_config, peft_scales,
                      layer_entries, standard_key)
from ._common import exact_alpha
from ..model.naming import Scheme
from .base import Format

NAME = "peft"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
_PATTERNS = [(re.compile(rf"^{re.escape(PREFIX)}(?P<layer>.+)\.lora_{x}\.weight$"), role)
             for x, role in (("A", "a"), ("B", "b"))]


def paths(path: str) -> tuple[str, str] | None:
    """(weights, config) if `path` is a PEFT adapter directory or the weights file inside one."""
    d = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isfile(path) and os.path.basename(path) != WEIGHTS:
        return None
    if os.path.isfile(os.path.join(d, CONFIG)):
        return os.path.join(d, WEIGHTS), os.path.join(d, CONFIG)
    return None


def owns_path(path: str) -> str | None:
    """The weights file of a PEFT adapter directory (one with an adapter config), None for another directory."""
    found = paths(path)
    if found is None:
        return None
    if not os.path.isfile(found[0]):
        raise LoraError(f"{os.path.dirname(found[0])}: PEFT adapter directory has no {WEIGHTS}")
    return found[0]


def owns_key(key: str) -> bool:
    return key.startswith(PREFIX) and standard_key(key)


def replaceable(path: str) -> str | None:
    """Why an existing directory is not an earlier PEFT output (None if it is): `overwrite=True` replaces
    only a directory holding the adapter's two files (and PEFT's own README.md), all regular files."""
    return dir_problem(path, {n: "a regular file" for n in (WEIGHTS, CONFIG, "README.md")}, {WEIGHTS, CONFIG})


def read_config(path: str) -> dict:
    """The adapter config as a dict, read through `jsonsafe` (bounded, strict, one-line errors)."""
    config = jsonsafe.load_file(path, "the adapter config")
    if not isinstance(config, dict):
        raise LoraError(f"{path}: the adapter config is not a JSON object")
    return config


def read(sf: SafeFile) -> LoraAdapter:
    found = paths(sf.path)
    if found is None:
        raise LoraError(f"{sf.path}: PEFT weights without an {CONFIG} beside them")
    config_path = found[1]
    scale = peft_scales(read_config(config_path), config_path)
    adapter = LoraAdapter({}, NAME, os.path.dirname(sf.path), files=[sf])
    for layer, keys in group_keys(sf, _PATTERNS, "PEFT adapter").items():
        if keys.alpha is not None:
            raise LoraError(f"{sf.path}: unexpected tensor {keys.alpha!r}")
        add_standard_layer(adapter, sf, layer, keys, lambda r, layer=layer: scale(layer, r))
    return finish(adapter, sf.path)


def write(adapter: LoraAdapter, path: str, opts: WriteOptions) -> None:
    entries, infos = layer_entries(adapter, opts, Scheme.LONGCAT, lambda m: f"{PREFIX}{m}.lora_A.weight",
                                   lambda m: f"{PREFIX}{m}.lora_B.weight",
                                   lambda scale, rank: exact_alpha(scale, rank, positive=False),
                                   "LongCat naming")
    write_safetensors(os.path.join(path, WEIGHTS), entries, metadata(adapter), opts.progress)
    with open(os.path.join(path, CONFIG), "w", encoding="utf-8") as f:
        json.dump(peft_config(infos), f, indent=2)
        f.write("\n")


FORMAT = Format(NAME, owns_key, read, write, directory=True, owns_path=owns_path,
                describe=f"a PEFT adapter (no {CONFIG})", replaceable=replaceable)
