"""A base checkpoint opened for reading: one safetensors file, or a directory of shards with an index.

`open_base` validates the index (a weight_map naming shards that hold their tensors, shard names that
stay inside the directory, no tensor in two shards) and opens every shard; `merge` and `extract` read
their checkpoints through it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import LoraError
from ..io import jsonsafe
from ..io.reader import SafeFile, file_kind

INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


@dataclass
class Base:
    """A base checkpoint laid out as shards (one, for a single file)."""

    path: str
    directory: bool
    shards: dict[str, SafeFile]  # file name -> open file
    index_name: str | None = None
    index: dict | None = None
    tensors: dict[str, str] = field(default_factory=dict)  # tensor -> shard file name

    def shape(self, tensor: str) -> tuple[int, ...] | None:
        shard = self.tensors.get(tensor)
        return None if shard is None else self.shards[shard].info(tensor).shape

    def close(self) -> None:
        for f in self.shards.values():
            f.close()


def open_base(path: str) -> Base:
    """Open and validate a base checkpoint: index, shards, and every tensor the index names."""
    path = str(path)
    if os.path.isfile(path):
        sf = SafeFile(path)
        base = Base(path, False, {os.path.basename(path): sf})
        base.tensors = {k: os.path.basename(path) for k in sf.keys()}
        return base
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise LoraError(f"{path}: not a regular file or directory ({file_kind(os.stat(path).st_mode)})")
        raise LoraError(f"{path}: no such file or directory")
    indexes = [n for n in os.listdir(path) if n.endswith(".safetensors.index.json")]
    if not indexes:
        single = [n for n in os.listdir(path) if n.endswith(".safetensors")]
        if len(single) != 1:
            raise LoraError(f"{path}: no *.safetensors.index.json and {len(single)} .safetensors files; "
                            f"cannot tell which are the shards")
        base = Base(path, True, {single[0]: SafeFile(os.path.join(path, single[0]))})
        base.tensors = {k: single[0] for k in base.shards[single[0]].keys()}
        return base
    preferred = [n for n in INDEX_NAMES if n in indexes]
    name = preferred[0] if preferred else sorted(indexes)[0]
    ipath = os.path.join(path, name)
    if os.path.exists(ipath) and not os.path.isfile(ipath):  # a FIFO would block the read forever
        raise LoraError(f"{ipath}: not a regular file ({file_kind(os.stat(ipath).st_mode)})")
    index = jsonsafe.load_file(ipath, "the safetensors index", jsonsafe.MAX_INDEX_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise LoraError(f"{ipath}: not a valid safetensors index (needs a weight_map object, tensor -> shard)")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise LoraError(f"{ipath}: weight_map[{tensor!r}] must be a shard file name, not "
                            f"{jsonsafe.type_name(shard)}")
    if not isinstance(index.get("metadata", {}), dict):
        raise LoraError(f"{ipath}: the index's metadata must be an object, not {jsonsafe.type_name(index['metadata'])}")
    base = Base(path, True, {}, name, index)
    try:
        for shard in sorted(set(weight_map.values())):
            spath = os.path.join(path, shard)
            if not _plain_name(shard):  # a path from a file never leaves BASE
                raise LoraError(f"{ipath}: shard {shard!r} is not a file name inside {path}; refusing")
            if not os.path.exists(spath):  # (a FIFO or device is refused by SafeFile, never read)
                raise LoraError(f"{ipath}: shard {shard!r} is missing from {path}")
            base.shards[shard] = SafeFile(spath)
        for tensor, shard in weight_map.items():
            if tensor not in base.shards[shard].tensors:
                raise LoraError(f"{ipath}: names tensor {tensor!r} in {shard!r}, which does not hold it")
        for shard, sf in base.shards.items():
            for tensor in sf.keys():
                if base.tensors.setdefault(tensor, shard) != shard:
                    raise LoraError(f"{path}: tensor {tensor!r} is in both {base.tensors[tensor]!r} and {shard!r}")
    except BaseException:
        base.close()
        raise
    return base


def _plain_name(name: object) -> bool:
    """True for a file name that stays inside its folder (no separator, not '.', '..' or empty, no NUL)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and os.sep not in name
            and "\0" not in name)


__all__ = ["Base", "open_base"]
