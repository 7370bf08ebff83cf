"""Direct (O_DIRECT) writes of merged weights: the same bytes as buffered writes, whatever the alignment.

`io.direct.DirectWriter` writes an unaligned head and tail through the ordinary descriptor and the
aligned middle through an O_DIRECT one. Checked here: every split of a buffer against an arbitrary file
position gives exactly the expected file; a short direct write resumes; a write that makes no progress
or fails raises; a merge written with direct writes is byte-identical to one written without, and
direct writes really happen where the filesystem allows them (where it does not, `open_direct` says so
and the merge is still identical).
"""

from __future__ import annotations

import errno
import hashlib
import os

import numpy as np
import pytest
import torch

import longcat_lora as L
from longcat_lora.io import direct, writer
from longcat_lora.testing.dit import TINY
from longcat_lora.testing.fixtures import write_base_checkpoint, write_native_lora


def _supported(folder) -> bool:
    """Whether this filesystem takes O_DIRECT writes: asked of the kernel itself, not of `open_direct`."""
    path = os.path.join(folder, "probe")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        buf = np.zeros(2 * direct.ALIGN, dtype=np.uint8)
        start = -buf.ctypes.data % direct.ALIGN
        return os.pwrite(fd, memoryview(buf[start:start + direct.ALIGN]), 0) == direct.ALIGN
    except OSError:
        return False
    finally:
        os.close(fd)
        os.remove(path)


def test_open_direct_opens_where_the_filesystem_allows(tmp_path):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        dfd = direct.open_direct(fd)
        assert (dfd is not None) == _supported(tmp_path)
        if dfd is not None:
            flags = int(open(f"/proc/self/fdinfo/{dfd}").read().split("flags:")[1].split()[0], 8)
            assert flags & os.O_DIRECT and os.path.samestat(os.fstat(dfd), os.fstat(fd))
            os.close(dfd)
    finally:
        os.close(fd)


@pytest.fixture
def small_stage(monkeypatch):
    monkeypatch.setattr(direct, "STAGE", 3 * direct.ALIGN)  # several staged writes per buffer


@pytest.mark.parametrize("start", [0, 1, 8, direct.ALIGN - 1, direct.ALIGN, 3 * direct.ALIGN + 17])
@pytest.mark.parametrize("size", [5, direct.ALIGN - 3, 2 * direct.ALIGN, 7 * direct.ALIGN + 5, 11 * direct.ALIGN])
def test_any_split_writes_exactly_the_bytes(tmp_path, small_stage, start, size):
    if not _supported(tmp_path):
        assert direct.open_direct(os.open(os.devnull, os.O_WRONLY)) is None
        return
    rng = np.random.default_rng(start * 31 + size)
    before = rng.integers(0, 256, start, dtype=np.uint8).tobytes()
    data = rng.integers(0, 256, size, dtype=np.uint8)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    dfd = direct.open_direct(fd)
    assert dfd is not None
    try:
        writer._write_all(fd, before)
        buffered = []

        def counted(f, d):
            buffered.append(memoryview(d).nbytes)
            return writer._write_all(f, d)

        direct.DirectWriter(fd, dfd, counted).write(memoryview(data))
        assert os.lseek(fd, 0, os.SEEK_CUR) == start + size  # the position is past the bytes
        a, b = -(-start // direct.ALIGN) * direct.ALIGN, (start + size) // direct.ALIGN * direct.ALIGN
        # only the unaligned edges go through the page cache
        assert sum(buffered) == (size if b - a < direct.ALIGN else size - (b - a))
        writer._write_all(fd, b"END")
    finally:
        os.close(dfd)
        os.close(fd)
    assert path.read_bytes() == before + data.tobytes() + b"END"


def test_a_short_direct_write_resumes_and_a_stuck_one_raises(tmp_path, small_stage, monkeypatch):
    if not _supported(tmp_path):
        return
    data = np.arange(9 * direct.ALIGN, dtype=np.uint32).view(np.uint8)[: 9 * direct.ALIGN + 100]
    real = os.pwrite
    calls = []

    def short(fd, buf, off):
        calls.append((fd, len(buf), off))
        if len(calls) == 1:
            return real(fd, memoryview(buf)[:direct.ALIGN], off)  # one aligned block of three
        if len(calls) == 2:  # then an unaligned count (the kernel took 1000 bytes: the block goes out whole)
            real(fd, memoryview(buf)[:direct.ALIGN], off)
            return 1000
        if len(calls) == 3:  # then a single byte: still progress
            return real(fd, memoryview(buf)[:1], off)
        return real(fd, buf, off)

    monkeypatch.setattr(os, "pwrite", short)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    dfd = direct.open_direct(fd)
    try:
        writer._write_all(fd, b"x" * 10)
        direct.DirectWriter(fd, dfd, writer._write_all).write(memoryview(data))
    finally:
        os.close(dfd)
        os.close(fd)
    assert path.read_bytes() == b"x" * 10 + data.tobytes()
    assert calls[1][0] == dfd and calls[2][0] == fd  # after an unaligned short write: the ordinary descriptor
    assert calls[3][0] == fd and calls[3][1] == calls[2][1] - 1

    monkeypatch.setattr(os, "pwrite", lambda fd, buf, off: 0)
    fd = os.open(tmp_path / "g", os.O_WRONLY | os.O_CREAT, 0o644)
    dfd = direct.open_direct(fd)
    try:
        with pytest.raises(OSError) as stuck:
            direct.DirectWriter(fd, dfd, writer._write_all).write(memoryview(data))
        assert stuck.value.errno == errno.EIO
    finally:
        os.close(dfd)
        os.close(fd)


def _digest(folder) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))}


