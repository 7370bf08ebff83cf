"""The one interface every LoRA format implements: a `Format` value, registered in one line.

Modelled on PEFT's method registration (`register_peft_method(name=..., config_cls=..., model_cls=...)`):
a format module keeps its parts as plain functions and ends with its value, `FORMAT = Format(...)`,
which one line registers (`registry.register`; the built-in ones are listed in `formats.BUILTIN`).

- `owns_key(key)`: whether a tensor key is this format's. Detection asks every format. A format whose
  keys carry no prefix of their own (bare module paths, as FastVideo and kohya write them) is a
  `fallback`: it owns a key only when no other format claims it. Within each kind claims are exclusive
  (a key is no format's or exactly one's), so the order of registration never decides.
- `read(sf)`: the open safetensors file -> the format-neutral `LoraAdapter` (lazy: headers and scalars).
  A format with side files finds them beside `sf.path` itself.
- `write(adapter, path, opts)`: the adapter as this format at `path`, a file (or a directory for a
  directory format, created empty by the caller); `opts` are the `WriteOptions` every writer takes.
  None for a format that is only read (DiffSynth-Studio's: another format loads there exactly).
- Directory formats only (`directory=True`): `owns_path(dir)` gives the safetensors file to read when
  the directory is this format's (None when it is not), `describe` says what such a directory holds (for
  the message when no format claims one), and `replaceable(dir)` says why an existing directory is not
  an earlier output of this format (None when it is), for `overwrite=True`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..io.reader import SafeFile
    from ..model.adapter import LoraAdapter
    from ._common import WriteOptions


@dataclass(frozen=True)
class Format:
    """One LoRA format: its name, which keys (and directories) are its own, and how to read and write it."""

    name: str
    owns_key: Callable[[str], bool]
    read: Callable[[SafeFile], LoraAdapter]
    write: Callable[[LoraAdapter, str, WriteOptions], None] | None  # None: a format read only
    fallback: bool = False
    directory: bool = False
    owns_path: Callable[[str], str | None] | None = None
    describe: str = ""
    replaceable: Callable[[str], str | None] | None = None

    def __post_init__(self) -> None:
        parts = (self.owns_path, self.describe, self.replaceable)
        if self.directory != all(parts) or any(parts) != self.directory:
            raise TypeError(f"format {self.name!r}: owns_path, describe and replaceable are given exactly "
                            f"for a directory format")
