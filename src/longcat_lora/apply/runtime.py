"""Apply LoRAs to a live PyTorch model, in LongCat's naming or FastVideo's, from any format.

Adapters are named and injected with forward hooks (`layers`), so the model's modules and state_dict
never change while they are applied. Each is read once, when applied; afterwards it is switched on and
off (`enable_loras` / `disable_loras`, or diffusers' `set_adapters` shape), re-weighted
(`set_lora_strength`) or removed (`remove_lora`) without reading anything again. Several enabled
adapters add, as with the official `enable_loras`; a disabled one costs nothing in the forward (a layer
with no enabled adapter has no hook at all).

`merge_lora` folds a weight change into the weights (each element correctly rounded; `fuse`): a LoRA file's, or the
adapters already applied (by name, like diffusers' `fuse_lora(adapter_names=...)`), whose hooks then
stand down. `unmerge_lora` restores the original weights bit for bit and puts merged adapters back in
the forward. `_State.merged` is the record of what is folded in.

INT8 layers (LongCat's `QuantizedLinear`: `weight_int8` + `weight_scale`, no `weight`; see `int8`) are
targets too. Unmerged, the LoRA is added to the layer's output exactly as for any other layer; its
weights live in the dtype the official `enable_loras` would give them, the model's dtype (its first
floating-point parameter: bf16 after the official INT8 load, fp32 for an fp32 model), on the INT8
weight's device. Merged, the layer's weight is dequantized, the change added in fp32 and the result
requantized per row with the official scheme (a new scale per row); the requantization error is
reported, and `unmerge_lora` restores `weight_int8` and `weight_scale` bit for bit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import LoraError
from ..formats import load_lora
from ..model import naming
from ..model.adapter import LoraAdapter
from . import fuse
from .exact import Term
from .fuse import MergeReport
from .layers import HookedLayer, LayerAdapter, adaptable_layers, layer_shape, placement, why_not
from .targets import Target, find_targets

_STATE = "_longcat_lora_state"


@dataclass
class _Adapter:
    strength: float
    layers: list[str]  # the layers it is applied to
    enabled: bool = True


@dataclass(frozen=True)
class _Merge:
    what: str  # an applied adapter's name, or the LoRA file (or adapter) merged from outside
    strength: float
    applied: bool  # an applied adapter fused by name: its hooks stand down while it is merged


@dataclass
class _State:
    adapters: dict[str, _Adapter] = field(default_factory=dict)
    layers: dict[str, HookedLayer] = field(default_factory=dict)
    originals: fuse.Originals = field(default_factory=dict)  # weights before the first merge
    merged: list[_Merge] = field(default_factory=list)  # what is folded into the weights, in order

    def is_merged(self, name: str) -> bool:
        return any(m.applied and m.what == name for m in self.merged)

    def active(self) -> dict[str, float]:
        """Adapters the forward adds (enabled, not merged) and their strengths."""
        return {n: a.strength for n, a in self.adapters.items() if a.enabled and not self.is_merged(n)}

    def sync(self) -> None:
        """Make every layer's hook add exactly the active adapters."""
        active = self.active()
        for layer in self.layers.values():
            layer.sync(active)

    def names(self, names: str | Iterable[str] | None, unmerged: bool = False) -> list[str]:
        """`names` (one name, several, or None for every applied adapter) checked against the applied
        adapters; with `unmerged`, refused when one of them is merged into the weights."""
        wanted = list(self.adapters) if names is None else [names] if isinstance(names, str) else list(names)
        unknown = [n for n in wanted if n not in self.adapters]
        if unknown:
            raise LoraError(f"names: no adapter named {', '.join(map(repr, unknown))} is applied "
                            f"(applied: {sorted(self.adapters)})")
        merged = [n for n in wanted if unmerged and self.is_merged(n)]
        if merged:
            raise LoraError(f"adapter {', '.join(map(repr, merged))} is merged into the weights: "
                            "call unmerge_lora(model) first")
        return wanted


@dataclass(frozen=True)
class LoraInfo:
    """An applied adapter's state (`list_loras`)."""

    strength: float
    enabled: bool
    merged: bool


def _state(model: nn.Module) -> _State:
    st = model.__dict__.get(_STATE)
    if st is None:
        st = _State()
        model.__dict__[_STATE] = st  # a plain attribute: not a submodule, not in state_dict
    return st


