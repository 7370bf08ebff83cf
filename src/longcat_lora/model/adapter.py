"""The format-neutral LoRA model every reader produces and every writer consumes.

A `LoraAdapter` maps each adapted base weight (LongCat's original module name) to a `LoraModule`: a list
of `Part`s, each owning a contiguous row range of the weight, with its own down matrix, up matrix and
scale. The weight change is exact by construction:

    dW[rows_i] += scale_i * up_i @ down_i        for every part i

A native module with n up blocks is n parts whose downs are consecutive row slices of one down matrix;
a FastVideo split layer is one part; a standard LoRA with a block-diagonal up matrix is split back into
its blocks (`layout.split_diagonal`, run on first use of the module's parts: loading reads no tensor).
Tensors are lazy `sources.Source`s, loaded only when a writer or the runtime needs them, so converting a
file never holds more than one module in memory. No value is rounded unless a target format cannot hold it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from ..errors import LoraError, q
from ..io.reader import SafeFile
from .sources import Source

if TYPE_CHECKING:
    import torch


@dataclass
class Part:
    """dW[rows[0]:rows[1]] += scale * up @ down."""

    rows: tuple[int, int]
    down: Source  # [r, in]
    up: Source  # [rows, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


Refine = Callable[[Part], list[Part]]


class Naming(StrEnum):
    """Whether a module is one of the DiT's (keyed by its LongCat name) or unknown (kept as read)."""

    LONGCAT = "longcat"  # a module of LongCat-Video or LongCat-Video-Avatar, under its original name
    UNKNOWN = "unknown"  # a name no scheme of the naming table knows: never written, merged or applied


class LoraModule:
    """All LoRA parts that adapt one base weight (named in LongCat's original naming).

    Parts are added as read (`given`); a part added with a `refine` function (a standard layer whose up
    matrix may be block-diagonal) is replaced by the parts it returns on first use of `parts`, because
    finding them reads values. Shapes and rows are known from `given` without reading anything.
    """

    def __init__(self, name: str, out_features: int, in_features: int, parts: Iterable[Part] = (),
                 naming: Naming = Naming.LONGCAT):
        self.name = name
        self.out_features = out_features
        self.in_features = in_features
        self.naming = Naming(naming)
        self._given: list[tuple[Part, Refine | None]] = [(p, None) for p in parts]
        self._parts: list[Part] | None = None

    def add(self, part: Part, refine: Refine | None = None) -> None:
        """Add a part; `refine(part)`, if given, gives the parts that replace it on first use of `parts`."""
        self._given.append((part, refine))
        self._parts = None

    @property
    def given(self) -> list[Part]:
        """The parts as added, before any refinement (nothing is read)."""
        return [p for p, _ in self._given]

    @property
    def parts(self) -> list[Part]:
        """The parts, refined (computed once)."""
        if self._parts is None:
            self._parts = [r for p, refine in self._given for r in (refine(p) if refine else [p])]
        return self._parts

    def __repr__(self) -> str:
        return (f"LoraModule({self.name!r}, {self.out_features}, {self.in_features}, "
                f"{len(self._given)} parts given, naming={self.naming!r})")

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight change at multiplier 1, [out, in], computed in `dtype` (default float64)."""
        import torch

        dtype = dtype or torch.float64
        d = torch.zeros(self.out_features, self.in_features, dtype=dtype)
        for p in self.parts:
            d[p.rows[0]:p.rows[1]] += p.scale * (p.up.load().to(dtype) @ p.down.load().to(dtype))
        return d

    @property
    def ranks(self) -> list[int]:
        return [p.rank for p in self.parts]


@dataclass
class LoraAdapter:
    """A LoRA in memory, whatever format it came from. Modules are keyed by LongCat module name."""

    modules: dict[str, LoraModule]
    format: str = "memory"
    path: str | None = None
    notes: list[str] = field(default_factory=list)
    # dtype of the native alpha_scale tensors, when known, so native -> X -> native is bit-exact
    scale_dtype: str | None = None
    files: list[SafeFile] = field(default_factory=list, repr=False)
    # which schemes of the naming table the file's layer names are in ("longcat", "fastvideo", "wanvideo";
    # "kohya" when written with underscores), counted over names only that scheme has
    schemes: dict[str, int] = field(default_factory=dict)
    hints: dict[str, str] = field(default_factory=dict)  # what the file shows of its producer (inspect)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def refusing_nonfinite(self, refuse: bool = True) -> Iterator[None]:
        """While inside, every read of this adapter's stored tensors refuses NaN/Inf (`NonFinite`).

        The one home of the `allow_nonfinite` option: `save_lora` enters this unless it is set. Outside,
        reads are unchecked (merging and the runtime check the results they compute instead).
        """
        stored = {id(s): s for m in self.modules.values() for p in m.given for src in (p.down, p.up)
                  for s in src.stored()}
        before = {k: s.refuse_nonfinite for k, s in stored.items()}
        for s in stored.values():
            s.refuse_nonfinite = refuse
        try:
            yield
        finally:
            for k, s in stored.items():
                s.refuse_nonfinite = before[k]


def validate_module(m: LoraModule, where: str) -> None:
    """Check a module's parts are consistent with each other and with its shape (reading no values)."""
    for p in m.given:
        lo, hi = p.rows
        if not 0 <= lo < hi <= m.out_features:
            raise LoraError(f"{where}: module {q(m.name)}: rows {lo}:{hi} outside its {m.out_features} outputs")
        if p.down.shape[1] != m.in_features:
            raise LoraError(f"{where}: module {q(m.name)}: down matrix has {p.down.shape[1]} inputs, "
                            f"other parts have {m.in_features}")
        if p.up.shape != (hi - lo, p.down.shape[0]):
            raise LoraError(f"{where}: module {q(m.name)}: up matrix {list(p.up.shape)} does not fit down "
                            f"{list(p.down.shape)} over {hi - lo} rows (inconsistent rank or shape)")
