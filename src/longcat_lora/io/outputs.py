"""Outputs that never clobber: path checks before any work, temps beside OUT, atomic placement, stale-temp reclaim."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager


from ..errors import LoraError, Param
from .interrupts import critical
from .reader import file_kind

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
            raise LoraError(f"{out}: already exists (pass ", Param("overwrite"), " to replace it)")
        if stat.S_ISLNK(st.st_mode):
            raise LoraError(f"{out}: is a symbolic link; ", Param("overwrite"), " never replaces a link or writes "
                            "through it (remove the link, or name its target)")
        if directory:
            if not stat.S_ISDIR(st.st_mode):
                raise LoraError(f"{out}: exists and is {file_kind(st.st_mode)}, not an earlier output directory; "
                                f"refusing to replace it")
            why = replaceable(out) if replaceable is not None else dir_problem(out, {}, set())
            if why:
                raise LoraError(f"{out}: {why}; refusing to replace it (", Param("overwrite"), " replaces only an "
                                "earlier output of this command)")
        elif not stat.S_ISREG(st.st_mode):
            raise LoraError(f"{out}: exists and is {file_kind(st.st_mode)}; ", Param("overwrite"),
                            " replaces only a regular file")
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


def make_durable(path: str) -> None:
    """fsync a finished temp output (a file, or every regular file in a directory tree and the directories
    themselves) before it takes OUT's name: after a crash, OUT is either the previous file or the complete
    new one, never a name pointing at data that never reached the disk. A write error the kernel only
    reports now (a full or failing disk under delayed allocation, a network filesystem) fails the command
    here, before anything is replaced."""
    if not os.path.isdir(path) or os.path.islink(path):
        _fsync(path)
        return
    for root, dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                _fsync(p)
        _fsync_dir(root)


def _fsync(path: str) -> None:
    """fsync one of our files. A copied side file may keep a mode that lets us write but not read it (or
    neither, for a non-root user): it is opened for writing instead, or left to the filesystem."""
    extra = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, os.O_RDONLY | extra)
    except PermissionError:
        try:
            fd = os.open(path, os.O_WRONLY | extra)
        except PermissionError:
            return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    """fsync a directory, so the names in it are on disk too. A folder we may write but not read (a
    drop box, mode -wx) cannot be opened to be synced, and a filesystem may not sync directories (EINVAL):
    both are left to the filesystem; a failing sync (EIO) raises."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


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
            make_durable(tmp)
            check_output(out, overwrite=overwrite, inputs=inputs, directory=directory, replaceable=replaceable)
            with critical():
                _put_in_place(tmp, out, parent, base)
            try:
                _fsync_dir(parent)
            except OSError:
                pass  # OUT is in place, complete and on disk; only its name's durability is in doubt now
        except OSError as e:
            raise _name_output(e, tmp, out) from e
    except BaseException:
        with critical():
            _remove(tmp)
        raise