@contextmanager
def _targets(model: nn.Module, lora: str | os.PathLike | LoraAdapter, skip_missing: bool
             ) -> Iterator[tuple[list[Target], dict[str, nn.Module]]]:
    """The targets of `lora` in the model and its adaptable layers by name, the LoRA's file open while
    inside. Raises before yielding if a target cannot be adapted, does not fit, or is missing (unless
    skip_missing)."""
    modules = dict(model.named_modules())
    layers = adaptable_layers(model)

    def shape(name: str) -> tuple[int, int] | None:
        return layer_shape(layers[name]) if name in layers else None

    def find(adapter: LoraAdapter) -> list[Target]:
        targets, missing = find_targets(adapter, shape, True, "the model")
        unfit = []  # present in the model, but not a layer the runtime can adapt: say why
        for name in missing:
            names = [name, *(n for s in (naming.Scheme.FASTVIDEO, naming.Scheme.WANVIDEO)
                             for n in naming.layers(name, s) or ())]
            unfit += [f"{n} ({why_not(modules[n])})" for n in names if n in modules]
        if unfit:
            raise LoraError(f"{len(unfit)} layers the LoRA targets cannot be adapted: " + "; ".join(unfit[:5]))
        if missing and not skip_missing:  # raise as find_targets does
            find_targets(adapter, shape, False, "the model")
        return targets

    if isinstance(lora, LoraAdapter):
        yield find(lora), layers
    else:
        with load_lora(str(lora)) as adapter:
            yield find(adapter), layers


def _default_name(st: _State, lora: str | os.PathLike | LoraAdapter) -> str:
    """The file's stem (a PEFT directory's name; "lora" for an adapter with no path), made unique."""
    path = lora.path if isinstance(lora, LoraAdapter) else lora
    base = Path(os.fspath(path)).stem if path else "lora"
    name, k = base or "lora", 1
    while name in st.adapters:
        k += 1
        name = f"{base}_{k}"
    return name


def _strength(value: float, param: str = "strength") -> float:
    """A strength as a finite float; anything else is refused naming the parameter."""
    v = float(value)
    if not math.isfinite(v):
        raise LoraError(f"{param}: must be a finite number, got {v}")
    return v


def apply_lora(model: nn.Module, lora: str | os.PathLike | LoraAdapter, strength: float = 1.0,
               name: str | None = None, skip_missing: bool = False) -> str:
    """Inject a LoRA (path in any format, or a LoraAdapter) without changing base weights; it is
    enabled. Returns its name: `name`, or by default the file's stem (made unique with a suffix).

    Works on models with LongCat's original Linear names (fused qkv...) and on models with FastVideo's
    split names, on float Linear-like layers and on INT8 ones (weight_int8 + weight_scale). Targets the
    model lacks raise a LoraError listing them, unless skip_missing; targets it has but cannot adapt
    (no weight and no weight_int8, a 1-D weight, ...) always raise, naming each with the reason. Shapes
    are checked before anything is touched. The LoRA is read here, once.
    """
    strength = _strength(strength)
    st = _state(model)
    if name is not None and name in st.adapters:
        raise LoraError(f"name: an adapter named {name!r} is already applied (remove_lora it, or pick another name)")
    name = name if name is not None else _default_name(st, lora)
    with _targets(model, lora, skip_missing) as (targets, layers):
        prepared = [(t.layer, LayerAdapter.from_parts(name, t.parts(), *placement(model, layers[t.layer])))
                    for t in targets]
    for layer_name, adapter in prepared:
        st.layers.setdefault(layer_name, HookedLayer(layers[layer_name])).adapters.append(adapter)
    st.adapters[name] = _Adapter(strength, [layer for layer, _ in prepared])
    st.sync()
    return name


def set_lora_strength(model: nn.Module, name: str, strength: float) -> None:
    """Change an applied, unmerged adapter's strength (the official multiplier)."""
    st = _state(model)
    value = _strength(strength)
    st.adapters[st.names(name, unmerged=True)[0]].strength = value
    st.sync()


def enable_loras(model: nn.Module, names: str | Iterable[str] | None = None) -> None:
    """Put applied adapters (None: all) back in the forward; the others keep their state. Nothing is
    read again."""
    st = _state(model)
    for n in st.names(names, unmerged=True):
        st.adapters[n].enabled = True
    st.sync()


def disable_loras(model: nn.Module, names: str | Iterable[str] | None = None) -> None:
    """Take applied adapters (None: all, like the official `disable_all_loras()`) out of the forward,
    keeping them loaded; a layer with no enabled adapter left runs its own forward only."""
    st = _state(model)
    for n in st.names(names, unmerged=True):
        st.adapters[n].enabled = False
    st.sync()


def set_adapters(model: nn.Module, names: str | Iterable[str],
                 weights: float | Iterable[float] | None = None) -> None:
    """diffusers' shape: exactly `names` enabled (every other applied adapter disabled), with
    `weights` as their strengths (one for all, or one per name; None keeps each strength)."""
    st = _state(model)
    wanted = st.names(names, unmerged=True)
    others = [n for n in st.adapters if n not in wanted]
    st.names(others, unmerged=True)  # a merged adapter cannot be disabled: refuse before changing anything
    if weights is not None:
        ws = [weights] * len(wanted) if isinstance(weights, (int, float)) else list(weights)
        if len(ws) != len(wanted):
            raise LoraError(f"weights: {len(ws)} given for {len(wanted)} names")
        ws = [_strength(w, "weights") for w in ws]
        for n, w in zip(wanted, ws):
            st.adapters[n].strength = w
    for n in st.adapters:
        st.adapters[n].enabled = n in wanted
    st.sync()


