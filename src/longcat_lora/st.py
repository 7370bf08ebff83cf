"""Streaming safetensors I/O: a validating lazy reader, an incremental writer, atomic outputs.

Why not `safetensors.safe_open` for reading: it memory-maps the file, and every page it touches counts
toward the process's resident memory until the map is closed, so converting a 1.6 GB file would show a
1.6 GB peak. Here each tensor (or row range) is read with one `pread` into a fresh buffer and released
after use, so peak memory is the largest tensor, not the file. The header is validated before any data is
read (offsets, sizes, dtypes), and nothing is ever unpickled. Files written here load with `safetensors`.
"""

from __future__ import annotations

import errno
import gc
import json
import math
import mmap
import os
import re
import shutil
import stat
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .errors import LoraError
from .interrupts import critical

if TYPE_CHECKING:
    import torch

# dtype name (safetensors spelling) -> item size in bytes. Torch is not needed to read or write files,
# and importing it costs more than copying a gigabyte, so it is only imported for arithmetic.
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
FLOATS = ("F16", "BF16", "F32", "F64")  # float dtypes a LoRA weight may have
INTS = ("I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64")
_BITS = {2: (np.uint16, np.int16), 4: (np.uint32, np.int32), 8: (np.uint64, np.int64)}
# |bits| at or above which a float is Inf or NaN
_NONFINITE = {"F16": 0x7C00, "BF16": 0x7F80, "F32": 0x7F800000, "F64": 0x7FF0000000000000}
_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
          "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}

# The safetensors library refuses a header over 100,000,000 bytes ("header too large"); so does this
# reader, before reading it. About 70 bytes per tensor: ~1.4 million tensors.
MAX_HEADER = 100_000_000


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON allows the escape; UTF-8 cannot hold it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} out of range")
    return value


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, _TORCH[name])


def dtype_name(dtype: torch.dtype) -> str:
    s = str(dtype).removeprefix("torch.")
    for k, v in _TORCH.items():
        if v == s:
            return k
    raise ValueError(f"unsupported dtype {dtype}")


def nonfinite(raw: np.ndarray, dtype: str) -> bool:
    """True if raw little-endian float data holds an Inf or NaN (bit test, no conversion)."""
    if dtype not in _NONFINITE or raw.size == 0:
        return False
    u_t, s_t = _BITS[ITEMSIZE[dtype]]
    flat = raw.reshape(-1)
    t = _NONFINITE[dtype]
    sign = 1 << (8 * ITEMSIZE[dtype] - 1)
    # positive Inf/NaN: largest as signed ints; negative ones: largest as unsigned ints
    return int(flat.view(s_t).max()) >= t or int(flat.view(u_t).max()) >= (sign | t)


def decode_scalar(raw: bytes, dtype: str) -> float:
    a = np.frombuffer(raw, dtype=np.uint8)
    if dtype == "BF16":
        return float((a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)[0])
    table = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64}
    if dtype not in table:
        raise ValueError(dtype)
    return float(a.view(table[dtype])[0])


