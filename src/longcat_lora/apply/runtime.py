"""Apply LoRAs to a live PyTorch model, in LongCat's naming or FastVideo's, from any format.

Adapters are injected with forward hooks, so the model's modules and state_dict never change while
they are active. Per adapted layer and adapter the forward does one down product and one up product
per up block, added in place into the layer's output rows (`addmm_`), in the official dtype handling:
LoRA weights live in the layer's dtype and device, the input is cast to it and the result cast back.
Several adapters may be active at once; their outputs add, as with the official `enable_loras`.

`merge_lora` folds a weight change into the weights (fp32, cast once); `unmerge_lora` restores the
original weights bit for bit.

INT8 layers (LongCat's `QuantizedLinear`: `weight_int8` + `weight_scale`, no `weight`; see `int8`) are
targets too. Unmerged, the LoRA is added to the layer's output exactly as for any other layer; its
weights live in the dtype the official `enable_loras` would give them, the model's dtype (its first
floating-point parameter: bf16 after the official INT8 load, fp32 for an fp32 model), on the INT8
weight's device. Merged, the layer's weight is dequantized, the change added in fp32 and the result
requantized per row with the official scheme (a new scale per row); the requantization error is
reported, and `unmerge_lora` restores `weight_int8` and `weight_scale` bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.adapter import LoraAdapter
from ..model import naming
from ..errors import LoraError
from ..formats import load_lora
from .int8 import dequantize, is_int8_layer, quantize_rows, requant_error
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
    # weights before any merge: the weight, or (weight_int8, weight_scale) of an INT8 layer
    originals: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    merged: list[str] = field(default_factory=list)


def _state(model: nn.Module) -> _State:
    st = model.__dict__.get(_STATE)
    if st is None:
        st = _State()
        model.__dict__[_STATE] = st  # a plain attribute: not a submodule, not in state_dict
    return st


def _is_float_linear(m: nn.Module) -> bool:
    """nn.Linear, and Linear-like layers such as FastVideo's ReplicatedLinear (a 2-D weight [out, in])."""
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(m, nn.Embedding)


def _layer_shape(m: nn.Module) -> tuple[int, int]:
    """(out, in) of an adaptable layer (float Linear-like or INT8)."""
    w = m.weight_int8 if is_int8_layer(m) else m.weight
    return tuple(w.shape)  # type: ignore[return-value]


def _why_not(m: nn.Module) -> str:
    """Why the runtime cannot adapt a module that a LoRA names (it is neither a Linear-like layer with a
    2-D weight nor an INT8 layer)."""
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Embedding):
        return "an Embedding, not a Linear layer"
    if isinstance(w, torch.Tensor):
        return f"weight is {w.dim()}-D, not [out, in]"
    q = getattr(m, "weight_int8", None)
    if q is None:
        return "no weight and no weight_int8" if w is None else f"weight is a {type(w).__name__}, not a tensor"
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.dim() != 2:
        return (f"weight_int8 is {q.dtype} {list(q.shape)}, not 2-D int8" if isinstance(q, torch.Tensor)
                else f"weight_int8 is a {type(q).__name__}, not a tensor")
    sc = getattr(m, "weight_scale", None)
    if not isinstance(sc, torch.Tensor):
        return "weight_int8 but no weight_scale tensor"
    return f"weight_scale is {sc.dtype} {list(sc.shape)}, not float32 [{q.shape[0]}]"


def _resolve(model: nn.Module, lora: str | os.PathLike | LoraAdapter, skip_missing: bool
             ) -> tuple[list[Target], dict[str, nn.Module], list[str]]:
    modules = dict(model.named_modules())
    linears = {n: m for n, m in modules.items() if _is_float_linear(m) or is_int8_layer(m)}

    def shape(name: str) -> tuple[int, int] | None:
        m = linears.get(name)
        return None if m is None else _layer_shape(m)

    def find(adapter: LoraAdapter) -> tuple[list[Target], list[str]]:
        targets, missing = find_targets(adapter, shape, True, "the model")
        unfit = []  # present in the model, but not a layer the runtime can adapt: say why
        for name in missing:
            layers = [name, *(naming.fastvideo_layers(name) or ())]
            unfit += [f"{layer} ({_why_not(modules[layer])})" for layer in layers if layer in modules]
        if unfit:
            raise LoraError(f"{len(unfit)} layers the LoRA targets cannot be adapted: " + "; ".join(unfit[:5]))
        if missing and not skip_missing:  # raise as find_targets does
            find_targets(adapter, shape, False, "the model")
        return targets, missing

    if isinstance(lora, LoraAdapter):
        targets, missing = find(lora)
    else:
        with load_lora(str(lora)) as adapter:
            targets, missing = find(adapter)
            for t in targets:  # materialise before the file closes
                t.module = _materialised(t)
    return targets, linears, missing