def active_loras(model: nn.Module) -> dict[str, float]:
    """Adapters in the forward (applied, enabled, not merged) and their strengths."""
    return _state(model).active()


def list_loras(model: nn.Module) -> dict[str, LoraInfo]:
    """Every applied adapter, enabled or not, merged or not."""
    st = _state(model)
    return {n: LoraInfo(a.strength, a.enabled, st.is_merged(n)) for n, a in st.adapters.items()}


def remove_lora(model: nn.Module, names: str | Iterable[str] | None = None) -> None:
    """Remove applied adapters by name, or (None) every adapter, merged ones included: afterwards the
    model's outputs and state_dict are exactly what they were. An adapter merged by name cannot be
    removed alone (unmerge_lora first)."""
    st = _state(model)
    if names is None:
        unmerge_lora(model)
    gone = set(st.names(names, unmerged=True))
    for layer_name in list(st.layers):
        layer = st.layers[layer_name]
        layer.adapters = [a for a in layer.adapters if a.name not in gone]
        if not layer.adapters:
            layer.sync({})  # removes the hook
            del st.layers[layer_name]
    for n in gone:
        del st.adapters[n]
    st.sync()


def merge_lora(model: nn.Module, lora: str | os.PathLike | LoraAdapter | None = None, strength: float = 1.0,
               skip_missing: bool = False, names: str | Iterable[str] | None = None) -> MergeReport:
    """Fold a weight change into the weights: W += strength * dW, each element the correctly rounded value
    of the exact sum in W's dtype (the same bytes on every machine). An INT8 layer's weight is
    `weight_int8 * weight_scale` plus the change, correctly rounded to float32, requantized per row
    (official scheme, new scales). `unmerge_lora` restores the original weights bit for bit.

    With `lora` (a path in any format, or a LoraAdapter), that LoRA's change is merged. Without it,
    applied adapters are fused (like diffusers' `fuse_lora(adapter_names=...)`): `names`, or None for
    every active one, each at its strength times `strength`, from the weights as applied (in the
    layer's dtype; nothing is read again); their hooks stand down until `unmerge_lora`.

    Returns a MergeReport with each INT8 layer's requantization error (callers may ignore it)."""
    strength = _strength(strength)
    st = _state(model)
    report = MergeReport()
    if lora is not None:
        if names is not None:
            raise LoraError("names: give either a LoRA to merge (lora) or applied adapters' names, not both")
        with _targets(model, lora, skip_missing) as (targets, layers):  # everything computed before any write
            updates = [fuse.plan(t.layer, layers[t.layer], _target_terms(t, strength), report) for t in targets]
        merges = [_Merge(os.fspath(lora.path or "LoraAdapter") if isinstance(lora, LoraAdapter)
                         else os.fspath(lora), strength, False)]
    else:
        chosen = st.names(names, unmerged=True) if names is not None else list(st.active())
        if not chosen:
            raise LoraError("nothing to merge: no adapter is applied and enabled (give lora, or apply_lora first)")
        updates = [fuse.plan(layer_name, layer.module, _fused_terms(layer, st, chosen, strength), report)
                   for layer_name, layer in st.layers.items()
                   if any(a.name in chosen for a in layer.adapters)]
        merges = [_Merge(n, st.adapters[n].strength * strength, True) for n in chosen]
    fuse.write(updates, st.originals)
    st.merged += merges
    st.sync()
    return report


def _target_terms(t: Target, strength: float) -> list[Term]:
    """A LoRA target's parts on its layer as exact float64 terms at `strength`."""
    return [Term(p.rows, p.up.load().double(), p.down.load().double(), strength, p.scale) for p in t.parts()]


def _fused_terms(layer: HookedLayer, st: _State, chosen: list[str], strength: float) -> list[Term]:
    """The `chosen` adapters' parts on one layer, each at its strength times `strength`, from their
    weights as applied (in the layer's placement)."""
    out = []
    for a in layer.adapters:
        if a.name in chosen:
            s = st.adapters[a.name].strength * strength
            out += [Term(b.rows, b.up.double(), a.down[b.cols[0]:b.cols[1]].double(), s, b.scale) for b in a.blocks]
    return out


def unmerge_lora(model: nn.Module) -> None:
    """Restore every merged weight to its value before the first merge, bit for bit; adapters that were
    fused by name are back in the forward (if enabled)."""
    st = _state(model)
    fuse.restore(model, st.originals)
    st.merged.clear()
    st.sync()
