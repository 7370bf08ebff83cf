"""The files of a sharded base checkpoint that are not shards, copied into a merge's output directory.

Links are kept as links (never followed), directories copied recursively, FIFOs, sockets and devices
refused; the index is rewritten only where a new dtype changes the total size.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

from ..errors import LoraError
from ..io.dtypes import FLOATS, ITEMSIZE
from ..io.reader import SafeFile, file_kind
from .base_checkpoint import Base


def copy_side_file(src: str, dst: str, root: str) -> None:
    """Copy one non-shard entry of BASE: a regular file, a directory (recursively), or a symlink as a link.

    Links are never followed: a link whose target stays inside BASE (`root`) keeps its text (it resolves
    the same way in OUT, which mirrors BASE); one pointing out of BASE becomes a link to the same absolute
    target.
    Nothing is read through a link, so a link to `/` or to a secret never copies its contents into OUT.
    FIFOs, sockets and devices are refused (copying one would block or read forever).
    """
    mode = os.lstat(src).st_mode
    if stat.S_ISLNK(mode):
        target = os.readlink(src)
        inside = _inside(os.path.join(os.path.dirname(src), target), root)
        os.symlink(target if inside else os.path.realpath(src), dst)
    elif stat.S_ISDIR(mode):
        os.mkdir(dst, 0o777)
        for n in sorted(os.listdir(src)):
            copy_side_file(os.path.join(src, n), os.path.join(dst, n), root)
        shutil.copystat(src, dst, follow_symlinks=False)
    elif stat.S_ISREG(mode):
        shutil.copy2(src, dst, follow_symlinks=False)
    else:
        raise LoraError(f"{src}: {file_kind(mode)} in the base checkpoint; refusing to copy it")


def _inside(path: str, folder: str) -> bool:
    """True if `path`, resolved through every link, lies in `folder` (also resolved)."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def copy_rest(b: Base, tmp: str, out_dtype: str | None, dropped: frozenset[str] = frozenset()) -> None:
    """Every file of BASE that is not a shard, the index rewritten only where sizes changed or tensors were
    left out (`dropped`: a dequantized fp8 checkpoint's scales and marker; see copy_side_file)."""
    for entry in os.listdir(b.path):
        src, dst = os.path.join(b.path, entry), os.path.join(tmp, entry)
        if entry in b.shards:
            continue
        if entry == b.index_name and b.index is not None:
            index = json.loads(json.dumps(b.index))
            if dropped:
                index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in dropped}
            if out_dtype is not None:
                total = sum(_out_nbytes(sf, k, out_dtype) for sf in b.shards.values() for k in sf.keys()
                            if k not in dropped)
                if not isinstance(index.get("metadata"), dict):
                    index["metadata"] = {}
                index["metadata"]["total_size"] = total
            with open(dst, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
        else:
            copy_side_file(src, dst, b.path)


def _out_nbytes(sf: SafeFile, name: str, out_dtype: str) -> int:
    info = sf.info(name)
    dt = out_dtype if info.dtype in FLOATS or info.dtype in ("F8_E4M3", "F8_E5M2") else info.dtype
    return info.nbytes // ITEMSIZE[info.dtype] * ITEMSIZE[dt]


__all__ = ["copy_rest", "copy_side_file"]
