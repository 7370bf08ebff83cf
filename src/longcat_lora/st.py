"""Streaming safetensors I/O: a validating lazy reader, an incremental writer, atomic outputs.

Why not `safetensors.safe_open` for reading: it memory-maps the file, and every page it touches counts
toward the process's resident memory until the map is closed, so converting a 1.6 GB file would show a
1.6 GB peak. Here each tensor (or row range) is read with one `pread` into a fresh buffer and released
after use, so peak memory is the largest tensor, not the file. The header is validated before any data is
read (offsets, sizes, dtypes), and nothing is ever unpickled. Files written here load with `safetensors`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import LoraError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def sniff(path: str) -> str | None:
    """Name what a non-safetensors file is, from its first bytes (never by its name), or None."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a pickled PyTorch checkpoint, .pt/.ckpt/.bin?); it is refused, never unpickled"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "a Python pickle (a PyTorch checkpoint?); it is refused, never unpickled"
    if head.startswith(b"GGUF"):
        return "a GGUF file, not safetensors"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file, not safetensors"
    return None


class SafeFile:
    """A safetensors file opened for lazy, validated, per-tensor reads."""

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise LoraError(f"{self.path}: no such file")
        what = sniff(self.path)
        if what is not None:
            raise LoraError(f"{self.path}: not a safetensors file: {what}")
        self.size = os.path.getsize(self.path)
        if self.size < 8:
            raise LoraError(f"{self.path}: not a safetensors file: only {self.size} bytes")
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.tensors, self.metadata = self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n == 0 or n > MAX_HEADER or n > self.size - 8:
            raise LoraError(f"{self.path}: not a safetensors file or truncated: header length {n} "
                            f"does not fit a {self.size}-byte file")
        raw = os.pread(self._fd, n, 8)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise LoraError(f"{self.path}: not a safetensors file: its header is not JSON") from None
        if not isinstance(header, dict):
            raise LoraError(f"{self.path}: corrupt safetensors header: not a JSON object")
        base = 8 + n
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise LoraError(f"{self.path}: corrupt safetensors header: __metadata__ must map strings to strings")
        infos: dict[str, TensorInfo] = {}
        spans = []
        for name, entry in header.items():
            try:
                dtype_name, shape, (lo, hi) = entry["dtype"], entry["shape"], entry["data_offsets"]
                shape = tuple(int(s) for s in shape)
                lo, hi = int(lo), int(hi)
            except (KeyError, TypeError, ValueError):
                raise LoraError(f"{self.path}: corrupt safetensors header entry for tensor {name!r}") from None
            if dtype_name not in DTYPES:
                raise LoraError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype_name!r}")
            dtype = DTYPES[dtype_name]
            if any(s < 0 for s in shape) or lo < 0 or hi < lo:
                raise LoraError(f"{self.path}: corrupt safetensors header entry for tensor {name!r}")
            itemsize = torch.empty((), dtype=dtype).element_size()
            if math.prod(shape) * itemsize != hi - lo:
                raise LoraError(f"{self.path}: tensor {name!r}: {hi - lo} bytes stored for shape "
                                f"{list(shape)} {dtype_name} (corrupt header)")
            if base + hi > self.size:
                raise LoraError(f"{self.path}: truncated: tensor {name!r} ends at byte {base + hi} "
                                f"but the file has {self.size}")
            infos[name] = TensorInfo(dtype, shape, base + lo, base + hi)
            spans.append((lo, hi, name))
        spans.sort()
        for (lo0, hi0, a), (lo1, hi1, b) in zip(spans, spans[1:]):
            if lo1 < hi0:
                raise LoraError(f"{self.path}: corrupt safetensors file: tensors {a!r} and {b!r} overlap")
        return infos, metadata

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafeFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor, or a range of its first dimension, into fresh memory."""
        info = self.tensors[name]
        shape = list(info.shape)
        start, end = info.start, info.end
        if rows is not None:
            lo, hi = rows
            if not shape or not 0 <= lo <= hi <= shape[0]:
                raise LoraError(f"{self.path}: tensor {name!r}: rows {lo}:{hi} out of range for {shape}")
            row_bytes = (info.nbytes // shape[0]) if shape[0] else 0
            start, end = info.start + lo * row_bytes, info.start + hi * row_bytes
            shape[0] = hi - lo
        count = end - start
        buf = bytearray(count)
        view = memoryview(buf)
        got = 0
        while got < count:
            n = os.preadv(self._fd, [view[got:]], start + got)
            if n <= 0:
                raise LoraError(f"{self.path}: truncated while reading tensor {name!r}")
            got += n
        if count == 0:
            return torch.empty(shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(shape)


@dataclass
class Entry:
    """One tensor to write: its header facts up front, its data produced on demand (streamed)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]


def write_safetensors(path: str, entries: Iterable[Entry], metadata: dict[str, str] | None = None,
                      progress: Callable[[int], None] | None = None) -> None:
    """Write header first, then each tensor as it is produced; peak memory is one tensor.

    Each produced tensor must match its declared dtype and shape: a mismatch is a bug, not bad input.
    """
    entries = list(entries)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for e in entries:
        if e.name in header:
            raise ValueError(f"duplicate tensor name {e.name!r}")
        nbytes = math.prod(e.shape) * torch.empty((), dtype=e.dtype).element_size()
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            t = e.produce()
            if t.dtype != e.dtype or tuple(t.shape) != tuple(e.shape):
                raise AssertionError(f"{e.name}: produced {t.dtype} {list(t.shape)}, "
                                     f"declared {e.dtype} {list(e.shape)}")
            data = t.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                f.write(memoryview(data.view(torch.uint8).numpy()))
            if progress is not None:
                progress(data.numel() * data.element_size())


def _check_out(out: str, overwrite: bool, inputs: Iterable[str]) -> None:
    real_out = os.path.realpath(out)
    for p in inputs:
        real_in = os.path.realpath(p)
        if real_out == real_in:
            raise LoraError(f"{out}: output is the same path as input {p}; refusing to overwrite the input")
        if os.path.isdir(real_in) and (real_out + os.sep).startswith(real_in.rstrip(os.sep) + os.sep):
            raise LoraError(f"{out}: output is inside input directory {p}; refusing")
    if os.path.lexists(out) and not overwrite:
        raise LoraError(f"{out}: already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise LoraError(f"{out}: parent directory {parent} does not exist")


@contextmanager
def atomic_output(out: str, *, overwrite: bool = False, inputs: Iterable[str] = (),
                  directory: bool = False) -> Iterator[str]:
    """Yield a temp path beside `out`; move it into place only if the block finishes.

    On any error the temp file (or directory) is removed and `out` is untouched: never a partial or
    clobbered output.
    """
    _check_out(out, overwrite, list(inputs))
    parent = os.path.dirname(os.path.abspath(out))
    base = os.path.basename(os.path.normpath(out))
    if directory:
        tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        if os.path.isdir(out) and not os.path.islink(out):
            old = tempfile.mkdtemp(prefix=f".{base}.", suffix=".old", dir=parent)
            os.rmdir(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if directory and os.path.lexists(out):
                os.remove(out)
            os.replace(tmp, out)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise
