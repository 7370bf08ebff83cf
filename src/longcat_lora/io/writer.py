"""Streaming safetensors writing: the header first, then each tensor as it is produced, byte counts checked."""

from __future__ import annotations

import errno
import json
import math
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


import numpy as np

from . import direct as _direct
from .dtypes import ITEMSIZE
from .reader import SCAN_CHUNK, FileRange, range_pieces, short_read


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
                      progress: Callable[[int], None] | None = None, pipelined: bool = True,
                      direct: bool = False) -> None:
    """Write header first, then each tensor as it is produced; peak memory is one tensor.

    Each produced buffer must have the declared size: a mismatch is a bug, not bad input. `direct`:
    write large produced buffers past the page cache where the filesystem allows (`io.direct`; merges).
    """
    entries = list(entries)
    head, starts = layout(entries, metadata)
    size = starts[-1] + entries[-1].nbytes if entries else len(head)
    # No O_TRUNC: ext4 flushes a file truncated to zero when it is closed (auto_da_alloc), which would
    # make every conversion wait for the disk. Outputs are always fresh temp files anyway.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    pending = None
    dfd = None
    if os.fstat(fd).st_size:
        os.ftruncate(fd, 0)
    try:
        _write_all(fd, head)
        # Produce tensor i+1 (read, scan, assemble) on a second thread while tensor i is written:
        # numpy, pread, write and copy_file_range all release the GIL. At most two tensors in memory.
        # (Merging runs its own read / compute pipeline ahead of the writer and passes pipelined=False.)
        # Unchanged byte ranges are copied by the kernel, adjacent ones in one call, and checked on a
        # second thread in the same pass (`_Copier`).
        writeback = _Writeback(fd)
        dfd = _direct.open_direct(fd) if direct else None
        dw = _direct.DirectWriter(fd, dfd, lambda f, d: _write_all(f, d)) if dfd is not None else None
        with ThreadPoolExecutor(1) as pool, _Copier(fd, writeback) as copier:
            submit = pool.submit if pipelined else _Done
            pending = submit(entries[0].produce) if entries else None
            for i, e in enumerate(entries):
                data = pending.result()
                pending = submit(entries[i + 1].produce) if i + 1 < len(entries) else None
                if isinstance(data, FileRange):
                    if data.nbytes != e.nbytes:
                        raise AssertionError(f"{e.name}: {data.nbytes} bytes produced, {e.nbytes} declared")
                    copier.add(data)
                else:
                    copier.flush()
                    _write_entry(fd, e, data, dw)
                    writeback.poke()
                if progress is not None:
                    progress(e.nbytes)
            copier.finish()
        written = os.fstat(fd).st_size
        if written != size:  # the file must be exactly what its header promises
            raise AssertionError(f"{path}: {written} bytes written, the header promises {size}")
    except BaseException:
        if pending is not None:
            pending.cancel()
        raise
    finally:
        os.close(fd)
        if dfd is not None:
            os.close(dfd)


