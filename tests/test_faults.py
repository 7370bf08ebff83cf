"""Faults and hostile paths, through the real CLI: inputs that change while read, --overwrite onto things
that are not earlier outputs, SIGTERM mid-write, stale temps, symlinks out of BASE, disk full, FIFOs and
devices as input, the early OUT check, and directory modes.

Faults are injected in a child process that patches one function of longcat_lora (or of os) and then
runs the real `cli.main`; every test asserts the exit code, the one error line, that OUT is absent or
intact, and that no temp file is left.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import longcat_lora.io.writer as st
from longcat_lora.testing.dit import TINY
from longcat_lora.errors import LoraError
from longcat_lora.testing.fixtures import write_base_checkpoint, write_native_lora

from conftest import cli

INDEX = "diffusion_pytorch_model.safetensors.index.json"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
MAIN = "\nfrom longcat_lora.commands.cli import main\nsys.exit(main(sys.argv[1:]))\n"
TEMP = re.compile(r"\.longcat-lora-\d+(\.\d+)?\.(tmp|old)$")

# Cut file $VICTIM short in the middle of the first tensor about to be read from it, just before it is
# read: MODE=copy for the first unchanged range copied (copy_file_range), MODE=pread for the first tensor
# read into memory. The child prints "CUT <tensor> <bytes>"; the writer runs serially (no read-ahead
# thread), so the first read to fail is that one.
SHRINK = r"""
import os, sys
import longcat_lora.io.writer as st
import longcat_lora.io.reader as rd
victim, mode = os.path.realpath(os.environ["VICTIM"]), os.environ["MODE"]
done = []

def cut(path, name, offset, nbytes):
    if not done and os.path.realpath(path) == victim:
        done.append(1)
        print("CUT", name, nbytes, flush=True)
        os.truncate(victim, offset + nbytes // 2)

class Serial:
    def __init__(self, n): pass
    def __enter__(self): return self
    def __exit__(self, *a): return False
    def submit(self, fn): return st._Done(fn)
st.ThreadPoolExecutor = Serial
if mode == "copy":
    orig_run = st._copy_run
    def copy_run(parts, fd):
        cut(parts[0].path, parts[0].name, parts[0].offset, parts[0].nbytes)
        return orig_run(parts, fd)
    st._copy_run = copy_run
else:
    orig_pread = rd.SafeFile._pread
    def pread(self, name, start, buf):
        cut(self.path, name, start, buf.nbytes)
        return orig_pread(self, name, start, buf)
    rd.SafeFile._pread = pread
"""


def child(prelude: str, *args: str, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the CLI in a child that first executes `prelude` (the fault injection)."""
    return subprocess.run([sys.executable, "-c", "import sys\n" + prelude + MAIN, *map(str, args)],
                          capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=timeout, **kw)


def one_error_line(p: subprocess.CompletedProcess, code: int = 2) -> str:
    assert p.returncode == code, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def temps(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if TEMP.search(n))


@pytest.fixture(scope="module")
def merge_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults_merge")
    base = write_base_checkpoint(str(d / "base"), TINY, "longcat", shards=3, dtype=torch.float32)
    lora = write_native_lora(str(d / "lora.safetensors"), "refinement", dims=TINY.dims, rank=4,
                             dtype=torch.float32, alpha_scale=0.5, seed=3)
    return d, base, lora


def _shard(base: str, k: int = 1) -> str:
    return os.path.join(base, f"diffusion_pytorch_model-{k:05d}-of-00003.safetensors")


# ---- 1. inputs that change while they are read -----------------------------------------------------

def _assert_cut(p: subprocess.CompletedProcess, victim: str) -> None:
    """The error names the input, the tensor cut, its size and the bytes that were there."""
    line = one_error_line(p)
    cut = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("CUT ")]
    assert len(cut) == 1, p.stdout  # the fault did happen, once
    _, name, nbytes = cut[0]
    assert line == (f"longcat-lora: error: {victim}: changed or truncated while being read "
                    f"(tensor {name!r}: expected {nbytes} bytes, got {int(nbytes) // 2})"), line


@pytest.mark.parametrize("to, mode", [("fastvideo", "copy"), ("peft", "pread")])
def test_input_shrinking_during_convert_is_an_error_naming_it(native, tmp_path, to, mode):
    src = native("cfg_step")
    out = tmp_path / "out"
    p = child(SHRINK, "convert", src, out, "--to", to, env={"VICTIM": src, "MODE": mode})
    _assert_cut(p, src)
    assert not out.exists() and temps(tmp_path) == []


