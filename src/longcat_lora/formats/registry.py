"""The registry of formats: `register`, `get`, and detection by content (`detect`, `open_input`).

Detection asks every registered format which keys are its own (`Format.owns_key`, fallback formats
last); a file is the one format that owns some of its keys. The refusals are here, once: no tensors, a base checkpoint mistaken
for a LoRA, keys of no format, keys of two formats.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType

from ..errors import LoraError
from ..io.reader import SafeFile
from ..model import naming
from .base import Format

_REGISTRY: dict[str, Format] = {}
FORMATS: Mapping[str, Format] = MappingProxyType(_REGISTRY)  # name -> Format, in registration order
_ALIASES: dict[str, str] = {}  # another name -> a format's name


def register(fmt: Format) -> Format:
    """Add a format (its name must be new) to detection, `get` and `FORMATS`; returns it."""
    if fmt.name in _REGISTRY:
        raise ValueError(f"format {fmt.name!r} is already registered")
    _REGISTRY[fmt.name] = fmt
    return fmt


def alias(name: str, of: str) -> None:
    """Make `name` another name for the registered format `of` (for writing: `get(name)`)."""
    if name in _REGISTRY or name in _ALIASES or of not in _REGISTRY:
        raise ValueError(f"cannot alias {name!r} to {of!r}")
    _ALIASES[name] = of


def outputs() -> list[str]:
    """The names `get` takes for writing: every format with a writer, and the aliases."""
    return [n for n, f in _REGISTRY.items() if f.write is not None] + list(_ALIASES)


def get(name: str) -> Format:
    """The format called `name` (or by an alias); a LoraError listing the choices for any other name, and
    for a format that is only read."""
    fmt = _REGISTRY.get(_ALIASES.get(name, name))
    if fmt is None or fmt.write is None:
        why = "a format that is only read; " if fmt is not None else ""
        raise LoraError(f"unknown output format {name!r} ({why}choose from {', '.join(outputs())})")
    return fmt


def owner(key: str) -> Format | None:
    """The format that owns a tensor key, or None: the one format that claims it, else the one fallback
    format that does. Two claims of one kind are a bug in those formats."""
    for fallback in (False, True):
        found = [f for f in _REGISTRY.values() if f.fallback is fallback and f.owns_key(key)]
        if len(found) > 1:
            raise AssertionError(f"key {key!r} is claimed by formats {[f.name for f in found]}")
        if found:
            return found[0]
    return None


def detect(keys: list[str], where: str) -> Format:
    """The format of a file holding `keys` (named `where` in messages); refuses files of no or two formats."""
    if not keys:
        raise LoraError(f"{where}: holds no tensors")
    kinds: dict[str, str] = {}  # format name -> its first key
    for k in keys:
        f = owner(k)
        if f is not None:
            kinds.setdefault(f.name, k)
    if not kinds:
        if _looks_like_base(keys):
            raise LoraError(f"{where}: looks like a base model checkpoint (e.g. {keys[0]!r}), not a LoRA")
        raise LoraError(f"{where}: no LoRA tensors found (e.g. {keys[0]!r})")
    if len(kinds) > 1:
        (a, ka), (b, kb) = list(kinds.items())[:2]
        raise LoraError(f"{where}: mixed formats in one file: {a} ({ka!r}) and {b} ({kb!r})")
    return _REGISTRY[next(iter(kinds))]


def _looks_like_base(keys: list[str]) -> bool:
    for k in keys:
        module, leaf = naming.split_param(k.removeprefix("model.diffusion_model.").removeprefix("diffusion_model."))
        if leaf in ("weight", "bias") and naming.resolve(module):
            return True
    return False


def weights_file(path: str) -> str:
    """The safetensors file to read for a LoRA file, or a directory some directory format owns."""
    if os.path.isdir(path):
        dirs = [f for f in _REGISTRY.values() if f.directory]
        for f in dirs:
            found = f.owns_path(path)
            if found is not None:
                return found
        raise LoraError(f"{path}: a directory but not {' or '.join(f.describe for f in dirs)}")
    if not os.path.exists(path):
        raise LoraError(f"{path}: no such file or directory")
    return path


# The most tensors a LoRA of LongCat-Video may hold, with room to spare: the largest layout (every module
# of the Avatar DiT, native form: 8 tensors per fused module) has about 2,500; a file past this is refused
# before its header is parsed (a million tiny tensors would otherwise take minutes and gigabytes).
MAX_LORA_TENSORS = 65_536


def open_input(path: str) -> tuple[Format, SafeFile]:
    """A LoRA file or directory, opened and detected by content (never by file name)."""
    sf = SafeFile(weights_file(str(path)), MAX_LORA_TENSORS, "LoRA of LongCat-Video (the largest holds ~2,500)")
    try:
        return detect(sf.keys(), sf.path), sf
    except BaseException:
        sf.close()
        raise
