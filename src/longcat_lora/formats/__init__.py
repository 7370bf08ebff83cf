"""Every LoRA format, one module each with the same small interface (detect / read / write).

`load_lora` auto-detects the format of a file or directory; `save_lora` writes any format atomically.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable

from ..model import naming
from ..model.adapter import LoraAdapter
from ..errors import LoraError
from ..io.reader import SafeFile
from ..io.outputs import atomic_output, check_output
from . import comfyui, diffusers, fastvideo, longcat, peft
from ._common import WriteOptions

FORMATS = {m.NAME: m for m in (longcat, fastvideo, peft, diffusers, comfyui)}

_STD = re.compile(r"\.lora_(A|B|alpha)(\.weight)?$")


def _key_format(key: str) -> str | None:
    if key.startswith(longcat.PREFIX):
        return longcat.NAME
    if key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")):
        return comfyui.NAME
    if _STD.search(key):
        if key.startswith(peft.PREFIX):
            return peft.NAME
        if key.startswith(diffusers.PREFIX):
            return diffusers.NAME
        return fastvideo.NAME
    return None


def _looks_like_base(keys: list[str]) -> bool:
    for k in keys:
        module, leaf = naming.split_param(k.removeprefix("model.diffusion_model.").removeprefix("diffusion_model."))
        if leaf in ("weight", "bias") and (naming.kind_of(module) or naming.from_fastvideo(module)):
            return True
    return False


def detect_format(path: str) -> str:
    """The format of a LoRA file or PEFT directory, judged by content (never by file name)."""
    return _open(path)[0]


def _open(path: str) -> tuple[str, SafeFile, str | None]:
    path = str(path)
    config = None
    if os.path.isdir(path):
        found = peft.paths(path)
        if found is None:
            raise LoraError(f"{path}: a directory but not a PEFT adapter (no {peft.CONFIG})")
        path, config = found
        if not os.path.isfile(path):
            raise LoraError(f"{os.path.dirname(path)}: PEFT adapter directory has no {peft.WEIGHTS}")
    elif not os.path.exists(path):
        raise LoraError(f"{path}: no such file or directory")
    sf = SafeFile(path)
    try:
        keys = sf.keys()
        if not keys:
            raise LoraError(f"{path}: holds no tensors")
        kinds: dict[str, str] = {}
        for k in keys:
            f = _key_format(k)
            if f is not None:
                kinds.setdefault(f, k)
        if not kinds:
            if _looks_like_base(keys):
                raise LoraError(f"{path}: looks like a base model checkpoint (e.g. {keys[0]!r}), not a LoRA")
            raise LoraError(f"{path}: no LoRA tensors found (e.g. {keys[0]!r})")
        if len(kinds) > 1:
            (a, ka), (b, kb) = list(kinds.items())[:2]
            raise LoraError(f"{path}: mixed formats in one file: {a} ({ka!r}) and {b} ({kb!r})")
        fmt = next(iter(kinds))
        if fmt == peft.NAME and config is None:
            found = peft.paths(path)
            if found is None:
                raise LoraError(f"{path}: PEFT weights without an {peft.CONFIG} beside them")
            config = found[1]
        return fmt, sf, config
    except BaseException:
        sf.close()
        raise


def load_lora(path: str) -> LoraAdapter:
    """Read any supported LoRA (file, or PEFT directory) into the format-neutral model, lazily."""
    fmt, sf, config = _open(path)
    try:
        if fmt == peft.NAME:
            return peft.read(sf, config)
        return FORMATS[fmt].read(sf)
    except BaseException:
        sf.close()
        raise


def save_lora(adapter: LoraAdapter, path: str, format: str, *, overwrite: bool = False,
              skip_unmapped: bool = False, allow_nonfinite: bool = False, inputs: Iterable[str] = (),
              progress: bool = False) -> list[str]:
    """Write `adapter` as `format` to `path` atomically; returns the modules skipped (skip_unmapped)."""
    if format not in FORMATS:
        raise LoraError(f"unknown format {format!r} (choose from {', '.join(FORMATS)})")
    mod = FORMATS[format]
    opts = WriteOptions(skip_unmapped=skip_unmapped)
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit="B", unit_scale=True, desc=os.path.basename(path), leave=False)
        opts.progress = bar.update
    try:
        with atomic_output(path, overwrite=overwrite, inputs=inputs, **_output_kind(format)) as tmp:
            try:
                with adapter.refusing_nonfinite(not allow_nonfinite):
                    mod.write(adapter, tmp, opts)
                for f in adapter.files:
                    f.check_unchanged()  # an input rewritten meanwhile: what was read may mix two versions
            except LoraError as e:  # about the adapter's content: name where it came from (not OUT's errors)
                raise e.prefixed(adapter.path or "adapter") from None
    finally:
        if bar is not None:
            bar.close()
    return opts.skipped


def _output_kind(format: str) -> dict:
    """atomic_output's arguments for a format: a file, or a directory that `--overwrite` may replace only
    when it is an earlier output of that format (the format module's `replaceable`)."""
    mod = FORMATS[format]
    return {"directory": getattr(mod, "DIRECTORY", False), "replaceable": getattr(mod, "replaceable", None)}


def check_lora_output(path: str, format: str, *, overwrite: bool = False, inputs: Iterable[str] = ()) -> None:
    """Refuse, before any input is read, an output that `save_lora(..., format)` could not write: an
    unknown format, OUT equal to / inside / containing an input, an existing OUT without `overwrite`, or
    one that is not an earlier output of this kind (see `st.check_output`).

    >>> check_lora_output("out_peft", "peft", inputs=["cfg_step_lora.safetensors"])
    """
    if format not in FORMATS:
        raise LoraError(f"unknown format {format!r} (choose from {', '.join(FORMATS)})")
    check_output(str(path), overwrite=overwrite, inputs=[str(p) for p in inputs], **_output_kind(format))


def convert(src: str, dst: str, to: str, **kwargs) -> list[str]:
    """Convert a LoRA file (any format) to `to`; returns the modules skipped."""
    check_lora_output(dst, to, overwrite=kwargs.get("overwrite", False), inputs=[src])
    with load_lora(src) as adapter:
        return save_lora(adapter, dst, to, inputs=[src], **kwargs)


__all__ = ["FORMATS", "WriteOptions", "check_lora_output", "convert", "detect_format", "load_lora", "save_lora"]