@pytest.mark.parametrize("mode", ["copy", "pread"])
def test_shard_shrinking_during_merge_is_an_error_naming_it(merge_setup, tmp_path, mode):
    d, base, lora = merge_setup
    b = shutil.copytree(base, tmp_path / "base")
    shard = _shard(str(b), 2)
    out = tmp_path / "merged"
    p = child(SHRINK, "merge", b, out, "--lora", lora, env={"VICTIM": shard, "MODE": mode})
    _assert_cut(p, shard)
    assert not out.exists() and temps(tmp_path) == []


def test_input_rewritten_same_size_is_caught_by_the_fstat_check(native, tmp_path):
    """A same-size rewrite (bytes changed behind the reader) is invisible to byte counts: mtime catches it."""
    src = native("cfg_step")
    out = tmp_path / "out.safetensors"
    prelude = r"""
import os
import longcat_lora.io.writer as st
import longcat_lora.io.reader as rd
orig = st._copy_range
done = []
def copy_range(r, fd):
    if not done:
        done.append(1)
        os.utime(os.environ["VICTIM"], ns=(1, 10**18))  # as a rewrite in place would
    return orig(r, fd)
st._copy_range = copy_range
"""
    line = one_error_line(child(prelude, "convert", src, out, "--to", "fastvideo", env={"VICTIM": src}))
    assert line.startswith(f"longcat-lora: error: {src}: changed while being read"), line
    assert not out.exists() and temps(tmp_path) == []


def test_short_copy_without_copy_file_range_is_counted(tmp_path, monkeypatch):
    """The pread fallback (copy_file_range unsupported) must count bytes too: an empty read is an error."""
    src = tmp_path / "in.bin"
    src.write_bytes(bytes(range(256)) * 4)  # 1024 bytes
    fd = os.open(src, os.O_RDONLY)

    def unsupported(*a, **k):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    try:
        entries = [st.Entry("a", "U8", (600,), lambda: st.FileRange(fd, 0, 600, str(src), "a")),
                   st.Entry("b", "U8", (600,), lambda: st.FileRange(fd, 600, 600, str(src), "b"))]
        with pytest.raises(LoraError, match=rf"{re.escape(str(src))}: changed or truncated while being read "
                                            r"\(tensor 'b': expected 600 bytes, got 424\)"):
            st.write_safetensors(str(tmp_path / "out.safetensors"), entries)
        entries = entries[:1]  # what fits is copied exactly, through the same fallback
        st.write_safetensors(str(tmp_path / "ok.safetensors"), entries)
        with safe_open(str(tmp_path / "ok.safetensors"), "pt") as f:
            assert f.get_tensor("a").tolist() == list(range(256)) * 2 + list(range(88))
    finally:
        os.close(fd)


# ---- 2. --overwrite replaces only an earlier output of the same kind -------------------------------

