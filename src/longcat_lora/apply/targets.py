"""Where each LoRA module lands in a model or checkpoint, in either naming.

A LoRA module (LongCat naming) lands on its own fused Linear if the model has it, or else on the
FastVideo split layers the naming table gives it (rows split equally). Used by the runtime
(`apply_lora`, `merge_lora`) and by checkpoint merging alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..model import naming
from ..model.adapter import LoraAdapter, LoraModule, Naming, Part
from ..errors import LoraError, UnmappedModulesError, q


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


def find_targets(adapter: LoraAdapter, layer_shape: Callable[[str], tuple[int, int] | None],
                 skip_missing: bool = False, what: str = "the model") -> tuple[list[Target], list[str]]:
    """Targets for every module of `adapter`; `layer_shape(name)` gives (out, in) of a layer or None.

    Every shape is checked before anything is returned. Modules with no layer raise (listing them all)
    unless skip_missing, in which case they are returned as the second value.
    """
    targets: list[Target] = []
    missing: list[str] = []
    bad: list[str] = []
    for m in sorted(adapter.modules.values(), key=lambda m: m.name):
        fused = layer_shape(m.name)
        if fused is not None:
            layers: tuple[str, ...] = (m.name,)
        elif m.naming is Naming.LONGCAT:
            layers = naming.fastvideo_layers(m.name) or ()
        else:
            layers = ()
        shapes = [layer_shape(name) for name in layers]
        if not layers or any(s is None for s in shapes):
            missing.append(m.name)
            continue
        h = m.out_features // len(layers)
        for j, (name, shape) in enumerate(zip(layers, shapes)):
            if shape != (h, m.in_features):
                bad.append(f"{q(name)} is {list(shape)}, the LoRA needs {[h, m.in_features]}")
            targets.append(Target(name, m, j * h, (j + 1) * h))
    if bad:
        raise LoraError(f"{len(bad)} LoRA modules do not fit {what}: " + "; ".join(bad[:5]))
    if missing and not skip_missing:
        raise UnmappedModulesError(f"{len(missing)} LoRA modules have no layer in {what}", missing)
    return targets, missing
