"""Reading one up block of a weight change, W_tuned - W_base, into reused buffers.

TUNED's rows are read (one pread into a reused byte buffer) and converted into a reused compute buffer,
then BASE's rows are read into the same byte buffer and subtracted in place: about two weights in
memory, never a checkpoint. Blocks of up to `FLOAT64_BELOW` elements (and float64 inputs) are computed
in float64, larger ones in float32. An INT8 weight is read as `weight_int8 * weight_scale[:, None]`
(exact in float64, one rounding in float32).
"""

from __future__ import annotations

import numpy as np

from ..io.dtypes import torch_dtype
from .extract_plan import CanonParam, Piece

FLOAT64_BELOW = 1 << 22  # blocks with at most this many elements are computed in float64 (4M: 32 MiB)


class ChangeWorkspace:
    """Reused buffers: one for raw bytes, one for the change in the compute dtype (and a device stage)."""

    def __init__(self, device: str):
        import torch

        self.device = device
        self.raw = np.empty(0, dtype=np.uint8)
        self.bufs: dict[torch.dtype, torch.Tensor] = {}
        self.stage: dict[torch.dtype, torch.Tensor] = {}

    def _buf(self, pool: dict, dtype, n: int):
        import torch

        b = pool.get(dtype)
        if b is None or b.numel() < n:
            pool.pop(dtype, None)
            b = pool[dtype] = torch.empty(n, dtype=dtype, device=self.device)
        return b[:n]

    def _rows(self, pc: Piece, a: int, b: int):
        """Rows a:b (of the canonical parameter) of one piece, as a CPU tensor over the reused byte buffer."""
        import torch

        info = pc.file.info(pc.tensor)
        start, count = pc.file.byte_range(pc.tensor, (a - pc.lo, b - pc.lo))
        if self.raw.size < count:
            self.raw = np.empty(count, dtype=np.uint8)
        buf = self.raw[:count]
        pc.file._pread(pc.tensor, start, memoryview(buf))
        return torch.from_numpy(buf).view(torch_dtype(info.dtype)).view(b - a, *info.shape[1:])

    def _read(self, p: CanonParam, lo: int, hi: int, into, subtract: bool) -> None:
        """into (+)= rows lo:hi of p, piece by piece (into is [hi-lo, cols] on the device)."""
        import torch

        for pc in p.pieces:
            a, b = max(lo, pc.lo), min(hi, pc.hi)
            if a >= b:
                continue
            dst = into[a - lo:b - lo]
            plain = p.scale is None
            if plain and not subtract:
                dst.copy_(self._rows(pc, a, b))
                continue
            if plain and into.device.type == "cpu":
                dst.sub_(self._rows(pc, a, b))
                continue
            stage = self._buf(self.stage, into.dtype, dst.numel()).view(dst.shape)
            stage.copy_(self._rows(pc, a, b))
            if not plain:  # int8 * its row's scale, in the compute dtype (exact in float64)
                scale = torch.empty(b - a, dtype=into.dtype)
                for sc in p.scale.pieces:
                    c, d = max(a, sc.lo), min(b, sc.hi)
                    if c < d:
                        scale[c - a:d - a].copy_(self._rows(sc, c, d))
                stage.mul_(scale.to(into.device)[:, None])
            if subtract:
                dst.sub_(stage)
            else:
                dst.copy_(stage)

    def change(self, base: CanonParam, tuned: CanonParam, lo: int, hi: int):
        """W_tuned - W_base on rows lo:hi, in float64 when small (or float64 in), float32 otherwise."""
        import torch

        n = (hi - lo) * base.shape[1]
        wide = n <= FLOAT64_BELOW or "F64" in base.dtypes | tuned.dtypes
        dtype = torch.float64 if wide else torch.float32
        d = self._buf(self.bufs, dtype, n).view(hi - lo, base.shape[1])
        self._read(tuned, lo, hi, d, subtract=False)
        self._read(base, lo, hi, d, subtract=True)
        return d


__all__ = ["FLOAT64_BELOW", "ChangeWorkspace"]