def test_overwrite_never_replaces_a_directory_fifo_or_link(native, tmp_path):
    src = native("cfg_step")
    d = tmp_path / "precious"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("keep me")
    (d / "sub" / "x").write_text("and me")
    for to in ("fastvideo", "peft"):
        line = one_error_line(cli("convert", src, d, "--to", to, "--overwrite", check=None))
        assert str(d) in line and "refusing" in line or "only a regular file" in line, line
    assert (d / "notes.txt").read_text() == "keep me" and (d / "sub" / "x").read_text() == "and me"
    assert sorted(os.listdir(d)) == ["notes.txt", "sub"]
    # a directory holding a PEFT adapter plus something else is not ours either
    shutil.copy(src, d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text("{}")
    line = one_error_line(cli("convert", src, d, "--to", "peft", "--overwrite", check=None))
    assert "holds 'notes.txt'" in line
    assert (d / "notes.txt").read_text() == "keep me"

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    line = one_error_line(cli("convert", src, fifo, "--to", "fastvideo", "--overwrite", check=None))
    assert "is a FIFO" in line and stat.S_ISFIFO(os.lstat(fifo).st_mode)

    target = tmp_path / "target.safetensors"
    target.write_bytes(b"target")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    line = one_error_line(cli("convert", src, link, "--to", "fastvideo", "--overwrite", check=None))
    assert "symbolic link" in line
    assert os.path.islink(link) and target.read_bytes() == b"target"
    if os.path.exists("/dev/null") and os.access("/dev/null", os.W_OK):
        line = one_error_line(cli("convert", src, "/dev/null", "--to", "fastvideo", "--overwrite", check=None))
        assert "character device" in line and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert temps(tmp_path) == []


def test_overwrite_replaces_an_earlier_output_of_the_same_kind(native, tmp_path):
    a, b = native("cfg_step", seed=1, name="a.safetensors"), native("cfg_step", seed=2, name="b.safetensors")
    fresh = tmp_path / "fresh_peft"
    cli("convert", b, fresh, "--to", "peft")
    out = tmp_path / "peft"
    cli("convert", a, out, "--to", "peft")
    (out / "README.md").write_text("peft's model card")  # PEFT's own save_pretrained writes one
    cli("convert", b, out, "--to", "peft", "--overwrite")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    for n in os.listdir(out):
        assert (out / n).read_bytes() == (fresh / n).read_bytes(), n
    f = tmp_path / "f.safetensors"
    cli("convert", a, f, "--to", "fastvideo")
    cli("convert", b, tmp_path / "fresh.safetensors", "--to", "fastvideo")
    cli("convert", b, f, "--to", "fastvideo", "--overwrite")
    assert f.read_bytes() == (tmp_path / "fresh.safetensors").read_bytes()
    # a file output never replaces the PEFT directory, nor a PEFT output the file
    assert "not an earlier output directory" in one_error_line(
        cli("convert", a, f, "--to", "peft", "--overwrite", check=None))
    assert "only a regular file" in one_error_line(
        cli("convert", a, out, "--to", "fastvideo", "--overwrite", check=None))
    assert temps(tmp_path) == []


def test_merge_overwrite_only_over_an_earlier_merge(merge_setup, tmp_path):
    d, base, lora = merge_setup
    out = tmp_path / "merged"
    cli("merge", base, out, "--lora", lora)
    first = {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".safetensors")}
    cli("merge", base, out, "--lora", f"{lora}:-1", "--overwrite")
    second = {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".safetensors")}
    assert first.keys() == second.keys() and first != second  # replaced, by the strength -1 merge
    (out / "my_notes.txt").write_text("mine")
    line = one_error_line(cli("merge", base, out, "--lora", lora, "--overwrite", check=None))
    assert "holds 'my_notes.txt'" in line and (out / "my_notes.txt").read_text() == "mine"
    assert {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".safetensors")} == second
    assert temps(tmp_path) == []


# ---- 3. SIGTERM mid-write; stale temps of killed runs -----------------------------------------------

# Print a marker once the output's header is written, then stall (a long write), so the test can signal.
SLOW = r"""
import os, time
import longcat_lora.io.writer as st
import longcat_lora.io.reader as rd
orig = st._write_all
def write_all(fd, data):
    orig(fd, data)
    if not getattr(st, "_marked", False):
        st._marked = True
        print("WRITING", flush=True)
        time.sleep(60)
st._write_all = write_all
"""


