"""Outputs reach the disk before they take OUT's name, and the disk writes while we compute.

- `atomic_output` fsyncs the finished temp (every file of a directory output, and the directories)
  before the rename, and the parent directory after it; an fsync that fails (EIO: the disk refused data
  the kernel had accepted) fails the command with OUT untouched and no temp left.
- The writer hands the output to the kernel's writeback every `WRITEBACK_EVERY` bytes as it goes
  (`sync_file_range`, a hint: where it is refused, writing goes on and the bytes are the same), and
  hands write(2) at most `WRITE_PIECE` bytes at a time.
"""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
import torch

import longcat_lora as L
import longcat_lora.io.writer as writer
from longcat_lora.testing.dit import TINY
from longcat_lora.testing.fixtures import write_base_checkpoint, write_native_lora

FSYNC = os.fsync


def _digest(path) -> str:
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    return "".join(_digest(os.path.join(path, n)) + n for n in sorted(os.listdir(path)))


@pytest.fixture
def events(monkeypatch):
    """Each fsync (the path of its descriptor) and each rename, in order."""
    seen: list[tuple[str, str]] = []

    def fsync(fd):
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return FSYNC(fd)

    replace, rename = os.replace, os.rename

    def on_replace(a, b):
        seen.append(("rename", str(b)))
        return replace(a, b)

    def on_rename(a, b):
        seen.append(("rename", str(b)))
        return rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", on_replace)
    monkeypatch.setattr(os, "rename", on_rename)
    return seen


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("durable")
    return write_native_lora(str(d / "n.safetensors"), "refinement", dims=TINY.dims, rank=4, dtype=torch.float32)


def test_a_file_output_is_fsynced_before_it_takes_its_name_and_the_folder_after(src, tmp_path, events):
    out = tmp_path / "o.safetensors"
    L.convert(src, str(out), "fastvideo")
    renames = [i for i, (k, _) in enumerate(events) if k == "rename"]
    assert len(renames) == 1 and events[renames[0]][1] == str(out)
    before, after = events[:renames[0]], events[renames[0] + 1:]
    temp_syncs = [p for k, p in before if k == "fsync" and os.path.basename(p).startswith(".o.safetensors.")]
    assert len(temp_syncs) == 1  # the temp file, under its temp name
    assert after == [("fsync", str(tmp_path))]


def test_a_directory_output_has_every_file_and_directory_fsynced_before_the_rename(src, tmp_path, events):
    out = tmp_path / "peft_out"
    L.convert(src, str(out), "peft")
    i = next(i for i, (k, p) in enumerate(events) if k == "rename" and p == str(out))
    synced = {p for k, p in events[:i] if k == "fsync"}
    temp = next(os.path.dirname(p) for p in synced if os.path.basename(p) == "adapter_config.json")
    files = set(os.listdir(out))
    assert {os.path.basename(p) for p in synced if os.path.dirname(p) == temp} == files
    assert temp in synced and events[i + 1:] == [("fsync", str(tmp_path))]


def test_merge_output_files_are_all_fsynced_before_the_rename(tmp_path, events):
    base = write_base_checkpoint(str(tmp_path / "base"), TINY, "longcat", shards=2, dtype=torch.float32)
    lora = write_native_lora(str(tmp_path / "l.safetensors"), "refinement", dims=TINY.dims, rank=4,
                             dtype=torch.float32)
    out = tmp_path / "merged"
    L.merge_checkpoint(base, str(out), [(lora, 1.0)], device="cpu")
    i = next(i for i, (k, p) in enumerate(events) if k == "rename" and p == str(out))
    synced = [os.path.basename(p) for k, p in events[:i] if k == "fsync"]
    assert sorted(n for n in synced if n in os.listdir(out)) == sorted(os.listdir(out))


@pytest.mark.parametrize("to", ["fastvideo", "peft"])
def test_a_failing_fsync_fails_the_command_and_leaves_out_untouched(src, tmp_path, monkeypatch, to):
    out = tmp_path / "o"
    L.convert(src, str(out), "longcat" if to == "fastvideo" else "peft")  # an earlier output
    before = _digest(out)

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError) as got:
        L.convert(src, str(out), to, overwrite=True)
    assert got.value.errno == errno.EIO and got.value.filename == str(out)
    assert _digest(out) == before
    assert sorted(os.listdir(tmp_path)) == ["o"]  # no temp left


def test_writeback_is_started_every_so_often_over_the_whole_output(src, tmp_path, monkeypatch):
    calls = []
    real = writer.start_writeback

    def record(fd, offset, nbytes):
        calls.append((offset, nbytes))
        return real(fd, offset, nbytes)  # the real call: it must accept these ranges

    monkeypatch.setattr(writer, "start_writeback", record)
    monkeypatch.setattr(writer, "WRITEBACK_EVERY", 4096)
    out = tmp_path / "o.safetensors"
    L.convert(src, str(out), "peft")  # block-diagonal ups written from memory, downs copied
    size = os.path.getsize(out / "adapter_model.safetensors")
    assert len(calls) > 3
    assert all(n >= 4096 for _, n in calls)
    ends = [o + n for o, n in calls]
    assert [o for o, _ in calls] == [0] + ends[:-1]  # consecutive ranges from the start
    assert size - ends[-1] < 4096 + max(n for _, n in calls)  # up to the last piece


