"""DiffSynth-Studio's LoRA files (read only): PEFT layers saved from the pipeline's DiT.

Its LongCat-Video trainer injects PEFT adapters into the DiT and saves the trainable tensors with the
pipeline prefix `pipe.dit.` removed: `blocks.0.attn.qkv.lora_A.default.weight` [r, in] and
`lora_B.default.weight` [out, r] (LongCat's names; `default` is the PEFT adapter's name), no alpha
(its lora_alpha is the rank: scale 1), metadata `{"format": "pt"}`. Read here: that form, with any
adapter name (the same on every tensor) or none, behind an optional `pipe.dit.` / `dit.` (or
`diffusion_model.`, `transformer.`, `base_model.model.`) prefix, and behind `pipe.dit.` / `dit.` an
optional `<layer>.alpha` (scale alpha / rank, as DiffSynth's loader applies it; a bare `<layer>.alpha` key
is kohya's, so a file mixing it with adapter-name segments is refused as two formats). A fused module is one LoRA of rank n*r; its lora_B is
split into its diagonal blocks where it is block-diagonal (`layout.split_diagonal`).

There is no writer: DiffSynth-Studio's loader applies `--to kohya` files exactly (see kohya.py).
"""

from __future__ import annotations

import re

from ..errors import LoraError
from ..io.reader import SafeFile
from ..model.adapter import LoraAdapter
from ._common import StdKeys, add_standard_layer, finish
from .base import Format
from .kohya import alpha_scale

NAME = "diffsynth"
PREFIXES = ("pipe.dit.", "dit.", "diffusion_model.", "transformer.", "base_model.model.")
_AB = re.compile(r"^(?P<layer>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_OWN_PREFIX = ("pipe.dit.", "dit.")


def owns_key(key: str) -> bool:
    """A/B keys with an adapter-name segment (`.lora_A.default.weight`), and A/B or alpha keys behind
    DiffSynth's pipeline prefixes (`pipe.dit.`, `dit.`)."""
    m = _AB.match(key)
    if m is not None and m.group("adapter") is not None:
        return True
    return key.startswith(_OWN_PREFIX) and (m is not None or key.endswith(".alpha"))


def _strip(key: str) -> str:
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def read(sf: SafeFile) -> LoraAdapter:
    layers: dict[str, StdKeys] = {}
    segment: tuple[str | None, str] | None = None  # (adapter name, the first key that shows it)
    for key in sf.keys():
        name = _strip(key)
        m = _AB.match(name)
        if m is not None:
            if segment is None:
                segment = (m.group("adapter"), key)
            elif segment[0] != m.group("adapter"):
                raise LoraError(f"{sf.path}: tensor {key!r} belongs to adapter {m.group('adapter')!r} but "
                                f"{segment[1]!r} to {segment[0]!r}: one adapter per file")
            layer, role = m.group("layer"), "a" if m.group("ab") == "A" else "b"
        elif name.endswith(".alpha"):
            layer, role = name[:-len(".alpha")], "alpha"
        else:
            raise LoraError(f"{sf.path}: unexpected tensor {key!r} in a DiffSynth-Studio LoRA file")
        keys = layers.setdefault(layer, StdKeys())
        if getattr(keys, role) is not None:
            raise LoraError(f"{sf.path}: tensors {getattr(keys, role)!r} and {key!r} give the same matrix of layer "
                            f"{layer!r}")
        setattr(keys, role, key)
    adapter = LoraAdapter({}, NAME, sf.path, files=[sf])
    for layer, keys in layers.items():
        if keys.a is None or keys.b is None:
            raise LoraError(f"{sf.path}: layer {layer!r} has no {'lora_A' if keys.a is None else 'lora_B'} matrix")
        add_standard_layer(adapter, sf, layer, keys, alpha_scale(sf, keys.alpha, layer))
    if segment is not None and segment[0] is not None:
        adapter.hints["adapter"] = segment[0]
    return finish(adapter, sf.path)


FORMAT = Format(NAME, owns_key, read, None)