@pytest.mark.parametrize("to", ["fastvideo", "peft"])
def test_sigterm_mid_write_leaves_nothing(native, tmp_path, to):
    src = native("cfg_step")
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", "import sys\n" + SLOW + MAIN, "convert", src, out, "--to", to],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert p.stdout.readline().strip() == "WRITING"
        assert len(temps(tmp_path)) == 1  # the partial output exists beside OUT, under our temp name
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 143, err
    assert err.strip() == "longcat-lora: terminated"
    assert not out.exists() and temps(tmp_path) == []


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_temps_of_dead_writers_are_reclaimed_and_nothing_else(native, tmp_path):
    src = native("cfg_step")
    dead, live = _dead_pid(), os.getpid()
    work = tmp_path / "work"
    work.mkdir()
    stale_file = work / f".a.safetensors.longcat-lora-{dead}.tmp"
    stale_file.write_bytes(b"partial")
    stale_dir = work / f".peft_out.longcat-lora-{dead}.3.tmp"
    (stale_dir / "x").mkdir(parents=True)
    stale_old = work / f".merged.longcat-lora-{dead}.old"  # its OUT was put in place: removed
    stale_old.mkdir()
    (work / "merged").mkdir()
    orphan_old = work / f".only.longcat-lora-{dead}.2.old"  # killed between the renames: OUT missing
    (orphan_old / "shard.safetensors").parent.mkdir()
    (orphan_old / "shard.safetensors").write_bytes(b"previous output")
    keep = [work / f".b.safetensors.longcat-lora-{live}.tmp",  # a live writer's
            work / ".hidden", work / f".c.longcat-lora-{dead}.tmpx", work / f"c.longcat-lora-{dead}.tmp",
            work / f".d.longcat-lora-{dead}.tmp.bak", work / f".e.longcat-lora-x{dead}.tmp"]
    for k in keep:
        k.write_bytes(b"keep")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not ours")
    link = work / f".f.longcat-lora-{dead}.tmp"  # a link with our name: not a file we wrote
    link.symlink_to(outside)
    cli("convert", src, work / "out.safetensors", "--to", "fastvideo")
    assert not stale_file.exists() and not stale_dir.exists() and not stale_old.exists()
    assert (work / "only" / "shard.safetensors").read_bytes() == b"previous output"  # restored, not deleted
    assert all(k.read_bytes() == b"keep" for k in keep)
    assert os.path.islink(link) and outside.read_bytes() == b"not ours"
    assert sorted(os.listdir(work)) == sorted([k.name for k in keep] + [link.name, "out.safetensors", "merged",
                                                                        "only"])


# ---- 4. merge never follows a link out of BASE; index paths stay inside BASE ------------------------

def test_merge_copies_links_as_links_never_their_contents(merge_setup, tmp_path):
    d, base, lora = merge_setup
    b = tmp_path / "base"
    shutil.copytree(base, b)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("SECRET")
    (b / "linked_dir").symlink_to(outside)
    (b / "linked_file").symlink_to(outside / "secret.txt")
    (b / "local_link.json").symlink_to("config.json")  # stays inside BASE: kept as written
    (b / "scheduler").mkdir()
    (b / "scheduler" / "up.json").symlink_to("../config.json")
    out = tmp_path / "merged"
    cli("merge", b, out, "--lora", lora)
    assert os.readlink(out / "linked_dir") == str(outside)
    assert os.readlink(out / "linked_file") == str(outside / "secret.txt")
    assert os.readlink(out / "local_link.json") == "config.json"
    assert os.readlink(out / "scheduler" / "up.json") == "../config.json"
    for root, dirs, files in os.walk(out):  # os.walk does not follow links: nothing was copied through one
        for n in files:
            p = os.path.join(root, n)
            assert os.path.islink(p) or b"SECRET" not in open(p, "rb").read(), p
    assert not os.path.isdir(out / "linked_dir") or os.path.islink(out / "linked_dir")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "{abs}", "sub/../x.safetensors",
                                   "diffusion_pytorch_model-00001-of-00003.safetensors/."])
def test_index_naming_a_shard_outside_base_is_refused(merge_setup, tmp_path, shard):
    d, base, lora = merge_setup
    b = tmp_path / "base"
    shutil.copytree(base, b)
    victim = tmp_path / "outside.safetensors"
    shutil.copy(_shard(str(b), 1), victim)  # a real shard out there: only the name check stops it
    (b / "sub").mkdir()
    shutil.copy(_shard(str(b), 1), b / "x.safetensors")
    shard = shard.format(abs=victim)
    idx = json.loads((b / INDEX).read_text())
    first = next(k for k, v in idx["weight_map"].items() if v.endswith("00001-of-00003.safetensors"))
    idx["weight_map"][first] = shard
    (b / INDEX).write_text(json.dumps(idx))
    line = one_error_line(cli("merge", b, tmp_path / "out", "--lora", lora, check=None))
    assert "is not a file name inside" in line and repr(shard) in line, line
    assert not (tmp_path / "out").exists() and temps(tmp_path) == []


# ---- 5. errors that name the file --------------------------------------------------------------------

ENOSPC = r"""
import errno, os
def full(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
os.write = full
os.pwrite = full
os.copy_file_range = full
import longcat_lora.io.direct as dr
dr.DIRECT_MIN = 0  # merged weights go through the direct path too, where the filesystem allows it
"""


