"""Writing large computed buffers past the page cache (O_DIRECT), for merges.

A buffered write(2) costs the kernel a copy into freshly allocated page-cache pages, reclaiming other
pages to get them once memory is full, and later the writeback: on a 2-core machine about 0.6-1.2 s of
CPU per GB, taken from the merge's arithmetic. A direct write hands the disk our buffer (DMA): almost no
CPU, and it returns when the disk has the bytes. Direct writes need the file offset, the length and the
buffer address aligned to the device's block size (ALIGN covers 512- and 4096-byte devices), so each
buffer is written as: an unaligned head through the ordinary descriptor, the aligned middle through a
second, O_DIRECT descriptor of the same file (straight from the buffer when its address is congruent
to the file offset, which merge's output buffers are; otherwise copied a STAGE at a time into an aligned
staging buffer), and the unaligned tail through the ordinary descriptor again. The two never touch the same page, the
middle starts exactly at the end of the file, and `atomic_output`'s fsync covers both.

Where the filesystem refuses O_DIRECT (some network filesystems) `open_direct` returns None and
everything is written as before; one that opens it but refuses the writes (EINVAL: a stricter alignment)
gets the rest of that file buffered. A direct write that writes less than asked resumes through the ordinary
descriptor; one that makes no progress, or fails (ENOSPC, EIO), raises like any write.
"""

from __future__ import annotations

import errno
import os

import numpy as np

# A multiple of every logical block size Linux uses, and at least a memory page, so that a buffered edge
# and direct data never share a page (64 KiB pages on some arm64 and ppc64le systems).
ALIGN = max(4096, os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096)
STAGE = 8 << 20  # bytes copied into the aligned staging buffer per direct write
DIRECT_MIN = 4 << 20  # smaller buffers are not worth a second path: written as before


def open_direct(fd: int) -> int | None:
    """A second descriptor of `fd`'s file (the same inode, through /proc) opened O_DIRECT for writing,
    or None where that is not possible here."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | flag | os.O_CLOEXEC)
    except OSError:
        return None


class DirectWriter:
    """Appends buffers at `fd`'s position, their aligned middles through `dfd` (see the module docstring)."""

    def __init__(self, fd: int, dfd: int, write_all):
        self.fd, self.dfd, self.write_all = fd, dfd, write_all  # write_all: the ordinary, counted write
        raw = np.empty(STAGE + ALIGN, dtype=np.uint8)
        start = -raw.ctypes.data % ALIGN
        self.stage = raw[start:start + STAGE]
        self.staged = 0  # bytes that had to be copied into the staging buffer first

    def write(self, data: memoryview) -> None:
        """Append `data` (bytes) at the ordinary descriptor's position; afterwards it points past them."""
        n = data.nbytes
        s = os.lseek(self.fd, 0, os.SEEK_CUR)
        a = -(-s // ALIGN) * ALIGN
        b = (s + n) // ALIGN * ALIGN
        if b - a < ALIGN:
            self.write_all(self.fd, data)
            return
        self.write_all(self.fd, data[:a - s])  # head: the file now ends at the aligned offset a
        src = np.frombuffer(data, dtype=np.uint8)
        # a buffer laid out congruent to the file (see merge_compute.CpuStages) is written from where it is
        in_place = (src.ctypes.data + a - s) % ALIGN == 0
        pos = a
        while pos < b:
            k = min(STAGE, b - pos)
            if in_place:
                pos = self._pwrite(data[pos - s:pos - s + k], pos)
                continue
            self.stage[:k] = src[pos - s:pos - s + k]
            self.staged += k
            pos = self._pwrite(memoryview(self.stage)[:k], pos)
        os.lseek(self.fd, b, os.SEEK_SET)
        self.write_all(self.fd, data[b - s:])  # tail

    def _pwrite(self, mv: memoryview, pos: int) -> int:
        """Write all of `mv` (an aligned address) at `pos`; returns pos + its length."""
        done, k = 0, mv.nbytes
        while done < k:
            direct = self.dfd is not None and (pos + done) % ALIGN == 0 and (k - done) % ALIGN == 0
            fd = self.dfd if direct else self.fd
            try:
                got = os.pwrite(fd, mv[done:], pos + done)
            except OSError as e:
                # a filesystem that opens O_DIRECT but refuses these writes (stricter alignment): buffered
                if not (direct and e.errno == errno.EINVAL):
                    raise
                self.dfd = None
                continue
            if got <= 0:
                raise OSError(errno.EIO, "a write made no progress")
            done += got
        return pos + k


__all__ = ["ALIGN", "DIRECT_MIN", "STAGE", "DirectWriter", "open_direct"]