def layout(entries: list[Entry], metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """(the file's first bytes: length prefix + JSON header, padded to 8; where each entry's bytes start in
    the file), exactly as `write_safetensors` writes them: known before any tensor is produced."""
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
    head = struct.pack("<Q", len(raw)) + raw
    starts, at = [], len(head)
    for e in entries:
        starts.append(at)
        at += e.nbytes
    return head, starts


class _Done:
    """A future that runs its function when asked for the result (no second thread)."""

    def __init__(self, fn: Callable[[], object]):
        self.fn = fn

    def result(self) -> object:
        return self.fn()

    def cancel(self) -> None:
        pass


def _write_entry(fd: int, e: Entry, data, dw: _direct.DirectWriter | None = None) -> None:
    """Write one entry's produced bytes, counted; a large array goes through `dw` (direct) when given."""
    pieces = [data] if isinstance(data, (np.ndarray, bytes, bytearray, memoryview)) else data
    direct = dw is not None and isinstance(data, np.ndarray) and e.nbytes >= _direct.DIRECT_MIN
    total = 0
    for piece in pieces:  # a buffer, or an iterator of buffers each valid until the next
        mv = memoryview(np.ascontiguousarray(piece) if isinstance(piece, np.ndarray) else piece).cast("B")
        total += mv.nbytes
        if direct and mv.nbytes == e.nbytes:
            dw.write(mv)  # type: ignore[union-attr]
        else:
            _write_all(fd, mv)
    if total != e.nbytes:
        raise AssertionError(f"{e.name}: {total} bytes produced, {e.nbytes} declared")


# Bytes handed to one write(2). Large writes cost the kernel up to three times more CPU per byte here
# than writes of about 1 MiB (measured: 2.3 GB from a 90 MB buffer, 0.8-2.7 s whole, 0.8-1.0 s by 1 MiB),
# and on two cores that CPU is taken from the merge's arithmetic.
WRITE_PIECE = 1 << 20


def _write_all(fd: int, data) -> None:
    """Write every byte of `data` (a write that makes no progress is an error, never an endless loop)."""
    mv = memoryview(data).cast("B")
    while mv.nbytes:
        n = os.write(fd, mv[:WRITE_PIECE])
        if n <= 0:
            raise OSError(errno.EIO, "a write made no progress")
        mv = mv[n:]


class _Writeback:
    """Asks the kernel to start writing the output to disk every WRITEBACK_EVERY bytes, as it is written
    (`start_writeback`: asynchronous, no waiting for the disk here).

    Without it nothing goes to disk until the dirty pages pass the kernel's background threshold (10% of
    memory, gigabytes), so the disk idles while we compute and the final fsync (`atomic_output`) waits for
    all of it; with it, the disk writes while we compute. Only a hint: where the call is missing or refused
    (another OS, a filesystem without it), writing goes on as before."""

    def __init__(self, fd: int):
        self.fd = fd
        self.done = 0  # bytes from the start of the file already handed to the kernel's writeback
        self.on = True

    def poke(self) -> None:
        """Start writing back what was written since the last poke, once it is WRITEBACK_EVERY or more."""
        if not self.on:
            return
        end = os.lseek(self.fd, 0, os.SEEK_CUR)
        if end - self.done >= WRITEBACK_EVERY:
            try:
                start_writeback(self.fd, self.done, end - self.done)
            except OSError:
                self.on = False
            self.done = end


_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of dirty pages in the range, do not wait
_libc_sync_file_range = None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start (not wait for) the disk write of bytes [offset, offset + nbytes) of `fd`: Linux's
    sync_file_range(SYNC_FILE_RANGE_WRITE), which Python's os module lacks, through libc (the call
    releases the GIL). OSError where it fails or does not exist."""
    import ctypes

    global _libc_sync_file_range
    if _libc_sync_file_range is None:
        try:
            f = ctypes.CDLL(None, use_errno=True).sync_file_range
        except (OSError, AttributeError) as e:
            raise OSError(errno.ENOSYS, "sync_file_range is not available") from e
        f.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        f.restype = ctypes.c_int
        _libc_sync_file_range = f
    if _libc_sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


WRITEBACK_EVERY = 64 << 20


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


class _Copier:
    """Appends file ranges to an output in one pass: adjacent ranges of one input are coalesced into one
    kernel copy (`_copy_run`; a run stops growing at WRITEBACK_EVERY bytes, so that writeback starts
    between runs), and each range's check (a NaN/Inf scan) runs on a second thread that reads
    the same bytes through a small buffer while the kernel copies them (both release the GIL), instead of
    a pass over every byte before the copy.

    A check that refuses is raised at the next flush, stopping the copy there (the output is a temp file,
    discarded); `finish` waits for every check. An error of the copy itself is raised where it happens.
    """

    def __init__(self, fd: int, writeback: _Writeback | None = None):
        self.fd = fd
        self.writeback = writeback
        self.run: list[FileRange] = []
        self.run_bytes = 0
        self.scanner: _Scanner | None = None

    def add(self, r: FileRange) -> None:
        last = self.run[-1] if self.run else None
        if last is not None and not (last.fd == r.fd and last.offset + last.nbytes == r.offset
                                     and self.run_bytes < WRITEBACK_EVERY):
            self.flush()
        self.run.append(r)
        self.run_bytes += r.nbytes
        if r.check is not None:
            if self.scanner is None:
                self.scanner = _Scanner()
            self.scanner.queue.put(r)  # read ahead of the copy: it brings cold pages in for it

    def flush(self) -> None:
        if self.run:
            run, self.run, self.run_bytes = self.run, [], 0
            _copy_run(run, self.fd)
            if self.writeback is not None:
                self.writeback.poke()
        if self.scanner is not None:
            self.scanner.raise_error()

    def finish(self) -> None:
        """Copy what is left and wait for every check to pass."""
        self.flush()
        if self.scanner is not None:
            self.scanner.queue.put(None)
            self.scanner.join()
            self.scanner.raise_error()

    def __enter__(self) -> _Copier:
        return self

    def __exit__(self, *exc) -> None:
        if self.scanner is not None:  # stopped early on an error; no-op after finish
            self.scanner.stop()


class _Scanner(threading.Thread):
    """Runs queued ranges' checks over their bytes, read a piece at a time into one reused buffer."""

    def __init__(self):
        super().__init__(daemon=True, name="longcat-lora-scan")
        self.queue: queue.SimpleQueue[FileRange | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        buf = np.empty(SCAN_CHUNK, dtype=np.uint8)
        while (r := self.queue.get()) is not None:
            try:
                for piece in range_pieces(r, buf):
                    if self._halt.is_set() or self.error is not None:
                        break
                    r.check(piece)
            except BaseException as e:  # handed to the copying thread, which raises it
                self.error = e

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Stop early (the write failed or was interrupted) and wait for the thread to end."""
        self._halt.set()
        self.queue.put(None)
        self.join()
