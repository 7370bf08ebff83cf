"""The format-neutral LoRA model every reader produces and every writer consumes.

A `LoraAdapter` maps each adapted base weight (LongCat's original module name) to a `LoraModule`: a list
of `Part`s, each owning a contiguous row range of the weight, with its own down matrix, up matrix and
scale. The weight change is exact by construction:

    dW[rows_i] += scale_i * up_i @ down_i        for every part i

A native module with n up blocks is n parts whose downs are consecutive row slices of one down matrix;
a FastVideo split layer is one part; a standard LoRA with a block-diagonal up matrix is split back into
its blocks. Tensors are `Source`s: lazy references into a file (or in-memory tensors), loaded only when
a writer or the runtime needs them, so converting a file never holds more than one module in memory.
No value is rounded unless a target format cannot hold it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import LoraError, q
from ..io.dtypes import ITEMSIZE, dtype_name, nonfinite, torch_dtype
from ..io.reader import FileRange, SafeFile

if TYPE_CHECKING:
    import torch


class NonFinite(LoraError):
    """Inf or NaN where a finite LoRA weight was expected."""


def _checked(raw: np.ndarray, dtype: str, check: bool) -> np.ndarray:
    if check and nonfinite(raw, dtype):
        raise NonFinite("non-finite values (NaN/Inf)")
    return raw


def _torch(src: Source, check: bool) -> torch.Tensor:
    import torch

    raw = np.ascontiguousarray(src.raw(check))
    if not raw.flags.writeable:
        raw = raw.copy()
    return torch.from_numpy(raw.reshape(-1)).view(torch_dtype(src.dtype)).reshape(src.shape)


class Source:
    """A 2-D float tensor known by shape and dtype name, loaded on demand.

    `raw()` gives its little-endian bytes as a uint8 array [rows, cols * itemsize] without torch;
    `load()` gives a torch tensor. Writers move bytes; only arithmetic needs torch.
    """

    shape: tuple[int, int]
    dtype: str

    def raw(self, check: bool = False) -> np.ndarray:
        """The bytes; with check=True, raise NonFinite if the values read hold Inf/NaN."""
        raise NotImplementedError

    def load(self) -> torch.Tensor:
        return _torch(self, False)

    def file_range(self) -> tuple[SafeFile, FileRange] | None:
        """Where these exact bytes lie in a file, if they do (so they can be copied without reading)."""
        return None

    def chunks(self, check: bool = False) -> Iterator[np.ndarray]:
        """The bytes in consecutive row bands; each band is valid until the next one is asked for."""
        yield self.raw(check)

    def rows(self, lo: int, hi: int) -> Source:
        if (lo, hi) == (0, self.shape[0]):
            return self
        return Computed((hi - lo, self.shape[1]), self.dtype, lambda check: self.raw(check)[lo:hi])


@dataclass(frozen=True, eq=False)
class FileSource(Source):
    """A tensor (or a rectangle of it) stored in a safetensors file."""

    file: SafeFile
    key: str
    row_range: tuple[int, int] | None = None
    col_range: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:  # type: ignore[override]
        full = self.file.info(self.key).shape
        r = self.row_range or (0, full[0])
        c = self.col_range or (0, full[1])
        return (r[1] - r[0], c[1] - c[0])

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.file.info(self.key).dtype

    def raw(self, check: bool = False) -> np.ndarray:
        a = self.file.read_raw(self.key, self.row_range)
        if self.col_range is not None:
            k = ITEMSIZE[self.dtype]
            a = np.ascontiguousarray(a[:, self.col_range[0] * k:self.col_range[1] * k])
        return _checked(a, self.dtype, check)

    def file_range(self) -> tuple[SafeFile, FileRange] | None:
        if self.col_range is not None:
            return None
        off, n = self.file.byte_range(self.key, self.row_range)
        return self.file, FileRange(self.file.fd, off, n, self.file.path, self.key)

    def rows(self, lo: int, hi: int) -> Source:
        base = self.row_range[0] if self.row_range else 0
        return FileSource(self.file, self.key, (base + lo, base + hi), self.col_range)

    def cols(self, lo: int, hi: int) -> FileSource:
        base = self.col_range[0] if self.col_range else 0
        return FileSource(self.file, self.key, self.row_range, (base + lo, base + hi))


class TensorSource(Source):
    """An in-memory torch tensor."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.dim() != 2 or not tensor.dtype.is_floating_point:
            raise LoraError(f"LoRA weights must be 2-D float tensors, got {tensor.dtype} {list(tensor.shape)}")
        self.tensor = tensor.detach().cpu().contiguous()
        self.shape = tuple(self.tensor.shape)  # type: ignore[assignment]
        self.dtype = dtype_name(self.tensor.dtype)

    def raw(self, check: bool = False) -> np.ndarray:
        import torch

        return _checked(self.tensor.view(torch.uint8).numpy().reshape(self.shape[0], -1), self.dtype, check)

    def load(self) -> torch.Tensor:
        return self.tensor