def test_disk_full_names_out(native, merge_setup, tmp_path):
    src = native("cfg_step")
    d, base, lora = merge_setup
    for args, out in ((["convert", src, tmp_path / "o.safetensors", "--to", "fastvideo"], tmp_path / "o.safetensors"),
                      (["convert", src, tmp_path / "o_peft", "--to", "peft"], tmp_path / "o_peft"),
                      (["merge", base, tmp_path / "o_merge", "--lora", lora], tmp_path / "o_merge")):
        line = one_error_line(child(ENOSPC, *args))
        assert line == f"longcat-lora: error: {out}: No space left on device", line
        assert not out.exists() and temps(tmp_path) == []


def test_fifo_and_devices_as_input_are_not_regular_files(native, merge_setup, tmp_path):
    d, base, lora = merge_setup
    fifo = tmp_path / "in.safetensors"
    os.mkfifo(fifo)
    src = native("cfg_step")
    for args in (["inspect", fifo], ["inspect", "/dev/null"], ["convert", fifo, tmp_path / "o", "--to", "peft"],
                 ["merge", fifo, tmp_path / "o", "--lora", lora], ["merge", base, tmp_path / "o", "--lora", fifo],
                 ["verify", src, "/dev/zero"]):
        p = subprocess.run([sys.executable, "-m", "longcat_lora", *map(str, args)], capture_output=True, text=True,
                           env=ENV, timeout=60)  # a blocking open or an endless read would time out
        line = one_error_line(p)
        assert "not a regular file" in line and ("FIFO" in line or "character device" in line), line
    b = tmp_path / "base"  # a FIFO where BASE's index names a shard, and as the index itself
    shutil.copytree(base, b)
    os.remove(_shard(str(b), 2))
    os.mkfifo(_shard(str(b), 2))
    line = one_error_line(cli("merge", b, tmp_path / "o", "--lora", lora, check=None))
    assert f"{_shard(str(b), 2)}: not a regular file (a FIFO)" in line
    os.remove(_shard(str(b), 2))
    shutil.copy(_shard(base, 2), _shard(str(b), 2))
    os.mkfifo(b / "side_fifo")  # a FIFO among BASE's other files: refused, never copied (which would block)
    line = one_error_line(cli("merge", b, tmp_path / "o", "--lora", lora, check=None))
    assert f"{b / 'side_fifo'}: a FIFO in the base checkpoint; refusing to copy it" in line, line
    assert temps(tmp_path) == []
    os.remove(b / INDEX)
    os.mkfifo(b / INDEX)
    p = subprocess.run([sys.executable, "-m", "longcat_lora", "merge", b, tmp_path / "o", "--lora", lora],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert "not a regular file (a FIFO)" in one_error_line(p)
    assert not (tmp_path / "o").exists()


def test_out_checks_come_before_reading_the_input(native, merge_setup, tmp_path):
    """An existing OUT is refused first: a broken input (that would fail later) never gets read."""
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(open(native("cfg_step"), "rb").read()[:-100])
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"precious")
    line = one_error_line(cli("convert", broken, out, "--to", "fastvideo", check=None))
    assert "already exists" in line and out.read_bytes() == b"precious"
    (tmp_path / "a_dir").mkdir()
    line = one_error_line(cli("convert", broken, tmp_path / "a_dir", "--to", "fastvideo", "--overwrite", check=None))
    assert "is a directory" in line
    d, base, lora = merge_setup
    b = tmp_path / "base"
    shutil.copytree(base, b)
    os.remove(_shard(str(b), 3))  # would fail as "is missing"
    outdir = tmp_path / "merged"
    outdir.mkdir()
    line = one_error_line(cli("merge", b, outdir, "--lora", broken, check=None))
    assert "already exists" in line
    # and nothing is opened at all: count SafeFile opens in the child
    prelude = r"""
import longcat_lora.io.writer as st
import longcat_lora.io.reader as rd
orig = rd.SafeFile.__init__
def init(self, path):
    print("OPENED", path, flush=True)
    orig(self, path)
rd.SafeFile.__init__ = init
"""
    p = child(prelude, "merge", base, outdir, "--lora", lora)
    assert "already exists" in one_error_line(p) and "OPENED" not in p.stdout
    p = child(prelude, "convert", native("cfg_step"), out, "--to", "fastvideo")
    assert "already exists" in one_error_line(p) and "OPENED" not in p.stdout


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_modes_follow_the_umask(native, merge_setup, tmp_path, umask):
    src = native("cfg_step")
    d, base, lora = merge_setup
    outs = {"file": tmp_path / "o.safetensors", "peft": tmp_path / "o_peft", "merge": tmp_path / "o_merge"}
    for args in (["convert", src, outs["file"], "--to", "fastvideo"], ["convert", src, outs["peft"], "--to", "peft"],
                 ["merge", base, outs["merge"], "--lora", lora]):
        p = subprocess.run([sys.executable, "-m", "longcat_lora", *map(str, args)], capture_output=True, text=True,
                           env=ENV, preexec_fn=lambda: os.umask(umask))
        assert p.returncode == 0, p.stderr
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(outs["file"]) == 0o666 & ~umask
    assert mode(outs["peft"]) == 0o777 & ~umask and mode(outs["merge"]) == 0o777 & ~umask
    assert mode(outs["peft"] / "adapter_model.safetensors") == 0o666 & ~umask



