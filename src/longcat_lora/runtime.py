"""Apply LoRAs to a live PyTorch model, in LongCat's naming or FastVideo's, from any format.

Adapters are injected with forward hooks, so the model's modules and state_dict never change while
they are active. Per adapted layer and adapter the forward does one down product and one up product
per up block, added in place into the layer's output rows (`addmm_`), in the official dtype handling:
LoRA weights live in the layer's dtype and device, the input is cast to it and the result cast back.
Several adapters may be active at once; their outputs add, as with the official `enable_loras`.

`merge_lora` folds a weight change into the weights (fp32, cast once); `unmerge_lora` restores the
original weights bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import LoraAdapter
from .errors import LoraError
from .formats import load_lora
from .targets import Target, find_targets

_STATE = "_longcat_lora_state"


@dataclass
class _Block:
    rows: tuple[int, int]  # output rows of the layer
    cols: tuple[int, int]  # columns of the down output feeding this block
    up: torch.Tensor
    scale: float


@dataclass
class _Active:
    name: str
    down: torch.Tensor  # all parts' downs stacked: one down product
    blocks: list[_Block]


@dataclass
class _Layer:
    module: nn.Module
    handle: torch.utils.hooks.RemovableHandle | None = None
    active: list[_Active] = field(default_factory=list)


@dataclass
class _State:
    strengths: dict[str, float] = field(default_factory=dict)  # active adapters
    layers: dict[str, _Layer] = field(default_factory=dict)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # weights before any merge
    merged: list[str] = field(default_factory=list)


def _state(model: nn.Module) -> _State:
    st = model.__dict__.get(_STATE)
    if st is None:
        st = _State()
        model.__dict__[_STATE] = st  # a plain attribute: not a submodule, not in state_dict
    return st


def _resolve(model: nn.Module, lora: str | os.PathLike | LoraAdapter, skip_missing: bool
             ) -> tuple[list[Target], dict[str, nn.Module], list[str]]:
    # nn.Linear, and Linear-like layers such as FastVideo's ReplicatedLinear (a 2-D weight [out, in])
    linears = {n: m for n, m in model.named_modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
               and not isinstance(m, nn.Embedding)}

    def shape(name: str) -> tuple[int, int] | None:
        m = linears.get(name)
        return None if m is None else tuple(m.weight.shape)  # type: ignore[return-value]

    if isinstance(lora, LoraAdapter):
        targets, missing = find_targets(lora, shape, skip_missing, "the model")
    else:
        with load_lora(str(lora)) as adapter:
            targets, missing = find_targets(adapter, shape, skip_missing, "the model")
            for t in targets:  # materialise before the file closes
                t.module = _materialised(t)
    return targets, linears, missing


def _materialised(t: Target):
    from .adapter import LoraModule, Part, TensorSource

    parts = [Part(p.rows, TensorSource(p.down.load().clone()), TensorSource(p.up.load().clone()), p.scale)
             for p in t.module.parts]
    return LoraModule(t.module.name, t.module.out_features, t.module.in_features, parts, t.module.naming)


def _hook(layer: _Layer, st: _State):
    def hook(module: nn.Module, args: tuple, output):
        x = args[0]
        y = output[0] if isinstance(output, tuple) else output  # FastVideo layers return (out, bias)
        out2 = y.reshape(-1, y.shape[-1])
        for a in layer.active:
            s = st.strengths.get(a.name, 0.0)
            if s == 0.0:
                continue
            h = x.reshape(-1, x.shape[-1]).to(a.down.dtype) @ a.down.T
            for b in a.blocks:
                hb = h[:, b.cols[0]:b.cols[1]]
                dst = out2[:, b.rows[0]:b.rows[1]]
                if b.up.dtype == y.dtype == hb.dtype:  # (autocast may have changed one of them)
                    dst.addmm_(hb, b.up.T, alpha=b.scale * s)
                else:
                    dst += (hb @ b.up.T).to(y.dtype) * (b.scale * s)
        return output

    return hook


def apply_lora(model: nn.Module, lora: str | os.PathLike | LoraAdapter, strength: float = 1.0,
               name: str | None = None, skip_missing: bool = False) -> str:
    """Inject a LoRA (path in any format, or a LoraAdapter) without changing base weights.

    Works on models with LongCat's original Linear names (fused qkv...) and on models with FastVideo's
    split names. Targets the model lacks raise a LoraError listing them, unless skip_missing. Shapes
    are checked before anything is touched. Returns the adapter's name.
    """
    st = _state(model)
    if name is None:
        base = os.path.basename(str(getattr(lora, "path", None) or lora)).split(".")[0] or "lora"
        name, k = base, 1
        while name in st.strengths:
            k += 1
            name = f"{base}_{k}"
    elif name in st.strengths:
        raise LoraError(f"an adapter named {name!r} is already applied")
    targets, linears, _ = _resolve(model, lora, skip_missing)
    prepared = []
    for t in targets:
        module = linears[t.layer]
        w = module.weight
        parts = t.parts()
        downs, blocks, col = [], [], 0
        for p in parts:
            downs.append(p.down.load().to(device=w.device, dtype=w.dtype))
            blocks.append(_Block(p.rows, (col, col + p.rank), p.up.load().to(device=w.device, dtype=w.dtype),
                                 p.scale))
            col += p.rank
        prepared.append((t.layer, module, _Active(name, torch.cat(downs, 0), blocks)))
    st.strengths[name] = float(strength)
    for layer_name, module, active in prepared:
        layer = st.layers.get(layer_name)
        if layer is None:
            layer = st.layers[layer_name] = _Layer(module)
            layer.handle = module.register_forward_hook(_hook(layer, st))
        layer.active.append(active)
    return name


def set_lora_strength(model: nn.Module, name: str, strength: float) -> None:
    st = _state(model)
    if name not in st.strengths:
        raise LoraError(f"no active adapter named {name!r} (active: {sorted(st.strengths)})")
    st.strengths[name] = float(strength)


def active_loras(model: nn.Module) -> dict[str, float]:
    """Active (unmerged) adapters and their strengths."""
    return dict(_state(model).strengths)


def remove_lora(model: nn.Module, name: str | None = None) -> None:
    """Remove one active adapter, or (None) every adapter, merged ones included: afterwards the model's
    outputs and state_dict are exactly what they were."""
    st = _state(model)
    if name is not None and name not in st.strengths:
        raise LoraError(f"no active adapter named {name!r} (active: {sorted(st.strengths)})")
    for layer_name in list(st.layers):
        layer = st.layers[layer_name]
        layer.active = [a for a in layer.active if name is not None and a.name != name]
        if not layer.active:
            layer.handle.remove()
            del st.layers[layer_name]
    if name is None:
        st.strengths.clear()
        unmerge_lora(model)
    else:
        del st.strengths[name]


def merge_lora(model: nn.Module, lora: str | os.PathLike | LoraAdapter, strength: float = 1.0,
               skip_missing: bool = False) -> None:
    """Fold a LoRA's weight change into the weights: W += strength * dW, computed in fp32 and cast
    once to W's dtype. `unmerge_lora` restores the original weights bit for bit."""
    st = _state(model)
    targets, linears, _ = _resolve(model, lora, skip_missing)
    updates = []
    for t in targets:  # compute everything first: nothing is touched if anything fails
        w = linears[t.layer].weight
        updates.append((t.layer, w, (w.detach().float() + strength * t.delta(torch.float32).to(w.device)).to(w.dtype)))
    with torch.no_grad():
        for layer, w, new in updates:
            if layer not in st.originals:
                st.originals[layer] = w.detach().clone()
            w.copy_(new)
    st.merged.append(str(getattr(lora, "path", None) or lora))


def unmerge_lora(model: nn.Module) -> None:
    """Restore every merged weight to its value before the first merge, bit for bit."""
    st = _state(model)
    linears = dict(model.named_modules())
    with torch.no_grad():
        for layer, original in st.originals.items():
            linears[layer].weight.copy_(original)
    st.originals.clear()
    st.merged.clear()