def test_merge_with_direct_writes_is_byte_identical(tmp_path, small_stage, monkeypatch):
    base = write_base_checkpoint(str(tmp_path / "base"), TINY, "longcat", shards=2, dtype=torch.bfloat16)
    lora = write_native_lora(str(tmp_path / "l.safetensors"), "refinement", dims=TINY.dims, rank=4,
                             dtype=torch.bfloat16)
    monkeypatch.setattr(direct, "open_direct", lambda fd: None)
    L.merge_checkpoint(base, str(tmp_path / "buffered"), [(lora, 0.7)], device="cpu")
    monkeypatch.undo()
    monkeypatch.setattr(direct, "STAGE", 3 * direct.ALIGN)
    monkeypatch.setattr(direct, "DIRECT_MIN", 0)  # every computed weight, however small
    staged = []
    real = direct.DirectWriter._pwrite

    def count(self, mv, pos):
        staged.append(mv.nbytes)
        return real(self, mv, pos)

    monkeypatch.setattr(direct.DirectWriter, "_pwrite", count)
    writers = []
    init = direct.DirectWriter.__init__

    def note(self, *a):
        init(self, *a)
        writers.append(self)

    monkeypatch.setattr(direct.DirectWriter, "__init__", note)
    L.merge_checkpoint(base, str(tmp_path / "direct"), [(lora, 0.7)], device="cpu")
    assert _digest(tmp_path / "direct") == _digest(tmp_path / "buffered")
    if _supported(tmp_path):
        assert len(staged) > 10 and sum(staged) > 0  # the direct path really ran
        # the CPU stages lay each output out congruent to its place in the file: nothing staged
        assert len(writers) == 2 and [w.staged for w in writers] == [0, 0]
    else:
        assert staged == []


def test_a_buffer_congruent_to_the_file_is_written_in_place_and_others_are_staged(tmp_path, small_stage):
    if not _supported(tmp_path):
        return
    start, size = 100, 9 * direct.ALIGN + 7
    raw = np.random.default_rng(5).integers(0, 256, size + 2 * direct.ALIGN, dtype=np.uint8)
    for shift in (0, 1):
        pad = (start - raw.ctypes.data) % direct.ALIGN + shift  # shift 0: congruent to the file offset
        data = raw[pad:pad + size]
        path = tmp_path / f"f{shift}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        dfd = direct.open_direct(fd)
        try:
            writer._write_all(fd, b"h" * start)
            w = direct.DirectWriter(fd, dfd, writer._write_all)
            w.write(memoryview(data))
        finally:
            os.close(dfd)
            os.close(fd)
        assert path.read_bytes() == b"h" * start + data.tobytes()
        assert (w.staged == 0) == (shift == 0) and w.staged in (0, size - (size + start) % direct.ALIGN
                                                               - (-start % direct.ALIGN))


def test_direct_path_is_only_for_merges(tmp_path, monkeypatch):
    """Conversions copy most bytes file to file: they never open a direct descriptor."""
    opened = []
    monkeypatch.setattr(direct, "open_direct", lambda fd: opened.append(fd))
    monkeypatch.setattr(direct, "DIRECT_MIN", 0)
    src = write_native_lora(str(tmp_path / "n.safetensors"), "refinement", dims=TINY.dims, rank=4,
                            dtype=torch.float32)
    L.convert(src, str(tmp_path / "o"), "peft")
    assert opened == []


def test_a_full_disk_during_a_direct_write_fails_the_merge_cleanly(tmp_path, monkeypatch):
    base = write_base_checkpoint(str(tmp_path / "base"), TINY, "longcat", shards=1, dtype=torch.float32)
    lora = write_native_lora(str(tmp_path / "l.safetensors"), "refinement", dims=TINY.dims, rank=4,
                             dtype=torch.float32)
    if not _supported(tmp_path):
        return
    monkeypatch.setattr(direct, "DIRECT_MIN", 0)
    real = os.pwrite
    seen = []

    def full(fd, buf, off):
        seen.append(fd)
        if len(seen) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buf, off)

    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "merged"
    with pytest.raises(OSError) as got:
        L.merge_checkpoint(base, str(out), [(lora, 1.0)], device="cpu")
    assert got.value.errno == errno.ENOSPC and got.value.filename == str(out)
    assert len(seen) == 3  # raised by the failing write itself, not retried through the page cache
    assert sorted(os.listdir(tmp_path)) == ["base", "l.safetensors"]  # no OUT, no temp