def test_a_refused_writeback_hint_changes_nothing(src, tmp_path, monkeypatch):
    ref = tmp_path / "ref.safetensors"
    L.convert(src, str(ref), "peft")
    tried = []

    def refuse(*a):
        tried.append(a)
        raise OSError(errno.ESPIPE, "Illegal seek")

    monkeypatch.setattr(writer, "start_writeback", refuse)
    monkeypatch.setattr(writer, "WRITEBACK_EVERY", 4096)
    out = tmp_path / "o.safetensors"
    L.convert(src, str(out), "peft")
    assert len(tried) == 1  # asked once, then never again for that file
    assert _digest(out) == _digest(ref)


def test_write_hands_the_kernel_at_most_one_piece_at_a_time(tmp_path, monkeypatch):
    sizes = []
    real = os.write

    def write(fd, data):
        sizes.append(len(memoryview(data).cast("B")))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(writer, "WRITE_PIECE", 1000)
    data = torch.arange(5000, dtype=torch.float32)
    path = str(tmp_path / "w.safetensors")
    writer.write_safetensors(path, [writer.Entry("x", "F32", (5000,), lambda: data.numpy())])
    assert max(sizes) == 1000 and sum(sizes) == os.path.getsize(path)
    from safetensors.torch import load_file

    assert torch.equal(load_file(path)["x"], data)


def test_start_writeback_calls_the_kernel(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10000)
    fd = os.open(path, os.O_RDWR)
    try:
        writer.start_writeback(fd, 0, 10000)  # accepted: no error
        with pytest.raises(OSError) as bad:
            writer.start_writeback(fd, -1, 10)  # the kernel refuses a negative offset: EINVAL, raised
        assert bad.value.errno == errno.EINVAL
    finally:
        os.close(fd)


def test_a_folder_we_may_not_read_is_written_into_without_its_sync(src, tmp_path, monkeypatch):
    """A drop-box folder (-wx): it cannot be opened to be synced; the output is still written and placed
    (root bypasses modes, so the refusal is simulated)."""
    real = os.open

    def no_dir_read(path, flags, *a, **k):
        if flags & os.O_DIRECTORY:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", no_dir_read)
    L.convert(src, str(tmp_path / "o.safetensors"), "fastvideo")
    L.convert(src, str(tmp_path / "p"), "peft")
    monkeypatch.undo()
    ref = tmp_path / "ref.safetensors"
    L.convert(src, str(ref), "fastvideo")
    assert _digest(tmp_path / "o.safetensors") == _digest(ref)
    assert sorted(os.listdir(tmp_path / "p")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_failing_folder_sync_after_the_rename_does_not_fail_a_complete_output(src, tmp_path, monkeypatch):
    """Once OUT is in place (complete and fsynced) a failing sync of its folder is not an error: failing
    then would report a failure while the new OUT has already replaced the old one."""
    out = tmp_path / "o.safetensors"
    L.convert(src, str(out), "longcat")
    real = os.fsync

    def dir_eio(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fsync", dir_eio)
    L.convert(src, str(out), "fastvideo", overwrite=True)
    monkeypatch.undo()
    ref = tmp_path / "ref.safetensors"
    L.convert(src, str(ref), "fastvideo")
    assert _digest(out) == _digest(ref)


def test_a_side_file_we_may_not_read_is_synced_through_a_write_descriptor_or_left(tmp_path, monkeypatch):
    """make_durable opens files read-only; a copied file whose mode refuses that (a non-root user) is
    opened for writing instead, or left to the filesystem when that is refused too (simulated)."""
    from longcat_lora.io import outputs

    d = tmp_path / "out"
    d.mkdir()
    for n in ("wo", "none", "ok"):
        (d / n).write_bytes(b"x")
    real_open = os.open
    synced = []

    def guarded(path, flags, *a, **k):
        name = os.path.basename(str(path))
        if name in ("wo", "none") and flags & (os.O_WRONLY | os.O_RDWR) == 0:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        if name == "none":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *a, **k)

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return FSYNC(fd)

    monkeypatch.setattr(os, "open", guarded)
    monkeypatch.setattr(os, "fsync", fsync)
    outputs.make_durable(str(d))
    assert sorted(synced) == ["ok", "out", "wo"]


def test_a_direct_write_refused_with_einval_goes_on_buffered(tmp_path, monkeypatch):
    from longcat_lora.io import direct

    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    dfd = direct.open_direct(fd)
    if dfd is None:  # no O_DIRECT on this filesystem: nothing to refuse
        os.close(fd)
        return
    real = os.pwrite
    used = []

    def strict(f, buf, off):
        used.append(f)
        if f == dfd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(f, buf, off)

    monkeypatch.setattr(os, "pwrite", strict)
    monkeypatch.setattr(direct, "STAGE", 2 * direct.ALIGN)
    data = bytes(range(256)) * (9 * direct.ALIGN // 256) + b"tail"
    try:
        writer._write_all(fd, b"head")
        w = direct.DirectWriter(fd, dfd, writer._write_all)
        w.write(memoryview(data))
    finally:
        os.close(dfd)
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"head" + data
    assert used[0] == dfd and dfd not in used[1:] and w.dfd is None  # tried once, then buffered
