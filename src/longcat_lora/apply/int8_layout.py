"""The layout of LongCat's INT8 checkpoints (the official `base_model_int8/`), read before a merge writes.

An INT8 checkpoint (spec section 5) holds, per quantized Linear `<m>`, `<m>.weight_int8` (int8
[out, in]), `<m>.weight_scale` (float32 [out]) and `<m>.bias`; everything else is ordinary. A LoRA
module lands on `<m>.weight_int8` when the checkpoint has no `<m>.weight`. `scan` finds and validates
every such layer (and where its two tensors live), `check_fit` refuses a LoRA that does not fit one, and
`plain_name` gives a dequantized output's file names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import LoraError
from ..model.adapter import LoraAdapter

if TYPE_CHECKING:
    from .base_checkpoint import Base

INT8, SCALE = ".weight_int8", ".weight_scale"
QUANT_CONFIG = "quantization_config.json"
QUANT_STEM, PLAIN_STEM = "quantized_model", "diffusion_pytorch_model"


@dataclass(frozen=True)
class Int8Layer:
    """Where one quantized Linear's two tensors live."""

    name: str
    shape: tuple[int, int]
    q_shard: str
    s_shard: str


def scan(b: Base) -> dict[str, Int8Layer] | None:
    """The INT8 layers of a base checkpoint, validated; None when it has none.

    Checks every pair before anything is written: weight_int8 2-D int8, weight_scale float32 [out]
    present, every scale positive and finite (the scales are read: out x 4 bytes per layer, released
    after the check), no scale without its int8 weight, no layer with both `.weight` and `.weight_int8`.
    """
    # a `.weight_scale` beside an fp8 `.weight` is a scaled fp8 weight's (fp8.py), not an INT8 layer's
    names = [t for t in b.tensors if t.endswith(INT8) or (t.endswith(SCALE) and not _fp8_weight(b, t[:-len(SCALE)]))]
    if not names:
        return None
    layers: dict[str, Int8Layer] = {}
    for t in names:
        if t.endswith(SCALE) and t[:-len(SCALE)] + INT8 not in b.tensors:
            raise LoraError(f"{shard_path(b, t)}: tensor {t!r} has no {t[:-len(SCALE)] + INT8!r} in {b.path}")
    for t in names:
        if not t.endswith(INT8):
            continue
        m = t[:-len(INT8)]
        info = b.shards[b.tensors[t]].info(t)
        if info.dtype != "I8" or len(info.shape) != 2:
            raise LoraError(f"{shard_path(b, t)}: tensor {t!r} is {info.dtype} {list(info.shape)}; an INT8 weight "
                            f"must be 2-D I8 [out, in]")
        if m + ".weight" in b.tensors:
            raise LoraError(f"{shard_path(b, t)}: layer {m!r} has both {m + '.weight'!r} and {t!r}")
        s = m + SCALE
        if s not in b.tensors:
            raise LoraError(f"{shard_path(b, t)}: tensor {t!r} has no {s!r} in {b.path}")
        sf = b.shards[b.tensors[s]]
        sinfo = sf.info(s)
        if sinfo.dtype != "F32" or sinfo.shape != info.shape[:1]:
            raise LoraError(f"{sf.path}: tensor {s!r} is {sinfo.dtype} {list(sinfo.shape)}; the scales of "
                            f"{t!r} {list(info.shape)} must be F32 {list(info.shape[:1])}")
        scales = sf.read(s)
        bad = ~(torch.isfinite(scales) & (scales > 0))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise LoraError(f"{sf.path}: tensor {s!r} row {row} is {float(scales[row])!r}; every scale must be "
                            f"positive and finite")
        layers[m] = Int8Layer(m, info.shape, b.tensors[t], b.tensors[s])  # type: ignore[arg-type]
    return layers


def _fp8_weight(b: Base, layer: str) -> bool:
    w = layer + ".weight"
    return w in b.tensors and b.shards[b.tensors[w]].info(w).dtype in ("F8_E4M3", "F8_E5M2")


def check_fit(layers: dict[str, Int8Layer], b: Base, adapter: LoraAdapter, lora: str) -> None:
    """Refuse a LoRA module whose [out, in] does not match the INT8 layer it names."""
    for m in sorted(adapter.modules.values(), key=lambda m: m.name):
        layer = layers.get(m.name)
        if layer is not None and layer.shape != (m.out_features, m.in_features):
            t = m.name + INT8
            raise LoraError(f"{shard_path(b, t)}: tensor {t!r} is {list(layer.shape)}; LoRA {lora} module {m.name} "
                            f"needs {[m.out_features, m.in_features]}")


def shard_path(b: Base, tensor: str) -> str:
    """The file of the shard that holds `tensor` (what error messages name)."""
    return b.shards[b.tensors[tensor]].path


def plain_name(name: str) -> str:
    """Output file name of a shard or index in a dequantized checkpoint (diffusers' names)."""
    return PLAIN_STEM + name[len(QUANT_STEM):] if name.startswith(QUANT_STEM) else name


def split_name(name: str) -> tuple[str, str]:
    """(layer, ".weight_int8" | ".weight_scale") of an INT8 tensor name, or (name, "") otherwise."""
    for kind in (INT8, SCALE):
        if name.endswith(kind):
            return name[:-len(kind)], kind
    return name, ""


__all__ = ["INT8", "SCALE", "Int8Layer", "scan", "check_fit", "plain_name", "shard_path", "split_name"]