def _lora_placement(model: nn.Module, module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype the LoRA weights for a layer live in: the layer's weight's, as the official
    code casts them to the model's; for an INT8 layer (no float weight), the model's dtype as the
    official `enable_loras` uses it (its first floating-point parameter; float32 if none)."""
    if not is_int8_layer(module):
        return module.weight.device, module.weight.dtype
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return module.weight_int8.device, dtype


def _materialised(t: Target):
    from ..model.adapter import LoraModule, Part
    from ..model.sources import TensorSource

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
    split names, on float Linear-like layers and on INT8 ones (weight_int8 + weight_scale). Targets the
    model lacks raise a LoraError listing them, unless skip_missing; targets it has but cannot adapt
    (no weight and no weight_int8, a 1-D weight, ...) always raise, naming each with the reason. Shapes
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
        device, dtype = _lora_placement(model, module)
        parts = t.parts()
        downs, blocks, col = [], [], 0
        for p in parts:
            downs.append(p.down.load().to(device=device, dtype=dtype))
            blocks.append(_Block(p.rows, (col, col + p.rank), p.up.load().to(device=device, dtype=dtype),
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


def merge_lora(model: nn.Module, lora: str | os.PathLike | LoraAdapter, strength: float = 1.0,
               skip_missing: bool = False) -> MergeReport:
    """Fold a LoRA's weight change into the weights: W += strength * dW, computed in fp32 and cast
    once to W's dtype. An INT8 layer's weight is dequantized, changed in fp32 and requantized per row
    (official scheme, new scales). `unmerge_lora` restores the original weights bit for bit.

    Returns a MergeReport with each INT8 layer's requantization error (callers may ignore it)."""
    st = _state(model)
    targets, linears, _ = _resolve(model, lora, skip_missing)
    report = MergeReport()
    updates = []
    for t in targets:  # compute everything first: nothing is touched if anything fails
        m = linears[t.layer]
        if is_int8_layer(m):
            q0, s0 = m.weight_int8, m.weight_scale
            exact = dequantize(q0.detach(), s0.detach()) + strength * t.delta(torch.float32).to(q0.device)
            q, sc = quantize_rows(exact)
            report.requantized[t.layer] = RequantError(*requant_error(exact, q, sc))
            updates.append((t.layer, (q0, s0), (q, sc)))
        else:
            w = m.weight
            new = (w.detach().float() + strength * t.delta(torch.float32).to(w.device)).to(w.dtype)
            updates.append((t.layer, (w,), (new,)))
        report.layers.append(t.layer)
    with torch.no_grad():
        for layer, dsts, news in updates:
            if layer not in st.originals:
                clones = tuple(d.detach().clone() for d in dsts)
                st.originals[layer] = clones if len(clones) > 1 else clones[0]
            for d, new in zip(dsts, news):
                d.copy_(new)
    st.merged.append(str(getattr(lora, "path", None) or lora))
    return report


def unmerge_lora(model: nn.Module) -> None:
    """Restore every merged weight to its value before the first merge, bit for bit."""
    st = _state(model)
    linears = dict(model.named_modules())
    with torch.no_grad():
        for layer, original in st.originals.items():
            if isinstance(original, tuple):  # an INT8 layer
                linears[layer].weight_int8.copy_(original[0])
                linears[layer].weight_scale.copy_(original[1])
            else:
                linears[layer].weight.copy_(original)
    st.originals.clear()
    st.merged.clear()