@dataclass(frozen=True, eq=False)
class Computed(Source):
    """Bytes derived from other sources at load time (concatenation, padding, placement).

    `fn(check)` passes `check` on to the sources it reads, so values are scanned where they are read,
    not again (mostly as zeros) in the result.
    """

    shape: tuple[int, int]  # type: ignore[misc]
    dtype: str  # type: ignore[misc]
    fn: Callable[[bool], np.ndarray]
    stream: Callable[[bool], Iterator[np.ndarray]] | None = None  # the same bytes, in row bands

    def raw(self, check: bool = False) -> np.ndarray:
        return self.fn(check)

    def chunks(self, check: bool = False) -> Iterator[np.ndarray]:
        return self.stream(check) if self.stream is not None else super().chunks(check)


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


@dataclass
class LoraModule:
    """All LoRA parts that adapt one base weight (named in LongCat's original naming)."""

    name: str
    out_features: int
    in_features: int
    parts: list[Part]
    # "longcat" normally; "fastvideo" for a FastVideo layer the naming table cannot translate
    naming: str = "longcat"

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

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def validate_module(m: LoraModule, where: str) -> None:
    """Check a module's parts are consistent with each other and with its shape."""
    for p in m.parts:
        lo, hi = p.rows
        if not 0 <= lo < hi <= m.out_features:
            raise LoraError(f"{where}: module {q(m.name)}: rows {lo}:{hi} outside its {m.out_features} outputs")
        if p.down.shape[1] != m.in_features:
            raise LoraError(f"{where}: module {q(m.name)}: down matrix has {p.down.shape[1]} inputs, "
                            f"other parts have {m.in_features}")
        if p.up.shape != (hi - lo, p.down.shape[0]):
            raise LoraError(f"{where}: module {q(m.name)}: up matrix {list(p.up.shape)} does not fit down "
                            f"{list(p.down.shape)} over {hi - lo} rows (inconsistent rank or shape)")


# ---------------------------------------------------------------- building blocks for writers

_ORDER = ["F16", "BF16", "F32", "F64"]


def promote(*dtypes: str) -> str:
    """The narrowest float dtype holding every input exactly (F16 + BF16 -> F32)."""
    ds = set(dtypes)
    if len(ds) == 1:
        return ds.pop()
    return max(ds | {"F32"}, key=_ORDER.index)


def cast(src: Source, dtype: str) -> Source:
    """src in another (wider) float dtype: exact, done by torch only when the dtype changes."""
    if src.dtype == dtype:
        return src

    def make(check: bool) -> np.ndarray:
        import torch

        t = _torch(src, check).to(torch_dtype(dtype)).contiguous()
        return t.view(torch.uint8).numpy().reshape(src.shape[0], -1)

    return Computed(src.shape, dtype, make)


def folded(src: Source, factor: float) -> Source:
    """src * factor, computed in float64 and stored in at least float32 (exact to one fp32 rounding)."""
    if factor == 1.0:
        return src
    dtype = "F64" if src.dtype == "F64" else "F32"

    def make(check: bool) -> np.ndarray:
        import torch

        t = (_torch(src, check).to(torch.float64) * factor).to(torch_dtype(dtype))
        return _checked(t.view(torch.uint8).numpy().reshape(src.shape[0], -1), dtype, check)

    return Computed(src.shape, dtype, make)