def test_paths_with_control_characters_stay_on_one_line(native, tmp_path):
    """A user's path holding a newline or an escape sequence is shown escaped: the error is one line."""
    p = cli("inspect", tmp_path / "no\nsuch\x1b[31m.safetensors", check=2)
    assert p.stderr.count("\n") == 1 and "\x1b" not in p.stderr
    assert "no\\nsuch\\x1b[31m.safetensors: no such file" in p.stderr
    src = native("cfg_step")
    out = tmp_path / "o\nut.safetensors"
    cli("convert", src, out, "--to", "longcat")
    p = cli("convert", src, out, "--to", "longcat", check=2)
    assert p.stderr.count("\n") == 1 and "o\\nut.safetensors" in p.stderr and "--overwrite" in p.stderr


def test_scalar_too_large_for_a_dtype_is_not_representable_and_warns_nothing():
    """An alpha too large for F32/BF16/F16 is stored wider (exact_dtype asks `representable`); numpy's
    overflow warning must not leak onto a successful run's stderr."""
    import warnings

    from longcat_lora.io.dtypes import decode_scalar, encode_scalar, representable

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [representable(5e299, dt) for dt in ("F16", "BF16", "F32", "F64")] == [False, False, False, True]
        assert decode_scalar(encode_scalar(5e299, "F32"), "F32") == float("inf")
        assert representable(0.5, "BF16") and not representable(0.3, "BF16")


# ---- the algebra commands check every output first, like convert and merge -------------------------

def test_resize_plot_output_refused_before_anything_is_written(native, tmp_path):
    src = native("cfg_step")
    folder = tmp_path / "d1"
    folder.mkdir()
    (folder / "x").write_text("keep")
    out = tmp_path / "r.safetensors"
    p = cli("resize", src, out, "--rank", "2", "--plot", folder, "--overwrite", check=2)
    assert "d1" in p.stderr and "directory" in p.stderr and len(p.stderr.splitlines()) == 1
    assert not out.exists() and (folder / "x").read_text() == "keep"
    out.write_bytes(b"an earlier output")  # with --overwrite it is not replaced when the command fails
    fifo = tmp_path / "plot.png"
    os.mkfifo(fifo)
    cli("resize", src, out, "--rank", "2", "--plot", fifo, "--overwrite", check=2)
    assert out.read_bytes() == b"an earlier output" and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_resize_output_errors_name_the_output_not_the_input(native, tmp_path):
    src = native("cfg_step")
    folder = tmp_path / "d1"
    folder.mkdir()
    (folder / "x").write_text("keep")
    p = cli("resize", src, folder, "--rank", "2", "--overwrite", check=2)
    assert p.stderr.startswith(f"longcat-lora: error: {folder}: ") and (folder / "x").read_text() == "keep"


def test_extract_checks_its_output_before_reading_the_checkpoints(merge_setup, tmp_path):
    """BASE and TUNED are the same checkpoint: had the output check come late, the message would be
    that there is no change to extract."""
    d, base, lora = merge_setup
    fifo = tmp_path / "ff"
    os.mkfifo(fifo)
    folder = tmp_path / "d1"
    folder.mkdir()
    (folder / "x").write_text("keep")
    for out, says in ((fifo, "a FIFO"), (folder, "directory"), (base, "same path as input")):
        p = cli("extract", base, base, out, "--rank", "2", "--overwrite", check=2)
        assert says in p.stderr and "no change" not in p.stderr, p.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and (folder / "x").read_text() == "keep"
