"""Weight changes folded into a live model's layers, and the original weights kept to restore them.

A float layer's weight becomes `W + sum strength * scale * up @ down`, each element the correctly
rounded value of that exact sum in W's dtype (exact.py): the same bytes on every machine and device.
An INT8 layer's weight is `weight_int8 * weight_scale` plus the change, correctly rounded to float32,
then requantized per row with the official scheme (a new scale per row); the requantization error
against that merged weight is reported. Every update is computed before any weight is written, and the
first fold of a layer keeps its original tensors so that `restore` puts them back bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LoraError
from ..io.dtypes import dtype_name
from .exact import FMTS, ExactMerge, NotFinite, Scratch, Term
from .int8 import is_int8_layer, quantize_rows, requant_error

CHUNK_ELEMENTS = 1 << 20  # float64 elements computed at a time

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
    against the exact merged weight `dequant(W) + strength * dW` (fp32). In float layers each element is
    the correctly rounded value of the exact sum (`apply/exact.py`); they are not listed in
    `requantized`."""

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


def plan(layer: str, module: nn.Module, terms: list[Term], report: MergeReport) -> Update:
    """The update adding `terms` (strengths included) to a float or INT8 layer; records the layer (and an
    INT8 layer's requantization error) in `report`. Writes nothing."""
    int8 = is_int8_layer(module)
    if int8:
        q0, s0 = module.weight_int8.detach(), module.weight_scale.detach()
        rows, cols = q0.shape
        device, dtype = q0.device, "F32"
        s64 = s0.double()

        def base_rows(r0: int, r1: int) -> torch.Tensor:  # q * s: exact in float64
            return q0[r0:r1].double().mul_(s64[r0:r1, None])

        def base_at(r, c):
            rr, cc = torch.from_numpy(r).to(device), torch.from_numpy(c).to(device)
            return (q0[rr, cc].double() * s64[rr]).cpu().numpy()
    else:
        w = module.weight.detach()
        rows, cols = w.shape
        device, dtype = w.device, dtype_name(w.dtype)
        if dtype not in FMTS:
            raise LoraError(f"{layer}: cannot merge into a {dtype} weight (bf16, fp16, fp32 or fp64 only)")

        def base_rows(r0: int, r1: int) -> torch.Tensor:
            return w[r0:r1].double()

        def base_at(r, c):
            rr, cc = torch.from_numpy(r).to(device), torch.from_numpy(c).to(device)
            return w[rr, cc].double().cpu().numpy()
    new = torch.empty(rows, cols, dtype=torch.float32 if int8 else w.dtype, device=device)
    merge = ExactMerge(terms, rows, cols, dtype, device=device)
    step, scratch = max(1, CHUNK_ELEMENTS // max(cols, 1)), Scratch()
    try:
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            merge.chunk(base_rows(r0, r1), r0, r1, new[r0:r1], base_at, scratch)
    except NotFinite:
        raise LoraError(f"{layer}: merging gives non-finite values (NaN/Inf in the LoRA, or a result beyond "
                        f"{'float32' if int8 else str(w.dtype).removeprefix('torch.')}); nothing was merged") from None
    report.layers.append(layer)
    if int8:
        q, sc = quantize_rows(new)
        report.requantized[layer] = RequantError(*requant_error(new, q, sc))
        return Update(layer, (module.weight_int8, module.weight_scale), (q, sc))
    return Update(layer, (module.weight,), (new,))


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