def cat_rows(srcs: list[Source]) -> Source:
    if len(srcs) == 1:
        return srcs[0]
    dtype = promote(*(s.dtype for s in srcs))
    srcs = [cast(s, dtype) for s in srcs]
    shape = (sum(s.shape[0] for s in srcs), srcs[0].shape[1])
    return Computed(shape, dtype, lambda check: np.concatenate([s.raw(check) for s in srcs], 0))


def placed(shape: tuple[int, int], pieces: list[tuple[int, int, Source]]) -> Source:
    """A zero matrix with each (row offset, col offset, source) block written in."""
    dtype = promote(*(s.dtype for _, _, s in pieces))
    pieces = [(r, c, cast(s, dtype)) for r, c, s in pieces]
    k = ITEMSIZE[dtype]

    def make(check: bool) -> np.ndarray:
        out = np.zeros((shape[0], shape[1] * k), dtype=np.uint8)
        for r, c, s in pieces:
            out[r:r + s.shape[0], c * k:(c + s.shape[1]) * k] = s.raw(check)
        return out

    def stream(check: bool) -> Iterator[np.ndarray]:
        # Band by band through one reused scratch buffer: a block-diagonal matrix is mostly zeros, and
        # building it whole would fault in (and stream through memory) the full size for each module.
        cuts = sorted({0, shape[0], *(r for r, _, _ in pieces), *(r + s.shape[0] for r, _, s in pieces)})
        scratch = np.empty(0, dtype=np.uint8)
        for b0, b1 in zip(cuts, cuts[1:]):
            n = (b1 - b0) * shape[1] * k
            if scratch.size < n:
                scratch = np.empty(n, dtype=np.uint8)
            band = scratch[:n].reshape(b1 - b0, shape[1] * k)
            band.fill(0)
            for r, c, s in pieces:
                lo, hi = max(b0, r), min(b1, r + s.shape[0])
                if lo < hi:
                    band[lo - b0:hi - b0, c * k:(c + s.shape[1]) * k] = s.rows(lo - r, hi - r).raw(check)
            yield band

    return Computed(shape, dtype, make, stream)


def common_scale(parts: list[Part]) -> float:
    for p in parts:
        if p.scale != 0.0:
            return p.scale
    return 0.0


@dataclass
class StdLayer:
    """One standard LoRA layer: dW = scale * b @ a."""

    a: Source  # [R, in]
    b: Source  # [out, R]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def standard_layer(m: LoraModule, lo: int, hi: int) -> StdLayer | None:
    """The single standard LoRA giving exactly module m's weight change on rows lo:hi, or None.

    One part covering the rows keeps its tensors untouched (bit-exact); several parts become one LoRA of
    summed rank with their up matrices placed block-diagonally, different scales folded into the ups.
    """
    pieces = [(p, max(lo, p.rows[0]), min(hi, p.rows[1])) for p in m.parts
              if p.rows[0] < hi and p.rows[1] > lo]
    if not pieces:
        return None
    if len(pieces) == 1:
        p, r0, r1 = pieces[0]
        if (r0, r1) == (lo, hi):
            return StdLayer(p.down, p.up.rows(r0 - p.rows[0], r1 - p.rows[0]), p.scale)
    scale = common_scale([p for p, _, _ in pieces])
    downs, blocks, col = [], [], 0
    for p, r0, r1 in pieces:
        up = p.up.rows(r0 - p.rows[0], r1 - p.rows[0])
        if p.scale != scale:
            up = folded(up, p.scale / scale if scale else 0.0)
        downs.append(p.down)
        blocks.append((r0 - lo, col, up))
        col += p.rank
    return StdLayer(cat_rows(downs), placed((hi - lo, col), blocks), scale)


def parts_from_standard(a: Source, b: Source, scale: float, row0: int, hint: int) -> list[Part]:
    """Parts for a standard LoRA layer on rows row0:row0+out.

    A block-diagonal b (exactly zero off its diagonal blocks) is split back into its blocks: the finest
    equal split whose diagonal blocks are all nonzero, or `hint` blocks (the module's native chunking)
    even where some are zero. So a zero-initialised b stays whole. Otherwise it stays one part.
    """
    out, R = b.shape
    g = _block_split(b, hint)
    if g > 1:
        r, h = R // g, out // g
        return [Part((row0 + j * h, row0 + (j + 1) * h), a.rows(j * r, (j + 1) * r),
                     _rect(b, j * h, (j + 1) * h, j * r, (j + 1) * r), scale) for j in range(g)]
    return [Part((row0, row0 + out), a, b, scale)]


