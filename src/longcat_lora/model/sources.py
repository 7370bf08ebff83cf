"""Lazy 2-D tensors ("sources"): known by shape and dtype, their bytes produced only when asked for.

Every source is built one way: a `Source` subclass whose `__init__` works out its shape and dtype and
passes them (and the sources it is made from) to `Source.__init__`. Every source answers the same
questions, counted in elements:

    block(r0, r1, c0, c1)   the bytes of elements [r0:r1, c0:c1] (uint8 [rows, cols * itemsize])
    region / rows / cols    a slice of it, itself a source (free: nothing is read)
    chunks()                all its bytes in consecutive row bands, for streaming writers
    span(r0, r1)            where full rows r0:r1 lie unchanged in a file, if they do (copied, not read)
    load()                  a torch tensor, for arithmetic

Bytes enter only through `Stored` sources (a tensor in a file, in memory, in a spool file). They are the
one place values are checked for NaN/Inf: while a stored source's `refuse_nonfinite` is set (see
`LoraAdapter.refusing_nonfinite`), a read that finds one raises `NonFinite`; bytes a writer copies file to
file unread (`span`) are scanned as they are copied, under the same flag. Derived sources (slices, casts,
concatenations, block placements) never check: what they read was checked where it was read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..errors import LoraError
from ..io.dtypes import ITEMSIZE, decode, dtype_name, nonfinite, tensor_bytes, torch_dtype
from ..io.reader import FileRange, SafeFile

if TYPE_CHECKING:
    import torch


class NonFinite(LoraError):
    """Inf or NaN where a finite LoRA weight was expected."""


class Source:
    """A lazy 2-D float tensor. Subclasses implement `block`; everything else derives from it."""

    def __init__(self, shape: tuple[int, int], dtype: str, inputs: tuple[Source, ...] = ()):
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.inputs = inputs  # the sources this one is computed from (none for stored bytes)

    def block(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """The bytes of elements [r0:r1, c0:c1] as uint8 [r1 - r0, (c1 - c0) * itemsize]."""
        raise NotImplementedError

    def region(self, r0: int, r1: int, c0: int, c1: int) -> Source:
        """Elements [r0:r1, c0:c1] as a source of their own; nothing is read."""
        if (r0, r1, c0, c1) == (0, self.shape[0], 0, self.shape[1]):
            return self
        return Slice(self, r0, r1, c0, c1)

    def rows(self, lo: int, hi: int) -> Source:
        return self.region(lo, hi, 0, self.shape[1])

    def cols(self, lo: int, hi: int) -> Source:
        return self.region(0, self.shape[0], lo, hi)

    def raw(self) -> np.ndarray:
        """All the bytes, uint8 [rows, cols * itemsize]."""
        return self.block(0, self.shape[0], 0, self.shape[1])

    def chunks(self) -> Iterator[np.ndarray]:
        """The bytes in consecutive row bands; each band is valid until the next one is asked for."""
        yield self.raw()

    def load(self) -> torch.Tensor:
        """A torch tensor of these values (may share memory with the source: do not modify it)."""
        import torch

        raw = np.ascontiguousarray(self.raw())
        if not raw.flags.writeable:
            raw = raw.copy()
        return torch.from_numpy(raw.reshape(-1)).view(torch_dtype(self.dtype)).reshape(self.shape)

    def span(self, r0: int, r1: int) -> tuple[FileTensor, FileRange] | None:
        """Where full rows r0:r1 lie unchanged in a file, if they do (so they can be copied unread)."""
        return None

    def file_range(self) -> tuple[FileTensor, FileRange] | None:
        """Where all these bytes lie unchanged in a file, if they do."""
        return self.span(0, self.shape[0])

    def stored(self) -> Iterator[Stored]:
        """The stored sources this one reads (itself, if it is one)."""
        for s in self.inputs:
            yield from s.stored()


class Stored(Source):
    """Bytes that come from storage: the one place values are checked (see the module docstring)."""

    refuse_nonfinite = False

    def fetch(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """The stored bytes of elements [r0:r1, c0:c1]."""
        raise NotImplementedError

    def block(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        a = self.fetch(r0, r1, c0, c1)
        if self.refuse_nonfinite and nonfinite(a, self.dtype):
            raise NonFinite("non-finite values (NaN/Inf)")
        return a

    def stored(self) -> Iterator[Stored]:
        yield self


class FileTensor(Stored):
    """A 2-D tensor in an open safetensors file (its header already validated by `SafeFile`)."""

    def __init__(self, file: SafeFile, key: str):
        info = file.info(key)
        super().__init__(info.shape, info.dtype)  # type: ignore[arg-type]
        self.file, self.key = file, key

    def fetch(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        a = self.file.read_raw(self.key, (r0, r1))
        if (c0, c1) != (0, self.shape[1]):
            k = ITEMSIZE[self.dtype]
            a = np.ascontiguousarray(a[:, c0 * k:c1 * k])
        return a

    def span(self, r0: int, r1: int) -> tuple[FileTensor, FileRange] | None:
        off, n = self.file.byte_range(self.key, (r0, r1))
        return self, FileRange(self.file.fd, off, n, self.file.path, self.key)


class TensorSource(Stored):
    """An in-memory torch tensor."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.dim() != 2 or not tensor.dtype.is_floating_point:
            raise LoraError(f"LoRA weights must be 2-D float tensors, got {tensor.dtype} {list(tensor.shape)}")
        self.tensor = tensor.detach().cpu().contiguous()
        super().__init__(tuple(self.tensor.shape), dtype_name(self.tensor.dtype))  # type: ignore[arg-type]

    def fetch(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return _bytes(self.tensor[r0:r1, c0:c1])


class Slice(Source):
    """Elements [r0:r1, c0:c1] of another source."""

    def __init__(self, of: Source, r0: int, r1: int, c0: int, c1: int):
        if not (0 <= r0 <= r1 <= of.shape[0] and 0 <= c0 <= c1 <= of.shape[1]):
            raise ValueError(f"slice [{r0}:{r1}, {c0}:{c1}] outside a {list(of.shape)} source")
        super().__init__((r1 - r0, c1 - c0), of.dtype, (of,))
        self.of, self.r0, self.c0, self.full_width = of, r0, c0, (c0, c1) == (0, of.shape[1])

    def block(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return self.of.block(self.r0 + r0, self.r0 + r1, self.c0 + c0, self.c0 + c1)

    def region(self, r0: int, r1: int, c0: int, c1: int) -> Source:
        if (r0, r1, c0, c1) == (0, self.shape[0], 0, self.shape[1]):
            return self
        return self.of.region(self.r0 + r0, self.r0 + r1, self.c0 + c0, self.c0 + c1)

    def span(self, r0: int, r1: int) -> tuple[FileTensor, FileRange] | None:
        return self.of.span(self.r0 + r0, self.r0 + r1) if self.full_width else None


class Computed(Source):
    """Bytes computed whole from other sources (or from nothing) when first asked for; a block of it is
    cut from the whole."""

    def __init__(self, shape: tuple[int, int], dtype: str, make: Callable[[], np.ndarray],
                 inputs: tuple[Source, ...] = ()):
        super().__init__(shape, dtype, inputs)
        self.make = make

    def block(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        a = self.make()
        if (r0, r1, c0, c1) == (0, self.shape[0], 0, self.shape[1]):
            return a
        k = ITEMSIZE[self.dtype]
        return np.ascontiguousarray(a[r0:r1, c0 * k:c1 * k])


class Placed(Source):
    """A zero matrix with each (row offset, col offset, source) block written in (same dtype)."""

    def __init__(self, shape: tuple[int, int], pieces: list[tuple[int, int, Source]]):
        super().__init__(shape, pieces[0][2].dtype, tuple(s for _, _, s in pieces))
        self.pieces = pieces

    def _fill(self, out: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Write into `out` (zeros, [r1 - r0, (c1 - c0) * k]) the pieces' elements inside [r0:r1, c0:c1]."""
        k = ITEMSIZE[self.dtype]
        for r, c, s in self.pieces:
            lo, hi = max(r0, r), min(r1, r + s.shape[0])
            left, right = max(c0, c), min(c1, c + s.shape[1])
            if lo < hi and left < right:
                out[lo - r0:hi - r0, (left - c0) * k:(right - c0) * k] = s.block(lo - r, hi - r, left - c, right - c)
        return out

    def block(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        out = np.zeros((r1 - r0, (c1 - c0) * ITEMSIZE[self.dtype]), dtype=np.uint8)
        return self._fill(out, r0, r1, c0, c1)

    def chunks(self) -> Iterator[np.ndarray]:
        # Band by band through one reused scratch buffer: a block-diagonal matrix is mostly zeros, and
        # building it whole would fault in (and stream through memory) the full size for each module.
        rows, cols = self.shape
        cuts = sorted({0, rows, *(r for r, _, _ in self.pieces), *(r + s.shape[0] for r, _, s in self.pieces)})
        width = cols * ITEMSIZE[self.dtype]
        scratch = np.empty(0, dtype=np.uint8)
        for b0, b1 in zip(cuts, cuts[1:]):
            n = (b1 - b0) * width
            if scratch.size < n:
                scratch = np.empty(n, dtype=np.uint8)
            band = scratch[:n].reshape(b1 - b0, width)
            band.fill(0)
            yield self._fill(band, b0, b1, 0, cols)


# ---------------------------------------------------------------- derived sources

_ORDER = ["F16", "BF16", "F32", "F64"]


def promote(*dtypes: str) -> str:
    """The narrowest float dtype holding every input exactly (F16 + BF16 -> F32)."""
    ds = set(dtypes)
    if len(ds) == 1:
        return ds.pop()
    return max(ds | {"F32"}, key=_ORDER.index)


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A 2-D tensor's bytes as uint8 [rows, cols * itemsize]."""
    return tensor_bytes(t).reshape(t.shape[0], t.shape[1] * t.element_size())


def _floats(dtype: str) -> type:
    return np.float64 if dtype == "F64" else np.float32


def cast(src: Source, dtype: str) -> Source:
    """src in a wider float dtype (F32 or F64, as `promote` picks): exact, computed only when the dtype
    changes."""
    if src.dtype == dtype:
        return src
    if dtype not in ("F32", "F64"):
        raise ValueError(f"cast widens to F32 or F64, not {dtype}")

    def make() -> np.ndarray:
        out = decode(src.raw(), src.dtype, np.empty(src.shape, _floats(dtype)))
        return out.view(np.uint8)

    return Computed(src.shape, dtype, make, (src,))


def folded(src: Source, factor: float) -> Source:
    """src * factor, computed in float64 and stored in at least float32 (exact to one fp32 rounding).

    A product that overflows the stored dtype is refused (`NonFinite`) while the stored sources it reads
    refuse non-finite values, as the values read are."""
    if factor == 1.0:
        return src
    dtype = "F64" if src.dtype == "F64" else "F32"
    out = lambda: fold_into(src, factor, np.empty(src.shape, _floats(dtype)))  # noqa: E731
    return Computed(src.shape, dtype, lambda: out().view(np.uint8), (src,))


def negated(src: Source) -> Source:
    """-src exactly, in src's dtype: every sign bit flipped (so NaN/Inf stay what they are)."""
    k = ITEMSIZE[src.dtype]
    uint, sign = {2: (np.uint16, 0x8000), 4: (np.uint32, 0x80000000), 8: (np.uint64, 1 << 63)}[k]

    def make() -> np.ndarray:
        a = np.array(src.raw(), dtype=np.uint8, copy=True).reshape(src.shape[0], -1)
        a.view(uint)[...] ^= uint(sign)
        return a

    return Computed(src.shape, src.dtype, make, (src,))


def fold_into(src: Source, factor: float, out: np.ndarray) -> np.ndarray:
    """Write src * factor into `out` (float32 or float64, any strides): computed in float64, rounded once.

    The values read were checked for Inf/NaN as they were read (while the stored sources refuse them); a
    product can only overflow if |factor| > 1, so only then is the result scanned (`NonFinite`)."""
    x = decode(src.raw(), src.dtype, np.empty(src.shape, np.float64))
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
        np.multiply(x, factor, out=out, casting="same_kind")
    if abs(factor) > 1.0 and any(s.refuse_nonfinite for s in src.stored()) and not bool(np.isfinite(out).all()):
        raise NonFinite("non-finite values (NaN/Inf)")
    return out


def cat_rows(srcs: list[Source]) -> Source:
    """The sources stacked row-wise (in a dtype holding them all)."""
    if len(srcs) == 1:
        return srcs[0]
    joined = _adjacent_rows(srcs)
    if joined is not None:
        return joined
    dtype = promote(*(s.dtype for s in srcs))
    srcs = [cast(s, dtype) for s in srcs]
    shape = (sum(s.shape[0] for s in srcs), srcs[0].shape[1])
    return Computed(shape, dtype, lambda: np.concatenate([s.raw() for s in srcs], 0), tuple(srcs))


def _adjacent_rows(srcs: list[Source]) -> Source | None:
    """The one region the sources are, when they are consecutive row slices of one source (the parts of
    a split module put back together): a source of its own that still lies in the file, so a writer
    copies it unread instead of concatenating it. None otherwise."""
    first = srcs[0]
    if not isinstance(first, Slice):
        return None
    of, r, c0, c1 = first.of, first.r0, first.c0, first.c0 + first.shape[1]
    for s in srcs:
        if not (isinstance(s, Slice) and s.of is of and s.r0 == r and (s.c0, s.c0 + s.shape[1]) == (c0, c1)):
            return None
        r += s.shape[0]
    return of.region(first.r0, r, c0, c1)


def placed(shape: tuple[int, int], pieces: list[tuple[int, int, Source]]) -> Source:
    """A zero matrix with each (row offset, col offset, source) block written in (a dtype holding all)."""
    dtype = promote(*(s.dtype for _, _, s in pieces))
    return Placed(shape, [(r, c, cast(s, dtype)) for r, c, s in pieces])


def zeros(shape: tuple[int, int], dtype: str) -> Source:
    return Computed(shape, dtype, lambda: np.zeros((shape[0], shape[1] * ITEMSIZE[dtype]), dtype=np.uint8))
