"""The hooked layer: how applied adapters live on one layer of a live model and enter its forward.

Each adapted layer holds, per applied adapter, its weights already cast to the layer's placement (one
stacked down matrix and one up matrix per block of output rows). A forward hook adds the *live*
adapters (enabled, not merged, non-zero strength) to the layer's output: one down product per
adapter and one in-place `addmm_` per up block, in the official dtype handling (LoRA weights in the
layer's dtype and device, the input cast to it, the result cast back). The hook is registered only
while the layer has a live adapter: a layer whose adapters are all disabled runs its own forward and
nothing else.

Also here: which modules are adaptable layers (float Linear-like or INT8) and why one is not, and
where an adapter's weights live for a layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LoraError
from ..model.adapter import Part
from .int8 import is_int8_layer


@dataclass
class Block:
    """One up block: the output rows it writes and the columns of the down output that feed it."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    up: torch.Tensor
    scale: float


@dataclass
class LayerAdapter:
    """One adapter's weights on one layer, in the layer's placement (`placement`)."""

    name: str
    down: torch.Tensor  # all parts' downs stacked: one down product
    blocks: list[Block]

    @classmethod
    def from_parts(cls, name: str, parts: list[Part], device: torch.device, dtype: torch.dtype) -> LayerAdapter:
        """Read a target's parts (rows relative to the layer) and cast them to the layer's placement."""
        downs, blocks, col = [], [], 0
        for p in parts:
            downs.append(p.down.load().to(device=device, dtype=dtype))
            blocks.append(Block(p.rows, (col, col + p.rank), p.up.load().to(device=device, dtype=dtype), p.scale))
            col += p.rank
        for t in downs + [b.up for b in blocks]:
            if not bool(torch.isfinite(t).all()):
                raise LoraError(f"{name}: the LoRA has NaN/Inf values for this layer (or values beyond "
                                f"{str(dtype).removeprefix('torch.')}); nothing was applied")
        return cls(name, torch.cat(downs, 0), blocks)


@dataclass
class HookedLayer:
    """An adapted layer: the adapters applied to it, and the live ones its forward hook adds."""

    module: nn.Module
    adapters: list[LayerAdapter] = field(default_factory=list)
    live: list[tuple[LayerAdapter, float]] = field(default_factory=list)  # (adapter, strength)
    handle: torch.utils.hooks.RemovableHandle | None = None

    def sync(self, live_strengths: dict[str, float]) -> None:
        """Make the forward add exactly the adapters named in `live_strengths` (zero strengths left
        out); register the hook when one is live, remove it when none is."""
        self.live = [(a, s) for a in self.adapters if (s := live_strengths.get(a.name, 0.0)) != 0.0]
        if self.live and self.handle is None:
            self.handle = self.module.register_forward_hook(self._hook)
        elif not self.live and self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _hook(self, module: nn.Module, args: tuple, output):
        x = args[0]
        y = output[0] if isinstance(output, tuple) else output  # FastVideo layers return (out, bias)
        out2 = y.reshape(-1, y.shape[-1])
        for a, s in self.live:
            h = x.reshape(-1, x.shape[-1]).to(a.down.dtype) @ a.down.T
            for b in a.blocks:
                hb = h[:, b.cols[0]:b.cols[1]]
                dst = out2[:, b.rows[0]:b.rows[1]]
                if b.up.dtype == y.dtype == hb.dtype:  # (autocast may have changed one of them)
                    dst.addmm_(hb, b.up.T, alpha=b.scale * s)
                else:
                    dst += (hb @ b.up.T).to(y.dtype) * (b.scale * s)
        return output


def is_float_linear(m: nn.Module) -> bool:
    """nn.Linear, and Linear-like layers such as FastVideo's ReplicatedLinear (a 2-D weight [out, in])."""
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(m, nn.Embedding)


def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's layers the runtime can adapt (float Linear-like or INT8), by name."""
    return {n: m for n, m in model.named_modules() if is_float_linear(m) or is_int8_layer(m)}


def layer_shape(m: nn.Module) -> tuple[int, int]:
    """(out, in) of an adaptable layer (float Linear-like or INT8)."""
    w = m.weight_int8 if is_int8_layer(m) else m.weight
    return tuple(w.shape)  # type: ignore[return-value]


def why_not(m: nn.Module) -> str:
    """Why the runtime cannot adapt a module that a LoRA names (it is neither a Linear-like layer with a
    2-D weight nor an INT8 layer)."""
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Embedding):
        return "an Embedding, not a Linear layer"
    if isinstance(w, torch.Tensor):
        return f"weight is {w.dim()}-D, not [out, in]"
    qw = getattr(m, "weight_int8", None)
    if qw is None:
        return "no weight and no weight_int8" if w is None else f"weight is a {type(w).__name__}, not a tensor"
    if not isinstance(qw, torch.Tensor) or qw.dtype != torch.int8 or qw.dim() != 2:
        return (f"weight_int8 is {qw.dtype} {list(qw.shape)}, not 2-D int8" if isinstance(qw, torch.Tensor)
                else f"weight_int8 is a {type(qw).__name__}, not a tensor")
    sc = getattr(m, "weight_scale", None)
    if not isinstance(sc, torch.Tensor):
        return "weight_int8 but no weight_scale tensor"
    return f"weight_scale is {sc.dtype} {list(sc.shape)}, not float32 [{qw.shape[0]}]"


def placement(model: nn.Module, module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype the LoRA weights for a layer live in: the layer's weight's, as the official
    code casts them to the model's; for an INT8 layer (no float weight), the model's dtype as the
    official `enable_loras` uses it (its first floating-point parameter; float32 if none)."""
    if not is_int8_layer(module):
        return module.weight.device, module.weight.dtype
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return module.weight_int8.device, dtype
