"""Reading safetensors lazily and safely: a validating header parser and per-tensor `pread`s.

Why not `safetensors.safe_open` for reading: it memory-maps the file, and every page it touches counts
toward the process's resident memory until the map is closed, so converting a 1.6 GB file would show a
1.6 GB peak. Here each tensor (or row range) is read with one `pread` into a fresh buffer and released
after use, so peak memory is the largest tensor, not the file. The header is validated before any data is
read (offsets, sizes, dtypes), and nothing is ever unpickled. Files written by `writer` load with `safetensors`.

One module of about 480 lines because it is one thing: every byte read from a safetensors input passes
here (the open checks, sniffing, the header parser, reads of the ranges it validated). The rules where
Python's json is looser than the library's parser live apart, in `serdejson`.
"""

from __future__ import annotations

import gc
import json
import math
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..errors import LoraError
from .dtypes import ITEMSIZE, _NONFINITE, nonfinite, torch_dtype
from .serdejson import json_float, json_int_no_negative_zero, refusal

if TYPE_CHECKING:
    import torch

# The safetensors library refuses a header over 100,000,000 bytes ("header too large"); so does this
# reader, before reading it. About 70 bytes per tensor: ~1.4 million tensors.
MAX_HEADER = 100_000_000


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


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
_FIELDS = ("dtype", "shape", "data_offsets")  # an entry's fields; others are ignored


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
        if nbytes != hi - lo or not nbytes:  # no elements: `_entry` checks the other dimensions' size
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
    """A safetensors file opened for lazy, validated, per-tensor reads.

    `max_tensors` (with `what`, the kind of file expected): refuse, before the header is parsed, a file
    whose header could hold more tensors than that (counted as its `{` characters: every entry is an
    object, so no spelling of a key slips past the count)."""

    def __init__(self, path: str, max_tensors: int | None = None, what: str = "file"):
        self.path = str(path)
        self.max_tensors, self.what = max_tensors, what
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
        not UTF-8 or not JSON as the library's parser reads it (`serdejson`: numbers it finds out of range,
        `-0` as an integer, lone surrogates, nesting past 127 levels), a name given twice (the library
        silently keeps the last one), a non-object entry, a missing field or one given twice, an unknown
        dtype, a shape that is not a list of integers in [0, 2**63), whose element count overflows 64 bits
        or (with no elements) whose other dimensions span 2**63 bytes (numpy cannot hold it), offsets that
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
        if self.max_tensors is not None and raw.count(b"{") - 1 > self.max_tensors:
            raise LoraError(f"{self.path}: its header holds more than {self.max_tensors:,} tensor entries "
                            f"({raw.count(b'{') - 1:,} objects); no {self.what} has that many: not read")
        base = 8 + n
        gc_was = gc.isenabled()
        gc.disable()  # a million small containers would trigger collections over and over
        try:
            try:
                text = raw.decode("utf-8")
                del raw  # the bytes are not needed while the text is parsed
                header = json.loads(text, object_pairs_hook=_header_hook(base), parse_constant=_no_constant,
                                    parse_float=json_float,
                                    parse_int=json_int_no_negative_zero if "-0" in text else None)
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
            why = refusal(_Obj(kv for kv in header if type(kv[1]) is not TensorInfo or not kv[0].isascii()), 1, _Obj)
            if why is not None:  # what the library's JSON parser refuses and Python's takes (see serdejson)
                raise LoraError(f"{self.path}: corrupt safetensors header: {why}")
            infos: dict[str, object] = dict(header)
            if len(infos) != len(header):
                seen: set[str] = set()
                dup = next(k for k, _ in header if k in seen or seen.add(k))  # type: ignore[func-returns-value]
                raise LoraError(f"{self.path}: corrupt safetensors header: {dup!r} appears twice")
            del header
            metadata = self._metadata(infos.pop("__metadata__", None))
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
        fields = dict(entry)  # unknown fields are ignored (even twice), as safetensors ignores them
        if sum(k in _FIELDS for k, _ in entry) > sum(f in fields for f in _FIELDS):
            raise bad("a field appears twice")
        for f in _FIELDS:
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
        if not nbytes and math.prod(s for s in shape if s) * ITEMSIZE[dtype] >= _DIM:
            raise bad("its shape spans 2**63 bytes or more, dimensions of 0 aside (no array can hold it)")
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

    def read_into(self, name: str, buf: memoryview, rows: tuple[int, int] | None = None) -> None:
        """Read a tensor's bytes (or a range of its first dimension) into `buf` (exactly their size): no
        allocation, no page faults on reuse."""
        start, count = self.byte_range(name, rows)
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
        """Whether a byte range of this file holds Inf/NaN bits: read through one small reused buffer.

        Never a memory map: a file truncated while mapped would kill the process (SIGBUS) when touched,
        and faulting in every page costs more than the read. Resident memory stays at one buffer.
        """
        if dtype not in _NONFINITE or rng.nbytes == 0:
            return False
        buf = np.empty(SCAN_CHUNK, dtype=np.uint8)
        rng = replace(rng, path=rng.path or self.path)  # a short file names itself
        return any(nonfinite(piece, dtype) for piece in range_pieces(rng, buf))


@dataclass(frozen=True)
class FileRange:
    """Bytes to copy unchanged from an open file: written with copy_file_range, never through Python."""

    fd: int
    offset: int
    nbytes: int
    path: str = ""  # the input file, named when it turns out shorter than promised
    name: str = ""  # the tensor these bytes belong to, if one
    # Run on these bytes (uint8, whole items, SCAN_CHUNK at a time) while they are copied; raises to refuse
    # them (a NaN/Inf scan: see `nonfinite_check`). The output is a temp file, so a refusal loses nothing.
    check: Callable[[np.ndarray], None] | None = None


# Bytes read per piece when a range is scanned: a multiple of every item size, small enough to stay in
# the CPU cache between the read and the scan.
SCAN_CHUNK = 1 << 20


def range_pieces(rng: FileRange, buf: np.ndarray) -> Iterator[np.ndarray]:
    """A range's bytes, read into `buf` (uint8) a piece at a time; each piece is valid until the next.

    Every piece but the last fills `buf`, so pieces hold whole items. Short reads are resumed; an end of
    file before `rng.nbytes` is the truncation error naming the tensor, with the bytes that were there.
    """
    mv = memoryview(buf)
    done = 0
    while done < rng.nbytes:
        want = min(buf.size, rng.nbytes - done)
        got = 0
        while got < want:
            try:
                n = os.preadv(rng.fd, [mv[got:want]], rng.offset + done + got)
            except OSError as e:
                raise OSError(e.errno, e.strerror, rng.path or None) from e
            if n <= 0:
                raise short_read(rng.path, rng.name, rng.nbytes, done + got)
            got += n
        yield buf[:want]
        done += want


def nonfinite_check(dtype: str, refuse: Callable[[], None]) -> Callable[[np.ndarray], None] | None:
    """A `FileRange.check` that calls `refuse` (which raises) where the bytes hold Inf/NaN bits of `dtype`
    (None for a dtype that has no such values)."""
    if dtype not in _NONFINITE:
        return None

    def check(piece: np.ndarray) -> None:
        if nonfinite(piece, dtype):
            refuse()

    return check


def short_read(path: str, name: str, expected: int, got: int) -> LoraError:
    """The error for an input that ended before the bytes its header promised."""
    what = f"tensor {name!r}: " if name else ""
    return LoraError(f"{path or 'input'}: changed or truncated while being read "
                     f"({what}expected {expected} bytes, got {got})")
