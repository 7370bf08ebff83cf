"""The factor spool: an anonymous temp file that extract appends factors to, read back as lazy sources,
so a 48-block extraction at rank 128 does not hold gigabytes of factors in memory."""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

import numpy as np

from ..model.sources import Source, Stored
from ..errors import LoraError
from ..io.dtypes import ITEMSIZE, dtype_name

if TYPE_CHECKING:
    import torch


class Spool:
    """An anonymous temp file the factors are appended to, so they never all sit in memory."""

    def __init__(self, directory: str):
        self.f = tempfile.TemporaryFile(dir=directory)
        self.end = 0

    def put(self, t: torch.Tensor) -> Source:
        """Append a 2-D float tensor; returns a Source reading it back."""
        raw = t.detach().to("cpu").contiguous().view(-1).numpy().view(np.uint8)
        mv = memoryview(raw).cast("B")
        fd, off, done = self.f.fileno(), self.end, 0
        while done < mv.nbytes:
            done += os.pwrite(fd, mv[done:], off + done)
        self.end += mv.nbytes
        return _SpoolSource((int(t.shape[0]), int(t.shape[1])), dtype_name(t.dtype), fd, off)

    def close(self) -> None:
        self.f.close()


class _SpoolSource(Stored):
    """A factor in the spool: rows read back with pread (checked for NaN/Inf as every stored source is)."""

    def __init__(self, shape: tuple[int, int], dtype: str, fd: int, offset: int):
        super().__init__(shape, dtype)
        self.fd, self.offset = fd, offset

    def fetch(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        item = ITEMSIZE[self.dtype]
        width = self.shape[1] * item
        n, start = (r1 - r0) * width, self.offset + r0 * width
        buf = bytearray(n)
        mv, got = memoryview(buf), 0
        while got < n:
            k = os.preadv(self.fd, [mv[got:]], start + got)
            if k <= 0:
                raise LoraError(f"extract: spool file truncated at byte {start + got}")
            got += k
        a = np.frombuffer(buf, dtype=np.uint8).reshape(r1 - r0, width)
        return a if (c0, c1) == (0, self.shape[1]) else np.ascontiguousarray(a[:, c0 * item:c1 * item])


__all__ = ["Spool"]