def encode_scalar(value: float, dtype: str) -> bytes:
    """Little-endian bytes of one value in a float dtype (round to nearest even; a value too large for
    the dtype becomes inf, silently: `representable` is how callers ask)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype == "BF16":
            u = int(np.array(value, dtype=np.float32).view(np.uint32))
            if math.isnan(value):
                bits = 0x7FC0
            else:
                bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
            return struct.pack("<H", bits)
        return np.array(value, dtype={"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]).tobytes()


def representable(value: float, dtype: str) -> bool:
    return decode_scalar(encode_scalar(value, dtype), dtype) == value


class TensorInfo(NamedTuple):
    """Where one tensor lives in a safetensors file (a tuple: a header of a million tensors stays small)."""

    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


_U64 = 1 << 64  # safetensors reads offsets and sizes as usize (u64)
_DIM = 1 << 63  # a dimension must fit torch's int64
_DTYPE = {k: k for k in ITEMSIZE}  # one shared string per dtype name


class _Obj(list):
    """A JSON object as the header parser keeps it: its (key, value) pairs, in order."""

    __slots__ = ()


def _nbytes(shape: list, dtype: str) -> int | None:
    """Bytes of a tensor, or None if the element count overflows u64 (as safetensors checks it)."""
    n = 1
    for s in shape:
        n *= s
        if n >= _U64:
            return None
    return n * ITEMSIZE[dtype]


def _header_hook(base: int) -> Callable[[list], object]:
    """json object_pairs_hook: a well-formed tensor entry becomes its TensorInfo as soon as it is parsed
    (no dict per entry); anything else is kept as an _Obj, checked later with its name (`_entry`)."""
    itemsize, intern, info, obj = ITEMSIZE, _DTYPE, TensorInfo, _Obj
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per distinct shape

    def hook(pairs: list) -> object:
        if len(pairs) != 3:
            return obj(pairs)
        (k0, dtype), (k1, shape), (k2, offsets) = pairs
        if (k0 != "dtype" or k1 != "shape" or k2 != "data_offsets" or type(dtype) is not str
                or dtype not in intern or type(shape) is not list or type(offsets) is not list or len(offsets) != 2):
            return obj(pairs)
        lo, hi = offsets
        if type(lo) is not int or type(hi) is not int or not 0 <= lo <= hi < _U64:
            return obj(pairs)
        nbytes = itemsize[dtype]
        for s in shape:  # at most 2**63 - 1 each, so the running product cannot pass 2**64 unchecked
            if type(s) is not int or not 0 <= s < _DIM:
                return obj(pairs)
            nbytes *= s
            if nbytes >= _U64 * itemsize[dtype]:
                return obj(pairs)
        if nbytes != hi - lo:
            return obj(pairs)
        t = tuple(shape)
        return info(intern[dtype], shapes.setdefault(t, t), base + lo, base + hi)

    return hook


def sniff(path: str) -> str | None:
    """Name what a non-safetensors file is, from its first bytes (never by its name), or None."""
    fd = open_regular(path)
    try:
        return sniff_bytes(os.pread(fd, 16, 0))
    finally:
        os.close(fd)


def sniff_bytes(head: bytes) -> str | None:
    """Name what a file starting with `head` is when it is not safetensors, or None."""
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


def file_kind(mode: int) -> str:
    """What a file of this st_mode is, in words (for refusals)."""
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return what
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def open_regular(path: str) -> int:
    """Open an input for reading; anything but a regular file (after links) is refused, never read.

    The type is checked before opening (opening some devices has side effects) and again on the open
    descriptor (the path may have been swapped meanwhile); the open is non-blocking, so a FIFO with no
    writer cannot hang it.
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise LoraError(f"{path}: no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise LoraError(f"{path}: not a regular file ({file_kind(st.st_mode)})")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LoraError(f"{path}: not a regular file ({file_kind(st.st_mode)})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _stamp(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


class SafeFile:
    """A safetensors file opened for lazy, validated, per-tensor reads."""

    def __init__(self, path: str):
        self.path = str(path)
        self._fd = -1
        self._fd = open_regular(self.path)
        try:
            st = os.fstat(self._fd)
            self.size = st.st_size
            self._stamp = _stamp(st)
            head = os.pread(self._fd, 16, 0)
            plausible = (len(head) >= 9 and head[8:9] == b"{"
                         and 0 < struct.unpack("<Q", head[:8])[0] <= self.size - 8)
            what = None if plausible else sniff_bytes(head)  # a header length can look like a pickle's first bytes
            if what is not None:
                raise LoraError(f"{self.path}: not a safetensors file: {what}")
            if self.size < 8:
                raise LoraError(f"{self.path}: not a safetensors file: only {self.size} bytes")
            self.tensors, self.metadata = self._parse_header()
        except BaseException:
            self.close()
            raise

    def check_unchanged(self) -> None:
        """Raise if the file's size or mtime changed since it was opened (what was read may mix versions).

        Called after an output is written and before it is put in place; one fstat.
        """
        if self._fd < 0:
            return
        st = os.fstat(self._fd)
        if _stamp(st) != self._stamp:
            how = (f"was {self._stamp[0]} bytes, now {st.st_size}" if st.st_size != self._stamp[0]
                   else "modified during the run")
            raise LoraError(f"{self.path}: changed while being read ({how}); the output was not written")

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        """Parse and validate the header as the safetensors library does, in one pass of json.

        Refused, naming the tensor: a header over MAX_HEADER bytes (the library's own cap), text that is
        not UTF-8 or not strict JSON, nesting past the parser's limit, a name given twice (the library
        silently keeps the last one), a non-object entry, a missing field, an unknown dtype, a shape that
        is not a list of integers in [0, 2**63) or whose element count overflows 64 bits, offsets that
        are not two integers 0 <= begin <= end < 2**64 (booleans and 1.0 are not integers), a byte count
        that does not match the shape, and data that does not tile the rest of the file exactly.
        Time and memory are linear in the header: no dict per entry, the garbage collector paused.
        """
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n == 0 or n > MAX_HEADER or n > self.size - 8:
            raise LoraError(f"{self.path}: not a safetensors file or truncated: header length {n} "
                            + (f"is over the {MAX_HEADER:,}-byte limit" if n > MAX_HEADER and n <= self.size - 8
                               else f"does not fit a {self.size}-byte file"))
        raw = os.pread(self._fd, n, 8)
        if len(raw) != n:
            raise LoraError(f"{self.path}: truncated while reading its header")
        base = 8 + n
        gc_was = gc.isenabled()
        gc.disable()  # a million small containers would trigger collections over and over
        try:
            try:
                text = raw.decode("utf-8")
                del raw  # the bytes are not needed while the text is parsed
                header = json.loads(text, object_pairs_hook=_header_hook(base),
                                    parse_constant=_no_constant, parse_float=_finite_float)
            except UnicodeDecodeError:
                raise LoraError(f"{self.path}: not a safetensors file: its header is not UTF-8") from None
            except RecursionError:
                raise LoraError(f"{self.path}: corrupt safetensors header: nested too deeply") from None
            except ValueError as e:  # JSONDecodeError, NaN/Infinity, an integer of over 4300 digits
                what = e.msg if isinstance(e, json.JSONDecodeError) else str(e).splitlines()[0][:80]
                raise LoraError(f"{self.path}: not a safetensors file: its header is not JSON ({what})") from None
            del text
            if type(header) is not _Obj:
                raise LoraError(f"{self.path}: corrupt safetensors header: not a JSON object")
            infos: dict[str, object] = dict(header)
            if len(infos) != len(header):
                seen: set[str] = set()
                dup = next(k for k, _ in header if k in seen or seen.add(k))  # type: ignore[func-returns-value]
                raise LoraError(f"{self.path}: corrupt safetensors header: {dup!r} appears twice")
            del header
            metadata = self._metadata(infos.pop("__metadata__", None))
            for text in [k for k in infos if not k.isascii()] + [t for kv in metadata.items() for t in kv]:
                if not _unicode(text):  # a lone surrogate (\ud800): safetensors refuses the header
                    raise LoraError(f"{self.path}: corrupt safetensors header: {text[:80]!r} is not valid Unicode")
            for name in [k for k, v in infos.items() if type(v) is not TensorInfo]:
                infos[name] = self._entry(name, infos[name], base)
        finally:
            if gc_was:
                gc.enable()
        self._check_tiling(infos, base)  # type: ignore[arg-type]
        return infos, metadata  # type: ignore[return-value]

    def _metadata(self, raw: object) -> dict[str, str]:
        if raw is None:
            return {}
        if type(raw) is not _Obj or not all(type(v) is str for _, v in raw):
            raise LoraError(f"{self.path}: corrupt safetensors header: __metadata__ must map strings to strings")
        metadata = dict(raw)
        if len(metadata) != len(raw):
            raise LoraError(f"{self.path}: corrupt safetensors header: a __metadata__ key appears twice")
        return metadata

    def _entry(self, name: str, entry: object, base: int) -> TensorInfo:
        """Validate one header entry the fast path did not take, with a message naming what is wrong."""
        def bad(why: str) -> LoraError:
            return LoraError(f"{self.path}: corrupt safetensors header entry for tensor {name!r}: {why}")

        if type(entry) is not _Obj:
            raise bad("not an object")
        fields = dict(entry)  # unknown fields are ignored, as safetensors ignores them
        if len(fields) != len(entry):
            raise bad("a field appears twice")
        for f in ("dtype", "shape", "data_offsets"):
            if f not in fields:
                raise bad(f"no {f}")
        dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
        if type(dtype) is not str or dtype not in ITEMSIZE:
            raise LoraError(f"{self.path}: tensor {name!r} has unsupported dtype {str(dtype)[:40]!r}")
        if type(shape) is not list or not all(type(s) is int and 0 <= s < _DIM for s in shape):
            raise bad("shape must be a list of integers from 0 to 2**63 - 1")
        if (type(offsets) is not list or len(offsets) != 2 or not all(type(x) is int for x in offsets)
                or not 0 <= offsets[0] <= offsets[1] < _U64):
            raise bad("data_offsets must be two integers 0 <= begin <= end < 2**64")
        lo, hi = offsets
        nbytes = _nbytes(shape, dtype)
        if nbytes is None:
            raise bad("its shape has more than 2**64 elements")
        if nbytes != hi - lo:
            raise LoraError(f"{self.path}: tensor {name!r}: {hi - lo} bytes stored for shape "
                            f"{shape if len(shape) <= 8 else shape[:8] + ['...']} {dtype} (corrupt header)")
        return TensorInfo(_DTYPE[dtype], tuple(shape), base + lo, base + hi)

    def _check_tiling(self, infos: dict[str, TensorInfo], base: int) -> None:
        """Like the safetensors library: the data tiles the rest of the file exactly, in offset order."""
        end = base
        for info in infos.values():  # files as written: already in offset order, one pass
            if info.start != end:
                break
            end = info.end
        else:
            if end == self.size:
                return
        order = sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end))
        end = base
        for name, info in order:
            if info.start != end:
                what = ("overlaps the previous tensor" if info.start < end
                        else f"leaves a gap of {info.start - end} bytes")
                raise LoraError(f"{self.path}: corrupt safetensors file: tensor {name!r} {what}")
            if info.end > self.size:
                raise LoraError(f"{self.path}: truncated: tensor {name!r} ends at byte {info.end} "
                                f"but the file has {self.size}")
            end = info.end
        if end != self.size:
            raise LoraError(f"{self.path}: corrupt safetensors file: {self.size - end} bytes after "
                            f"the last tensor")

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

    def byte_range(self, name: str, rows: tuple[int, int] | None = None) -> tuple[int, int]:
        """(absolute offset, length) of a tensor, or of a range of its first dimension."""
        info = self.tensors[name]
        if rows is None:
            return info.start, info.nbytes
        lo, hi = rows
        if not info.shape or not 0 <= lo <= hi <= info.shape[0]:
            raise LoraError(f"{self.path}: tensor {name!r}: rows {lo}:{hi} out of range for {list(info.shape)}")
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        return info.start + lo * row_bytes, (hi - lo) * row_bytes

    def read_raw(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Raw bytes of a tensor (or a row range), shaped [rows, bytes per row] for 2-D tensors."""
        info = self.tensors[name]
        start, count = self.byte_range(name, rows)
        buf = bytearray(count)
        self._pread(name, start, memoryview(buf))
        a = np.frombuffer(buf, dtype=np.uint8)
        if len(info.shape) >= 2:
            nrows = (rows[1] - rows[0]) if rows else info.shape[0]
            a = a.reshape(nrows, -1) if nrows else a.reshape(0, math.prod(info.shape[1:]) * ITEMSIZE[info.dtype])
        return a

    def read_into(self, name: str, buf: memoryview) -> None:
        """Read a whole tensor's bytes into `buf` (exactly its size): no allocation, no page faults on reuse."""
        start, count = self.byte_range(name)
        if buf.nbytes != count:
            raise ValueError(f"{name}: buffer of {buf.nbytes} bytes for {count}")
        self._pread(name, start, buf)

    def _pread(self, name: str, start: int, buf: memoryview) -> None:
        """Fill `buf` from `start`; a read error names this file, and so does an end of file before it is full."""
        got = 0
        while got < buf.nbytes:
            try:
                n = os.preadv(self._fd, [buf[got:]], start + got)
            except OSError as e:
                raise OSError(e.errno, e.strerror, self.path) from e
            if n <= 0:
                raise short_read(self.path, name, buf.nbytes, got)
            got += n

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A tensor (or a row range of it) as a torch tensor in fresh memory."""
        import torch

        info = self.tensors[name]
        shape = list(info.shape)
        if rows is not None:
            shape[0] = rows[1] - rows[0]
        raw = self.read_raw(name, rows).reshape(-1)
        return torch.from_numpy(raw).view(torch_dtype(info.dtype)).reshape(shape)

    @property
    def fd(self) -> int:
        return self._fd

    def scan_nonfinite(self, rng: FileRange, dtype: str) -> bool:
        """Scan a byte range of this file for Inf/NaN bits through a read-only map (no copy).

        The map is released after the scan, so resident memory stays at one tensor's pages.
        """
        if dtype not in _NONFINITE or rng.nbytes == 0:
            return False
        gran = mmap.ALLOCATIONGRANULARITY
        start = rng.offset - rng.offset % gran
        size = os.fstat(self._fd).st_size  # a map past the end would fault (SIGBUS) when touched
        if size < rng.offset + rng.nbytes:
            raise short_read(self.path, rng.name, rng.nbytes, max(0, size - rng.offset))
        try:
            mm = mmap.mmap(self._fd, rng.offset - start + rng.nbytes, access=mmap.ACCESS_READ, offset=start)
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from e
        try:
            a = np.frombuffer(mm, dtype=np.uint8, count=rng.nbytes, offset=rng.offset - start)
            try:
                return nonfinite(a, dtype)
            finally:
                del a
        finally:
            mm.close()


@dataclass(frozen=True)
class FileRange:
    """Bytes to copy unchanged from an open file: written with copy_file_range, never through Python."""

    fd: int
    offset: int
    nbytes: int
    path: str = ""  # the input file, named when it turns out shorter than promised
    name: str = ""  # the tensor these bytes belong to, if one


def short_read(path: str, name: str, expected: int, got: int) -> LoraError:
    """The error for an input that ended before the bytes its header promised."""
    what = f"tensor {name!r}: " if name else ""
    return LoraError(f"{path or 'input'}: changed or truncated while being read "
                     f"({what}expected {expected} bytes, got {got})")


@dataclass
class Entry:
    """One tensor to write: its header facts up front, its bytes produced on demand (streamed)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray | bytes | FileRange | Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def write_safetensors(path: str, entries: Iterable[Entry], metadata: dict[str, str] | None = None,
                      progress: Callable[[int], None] | None = None, pipelined: bool = True) -> None:
    """Write header first, then each tensor as it is produced; peak memory is one tensor.

    Each produced buffer must have the declared size: a mismatch is a bug, not bad input.
    """
    entries = list(entries)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for e in entries:
        if e.name in header:
            raise ValueError(f"duplicate tensor name {e.name!r}")
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    # No O_TRUNC: ext4 flushes a file truncated to zero when it is closed (auto_da_alloc), which would
    # make every conversion wait for the disk. Outputs are always fresh temp files anyway.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    pending = None
    if os.fstat(fd).st_size:
        os.ftruncate(fd, 0)
    try:
        _write_all(fd, struct.pack("<Q", len(raw)) + raw)
        # Produce tensor i+1 (read, scan, assemble) on a second thread while tensor i is written:
        # numpy, pread, write and copy_file_range all release the GIL. At most two tensors in memory.
        # (Compute-heavy producers, like merging, run better alone: pipelined=False.)
        # Unchanged byte ranges that follow each other in the input are copied in one call.
        run: list[FileRange] = []  # contiguous ranges of one input, copied in one go
        with ThreadPoolExecutor(1) as pool:
            submit = pool.submit if pipelined else _Done
            pending = submit(entries[0].produce) if entries else None
            for i, e in enumerate(entries):
                data = pending.result()
                pending = submit(entries[i + 1].produce) if i + 1 < len(entries) else None
                if isinstance(data, FileRange):
                    if data.nbytes != e.nbytes:
                        raise AssertionError(f"{e.name}: {data.nbytes} bytes produced, {e.nbytes} declared")
                    if run and not (run[-1].fd == data.fd and run[-1].offset + run[-1].nbytes == data.offset):
                        _copy_run(run, fd)
                        run = []
                    run.append(data)
                else:
                    if run:
                        _copy_run(run, fd)
                        run = []
                    _write_entry(fd, e, data)
                if progress is not None:
                    progress(e.nbytes)
            if run:
                _copy_run(run, fd)
        written = os.fstat(fd).st_size
        if written != 8 + len(raw) + offset:  # the file must be exactly what its header promises
            raise AssertionError(f"{path}: {written} bytes written, the header promises {8 + len(raw) + offset}")
    except BaseException:
        if pending is not None:
            pending.cancel()
        raise
    finally:
        os.close(fd)


class _Done:
    """A future that runs its function when asked for the result (no second thread)."""

    def __init__(self, fn: Callable[[], object]):
        self.fn = fn

    def result(self) -> object:
        return self.fn()

    def cancel(self) -> None:
        pass


def _write_entry(fd: int, e: Entry, data) -> None:
    pieces = [data] if isinstance(data, (np.ndarray, bytes, bytearray, memoryview)) else data
    total = 0
    for piece in pieces:  # a buffer, or an iterator of buffers each valid until the next
        mv = memoryview(np.ascontiguousarray(piece) if isinstance(piece, np.ndarray) else piece).cast("B")
        total += mv.nbytes
        _write_all(fd, mv)
    if total != e.nbytes:
        raise AssertionError(f"{e.name}: {total} bytes produced, {e.nbytes} declared")


def _write_all(fd: int, data) -> None:
    """Write every byte of `data` (a write that makes no progress is an error, never an endless loop)."""
    mv = memoryview(data).cast("B")
    while mv.nbytes:
        n = os.write(fd, mv)
        if n <= 0:
            raise OSError(errno.EIO, "a write made no progress")
        mv = mv[n:]


class _ShortRead(Exception):
    """The input ended after `copied` bytes of a range (internal: turned into a LoraError naming it)."""

    def __init__(self, copied: int):
        super().__init__(copied)
        self.copied = copied


def _copy_range(r: FileRange, fd: int) -> None:
    """Append r's bytes to `fd`, counting every byte: copy_file_range, or pread + write where it cannot.

    copy_file_range returns 0 at the end of the input (or where it is not supported): the plain read
    decides which, and an empty read before `r.nbytes` raises _ShortRead. A failing read names the input.
    """
    off, left = r.offset, r.nbytes
    while left:
        try:
            n = os.copy_file_range(r.fd, fd, left, off)
        except OSError:
            n = 0  # not supported between these files (or failing): the plain path names the failing side
        if n <= 0:
            try:
                data = os.pread(r.fd, min(left, 1 << 24), off)
            except OSError as e:
                raise OSError(e.errno, e.strerror, r.path or None) from e
            if not data:
                raise _ShortRead(r.nbytes - left)
            _write_all(fd, data)
            n = len(data)
        off += n
        left -= n


def _copy_run(parts: list[FileRange], fd: int) -> None:
    """Copy contiguous ranges of one input in one go; a short input names the tensor where it ended."""
    first = parts[0]
    try:
        _copy_range(FileRange(first.fd, first.offset, sum(p.nbytes for p in parts)), fd)
    except _ShortRead as e:
        done = e.copied
        for p in parts:
            if done < p.nbytes:
                break
            done -= p.nbytes
        raise short_read(p.path, p.name, p.nbytes, done) from None


def check_output(out: str, *, overwrite: bool = False, inputs: Iterable[str] = (), directory: bool = False,
                 replaceable: Callable[[str], str | None] | None = None) -> None:
    """Refuse an output path that cannot be written, before any work is done (and again before the rename).

    OUT may not be, lie inside, or contain an input. An existing OUT needs `overwrite`, and then only an
    earlier output of the same kind is replaced: for a file output, a regular file; for a directory
    output, a real directory that `replaceable(out)` accepts (it returns None, or why not; without it,
    only an empty directory). A symbolic link is never replaced nor written through; a FIFO, socket or
    device is never replaced.
    """
    real_out = os.path.realpath(out)
    for p in inputs:
        real_in = os.path.realpath(p)
        if real_out == real_in:
            raise LoraError(f"{out}: output is the same path as input {p}; refusing to overwrite the input")
        if os.path.isdir(real_in) and (real_out + os.sep).startswith(real_in.rstrip(os.sep) + os.sep):
            raise LoraError(f"{out}: output is inside input directory {p}; refusing")
        if os.path.isdir(real_out) and (real_in + os.sep).startswith(real_out.rstrip(os.sep) + os.sep):
            raise LoraError(f"{out}: input {p} is inside the output directory; refusing to replace it")
    try:
        st = os.lstat(out)
    except OSError:
        st = None
    if st is not None:
        if not overwrite:
            raise LoraError(f"{out}: already exists (pass --overwrite to replace it)")
        if stat.S_ISLNK(st.st_mode):
            raise LoraError(f"{out}: is a symbolic link; --overwrite never replaces a link or writes through it "
                            f"(remove the link, or name its target)")
        if directory:
            if not stat.S_ISDIR(st.st_mode):
                raise LoraError(f"{out}: exists and is {file_kind(st.st_mode)}, not an earlier output directory; "
                                f"refusing to replace it")
            why = replaceable(out) if replaceable is not None else dir_problem(out, {}, set())
            if why:
                raise LoraError(f"{out}: {why}; refusing to replace it (--overwrite replaces only an earlier "
                                f"output of this command)")
        elif not stat.S_ISREG(st.st_mode):
            raise LoraError(f"{out}: exists and is {file_kind(st.st_mode)}; --overwrite replaces only a regular file")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise LoraError(f"{out}: parent directory {parent} does not exist")


def dir_problem(path: str, allowed: dict[str, str], required: set[str]) -> str | None:
    """Why directory `path` is not an earlier output (None if it is).

    `allowed` maps each name an output may hold to its kind ("a regular file", "a directory", "a symbolic
    link"); every entry must be one of them, of that kind, and every `required` name must be there.
    """
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        return f"cannot list it ({e.strerror})"
    for n in names:
        if n not in allowed:
            return f"it holds {n!r}, which this command does not write"
        kind = file_kind(os.lstat(os.path.join(path, n)).st_mode)
        if kind != allowed[n]:
            return f"{n!r} in it is {kind}, not {allowed[n]}"
    missing = sorted(required - set(names))
    if missing:
        return f"it does not hold {missing[0]!r}, so it is not an earlier output"
    return None


# Temp outputs: `.<OUT name>.longcat-lora-<pid>[.<k>].tmp` (`.old` for a replaced directory on its way out).
TEMP_MARK = ".longcat-lora-"
_TEMP = re.compile(r"^\..+\.longcat-lora-(?P<pid>[1-9][0-9]{0,9})(?:\.[0-9]{1,4})?\.(?:tmp|old)$", re.DOTALL)


def _temp_path(parent: str, base: str, suffix: str) -> Iterator[str]:
    stem = f".{base[:180]}{TEMP_MARK}{os.getpid()}"
    yield os.path.join(parent, f"{stem}.{suffix}")
    for k in range(1, 1000):
        yield os.path.join(parent, f"{stem}.{k}.{suffix}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # another user's process, or a pid we cannot ask about
        return True
    return True


def remove_stale_temps(folder: str) -> list[str]:
    """Remove temp files and directories that killed runs of this package left in `folder`.

    Only names of our exact pattern whose writer pid is no longer alive, and only regular files or
    directories by those names; anything else is never touched. A set-aside previous output (`.old`)
    whose OUT is missing (the writer died between the two renames) is renamed back to OUT instead.
    Returns the paths reclaimed.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMP.match(name)
        if m is None or _pid_alive(int(m["pid"])):
            continue
        path = os.path.join(folder, name)
        if name.endswith(".old"):
            # A previous OUT set aside by _put_in_place. If the writer died before the new OUT took its
            # place, this is the only copy: put it back rather than delete it (a name cut short in the
            # temp's name cannot be told: keep it).
            out_name = name[1:name.rindex(TEMP_MARK)]
            if len(out_name) >= 180:
                continue
            out = os.path.join(folder, out_name)
            if not os.path.lexists(out):
                try:
                    os.rename(path, out)
                except OSError:
                    continue
                removed.append(path)
                continue
        try:
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                shutil.rmtree(path)
            elif stat.S_ISREG(mode):
                os.remove(path)
            else:
                continue
        except OSError:
            continue
        removed.append(path)
    return removed


def _create_temp(parent: str, base: str, directory: bool) -> str:
    """A fresh temp file or directory beside OUT, with the mode a new file would get (0o666/0o777 & ~umask)."""
    for tmp in _temp_path(parent, base, "tmp"):
        try:
            if directory:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise LoraError(f"{os.path.join(parent, base)}: cannot find a free temp name beside it")


def _remove(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except OSError:
            pass


def _name_output(e: OSError, tmp: str, out: str) -> OSError:
    """An error on the temp output (or on no file: a write) reported as an error on OUT."""
    f = e.filename
    if e.errno is None or not (f is None or f == tmp or str(f).startswith(tmp + os.sep)):
        return e
    return OSError(e.errno, e.strerror or str(e), out)


def _put_in_place(tmp: str, out: str, parent: str, base: str) -> None:
    """Rename the finished temp to OUT; an existing OUT directory is swapped out, then removed."""
    if not (os.path.isdir(tmp) and os.path.lexists(out)):
        os.replace(tmp, out)  # a file over a regular file (atomic), or onto a free name
        return
    old = next(p for p in _temp_path(parent, base, "old") if not os.path.lexists(p))
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_output(out: str, *, overwrite: bool = False, inputs: Iterable[str] = (), directory: bool = False,
                  replaceable: Callable[[str], str | None] | None = None) -> Iterator[str]:
    """Yield a temp path beside `out`; move it into place only if the block finishes.

    `check_output` runs first and again just before the rename. On any error, KeyboardInterrupt or
    `Terminated` (SIGTERM under the CLI) the temp file (or directory) is removed and `out` is untouched:
    never a partial or clobbered output. An OSError on the temp (disk full) is reported as one on `out`.
    Stale temps of killed runs in the same folder are removed first (see remove_stale_temps).
    """
    inputs = list(inputs)
    check_output(out, overwrite=overwrite, inputs=inputs, directory=directory, replaceable=replaceable)
    parent = os.path.dirname(os.path.abspath(out))
    base = os.path.basename(os.path.abspath(out))
    remove_stale_temps(parent)
    try:
        tmp = _create_temp(parent, base, directory)
    except OSError as e:
        raise OSError(e.errno, e.strerror, out) from e
    try:
        try:
            yield tmp
            check_output(out, overwrite=overwrite, inputs=inputs, directory=directory, replaceable=replaceable)
            with critical():
                _put_in_place(tmp, out, parent, base)
        except OSError as e:
            raise _name_output(e, tmp, out) from e
    except BaseException:
        with critical():
            _remove(tmp)
        raise
