"""Weight changes folded into a live model's layers, and the original weights kept to restore them.

A float layer's weight becomes `(W.float() + dW).to(W.dtype)`: the change added in fp32 and cast
once. An INT8 layer's weight is dequantized, the change added in fp32 and the result requantized per
row with the official scheme (a new scale per row); the requantization error against the exact
merged weight is reported. Every update is computed before any weight is written, and the first
fold of a layer keeps its original tensors so that `restore` puts them back bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LoraError
from .int8 import dequantize, is_int8_layer, quantize_rows, requant_error

# a layer's weights before any merge: (weight,) or (weight_int8, weight_scale) of an INT8 layer
Originals = dict[str, tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class RequantError:
    """How far a requantized INT8 weight is from the exact merged weight (`int8.requant_error`)."""

    rel_frobenius: float  # ||dequant(q, scale) - exact|| / ||exact||
    worst_steps: float  # worst |element error| in units of its row's quantization step (<= 0.5)


@dataclass
class MergeReport:
    """What `merge_lora` did: the layers it changed, and for each INT8 layer the requantization error
    against the exact merged weight `dequant(W) + strength * dW` (fp32). Float layers are cast once
    from fp32 to their dtype and are not listed in `requantized`."""

    layers: list[str] = field(default_factory=list)
    requantized: dict[str, RequantError] = field(default_factory=dict)

    def worst(self) -> tuple[str, RequantError] | None:
        """The INT8 layer with the largest relative error (None if no INT8 layer was merged)."""
        if not self.requantized:
            return None
        layer = max(self.requantized, key=lambda k: (self.requantized[k].rel_frobenius, k))
        return layer, self.requantized[layer]

    def worst_steps(self) -> float:
        """The largest element error over every requantized layer, in quantization steps (0 if none)."""
        return max((e.worst_steps for e in self.requantized.values()), default=0.0)


@dataclass
class Update:
    """New values for one layer's weight tensors (`dsts`, written in place by `write`)."""

    layer: str
    dsts: tuple[torch.Tensor, ...]
    news: tuple[torch.Tensor, ...]


def plan(layer: str, module: nn.Module, delta: torch.Tensor, report: MergeReport) -> Update:
    """The update adding `delta` (float32 [out, in], strength included) to a float or INT8 layer;
    records the layer (and an INT8 layer's requantization error) in `report`. Writes nothing."""
    if not bool(torch.isfinite(delta).all()):
        raise LoraError(f"{layer}: the weight change to merge has non-finite values (NaN/Inf in the LoRA, or a "
                        f"strength too large for float32); nothing was merged")
    report.layers.append(layer)
    if is_int8_layer(module):
        q0, s0 = module.weight_int8, module.weight_scale
        exact = dequantize(q0.detach(), s0.detach()) + delta.to(q0.device)
        q, sc = quantize_rows(exact)
        report.requantized[layer] = RequantError(*requant_error(exact, q, sc))
        return Update(layer, (q0, s0), (q, sc))
    w = module.weight
    new = (w.detach().float() + delta.to(w.device)).to(w.dtype)
    if not bool(torch.isfinite(new).all()) and bool(torch.isfinite(w).all()):
        raise LoraError(f"{layer}: merging overflows {str(w.dtype).removeprefix('torch.')}; nothing was merged")
    return Update(layer, (w,), (new,))


def write(updates: list[Update], originals: Originals) -> None:
    """Write every update in place, keeping each layer's tensors before its first change."""
    with torch.no_grad():
        for u in updates:
            if u.layer not in originals:
                originals[u.layer] = tuple(d.detach().clone() for d in u.dsts)
            for d, new in zip(u.dsts, u.news):
                d.copy_(new)


def restore(model: nn.Module, originals: Originals) -> None:
    """Put every kept original back, bit for bit, and forget them."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for layer, tensors in originals.items():
            m = modules[layer]
            dsts = (m.weight_int8, m.weight_scale) if is_int8_layer(m) else (m.weight,)
            for d, t in zip(dsts, tensors):
                d.copy_(t)
    originals.clear()