def _rect(b: Source, r0: int, r1: int, c0: int, c1: int) -> Source:
    if isinstance(b, FileSource):
        return b.rows(r0, r1).cols(c0, c1)  # type: ignore[union-attr]
    k = ITEMSIZE[b.dtype]
    return Computed((r1 - r0, c1 - c0), b.dtype,
                    lambda check: np.ascontiguousarray(b.raw(check)[r0:r1, c0 * k:c1 * k]))


def _block_split(b: Source, hint: int) -> int:
    """How many equal diagonal blocks b splits into exactly (1 if none)."""
    out, R = b.shape
    n = math.gcd(out, R)
    cands = [g for g in range(n, 1, -1) if n % g == 0]
    if not cands:
        return 1
    k = ITEMSIZE[b.dtype]
    u = np.ascontiguousarray(b.raw()).view({2: np.uint16, 4: np.uint32, 8: np.uint64}[k]).reshape(out, R)
    nonzero = (u & np.array((1 << (8 * k - 1)) - 1, dtype=u.dtype)) != 0  # -0.0 counts as zero
    for g in cands:
        r, h = R // g, out // g
        for j in range(g):
            rows = nonzero[j * h:(j + 1) * h]
            if rows[:, :j * r].any() or rows[:, (j + 1) * r:].any():
                break
            if g != hint and not rows[:, j * r:(j + 1) * r].any():
                break
        else:
            return g
    return 1


def native_blocks(m: LoraModule, chunks_hint: int) -> tuple[Source, list[Source], float]:
    """(down, up blocks, alpha_scale) in LongCat's native form, exact for any parts.

    Parts on an equal row grid (the module's native chunking, or as many cells as parts) become up
    blocks; ranks that differ are zero-padded, missing cells are zero blocks, differing scales are folded
    into the ups. Anything else becomes a single up block (one standard LoRA).
    """
    parts = sorted(m.parts, key=lambda p: p.rows)
    out = m.out_features
    for g in dict.fromkeys([chunks_hint, len(parts)]):
        if g < 1 or out % g:
            continue
        h = out // g
        cells: dict[int, Part] = {}
        for p in parts:
            k = p.rows[0] // h
            if p.rows != (k * h, (k + 1) * h) or k in cells:
                break
            cells[k] = p
        else:
            scale = common_scale(parts)
            r = max(p.rank for p in parts)
            if len(cells) == g and all(p.rank == r and p.scale == scale for p in parts):
                return cat_rows([p.down for p in parts]), [p.up for p in parts], scale
            downs, ups = [], []
            down_dtype = promote(*(p.down.dtype for p in parts))
            for k in range(g):
                p = cells.get(k)
                if p is None:
                    downs.append(_zeros((r, m.in_features), down_dtype))
                    ups.append(_zeros((h, r), promote(*(q.up.dtype for q in parts))))
                    continue
                up = p.up if p.scale == scale else folded(p.up, p.scale / scale if scale else 0.0)
                downs.append(_pad_rows(p.down, r))
                ups.append(_pad_cols(up, r))
            return cat_rows(downs), ups, scale
    layer = standard_layer(m, 0, out)
    assert layer is not None
    return layer.a, [layer.b], layer.scale


def _zeros(shape: tuple[int, int], dtype: str) -> Source:
    return Computed(shape, dtype, lambda check: np.zeros((shape[0], shape[1] * ITEMSIZE[dtype]), dtype=np.uint8))


def _pad_rows(s: Source, r: int) -> Source:
    if s.shape[0] == r:
        return s
    return cat_rows([s, _zeros((r - s.shape[0], s.shape[1]), s.dtype)])


def _pad_cols(s: Source, r: int) -> Source:
    if s.shape[1] == r:
        return s
    return placed((s.shape[0], r), [(0, 0, s)])
