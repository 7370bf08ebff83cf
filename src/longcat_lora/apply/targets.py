"""Where each LoRA module lands in a model or checkpoint, in either naming.

A LoRA module (LongCat naming) lands on its own fused Linear if the model has it, or else on its layers
in another scheme of the naming table (FastVideo's, ComfyUI-WanVideoWrapper's; rows split equally). Used by the runtime
(`apply_lora`, `merge_lora`) and by checkpoint merging alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..model import naming
from ..model.adapter import LoraAdapter, LoraModule, Naming, Part
from ..errors import LoraError, UnknownModulesError, UnmappedModulesError, q


@dataclass
class Target:
    """Rows lo:hi of a LoRA module's weight change, landing on one layer of the model."""

    layer: str
    module: LoraModule
    lo: int
    hi: int

    def parts(self) -> list[Part]:
        """The module's parts restricted to this layer, rows relative to the layer."""
        out = []
        for p in self.module.parts:
            r0, r1 = max(self.lo, p.rows[0]), min(self.hi, p.rows[1])
            if r0 < r1:
                out.append(Part((r0 - self.lo, r1 - self.lo), p.down,
                                p.up.rows(r0 - p.rows[0], r1 - p.rows[0]), p.scale))
        return out


def _layers(m: LoraModule, layer_shape: Callable[[str], tuple[int, int] | None], what: str) -> tuple[str, ...]:
    """The model's layer(s) for a module: its fused layer, else its layers in the scheme of the naming
    table (FastVideo's, the wrapper's) whose layers the model has; () if none. A model holding only some
    of a scheme's layers for the module (q but not k), or layers of two layouts for it (the fused qkv and
    a split q), is refused: a layout mixed within one weight cannot take the LoRA's rows, and merging
    into one of two copies would leave the other stale."""
    if m.naming is not Naming.LONGCAT:
        return ()
    layouts = [(m.name,)]
    for scheme in (naming.Scheme.FASTVIDEO, naming.Scheme.WANVIDEO):
        names = naming.layers(m.name, scheme) or ()
        if names and names not in layouts:
            layouts.append(names)
    held = [(names, [n for n in names if layer_shape(n) is not None]) for names in layouts]
    held = [(names, present) for names, present in held if present]
    if not held:
        return ()
    names, present = held[0]
    if len(held) > 1:
        raise LoraError(f"{what} has both {', '.join(map(q, present))} and {', '.join(map(q, held[1][1]))}: two "
                        f"layouts of {q(m.name)} (refusing to merge into one of them)")
    if len(present) < len(names):
        absent = [n for n in names if n not in present]
        raise LoraError(f"{what} has {', '.join(map(q, present))} but not {', '.join(map(q, absent))}: the LoRA "
                        f"adapts all of {q(m.name)} (layouts mixed within one weight)")
    return names


def find_targets(adapter: LoraAdapter, layer_shape: Callable[[str], tuple[int, int] | None],
                 skip_missing: bool = False, what: str = "the model") -> tuple[list[Target], list[str]]:
    """Targets for every module of `adapter`; `layer_shape(name)` gives (out, in) of a layer or None.

    Every shape is checked before anything is returned. Modules with no layer raise (listing them all)
    unless skip_missing, in which case they are returned as the second value.
    """
    unknown = sorted(m.name for m in adapter.modules.values() if m.naming is Naming.UNKNOWN)
    if unknown and not skip_missing:  # of no LongCat model: refused before the model is even looked at
        raise UnknownModulesError(unknown)
    targets: list[Target] = []
    missing: list[str] = []
    bad: list[str] = []
    for m in sorted(adapter.modules.values(), key=lambda m: m.name):
        layers = _layers(m, layer_shape, what)
        if not layers:
            missing.append(m.name)
            continue
        shapes = [layer_shape(name) for name in layers]
        h = m.out_features // len(layers)
        if h * len(layers) != m.out_features:  # its rows do not split equally over those layers
            bad.append(f"{q(m.name)} has {m.out_features} rows, which do not split into {len(layers)} equal layers "
                       f"({', '.join(map(q, layers))})")
            continue
        for j, (name, shape) in enumerate(zip(layers, shapes)):
            if shape != (h, m.in_features):
                bad.append(f"{q(name)} is {list(shape)}, the LoRA needs {[h, m.in_features]}")
            targets.append(Target(name, m, j * h, (j + 1) * h))
    if bad:
        raise LoraError(f"{len(bad)} LoRA modules do not fit {what}: " + "; ".join(bad[:5]))
    if missing and not skip_missing:
        raise UnmappedModulesError(f"{len(missing)} LoRA modules have no layer in {what}", missing)
    return targets, missing
