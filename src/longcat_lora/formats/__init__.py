"""Every LoRA format, one module each, all implementing one interface (`base.Format`), in one registry.

A format module holds the format's rules as plain functions and ends with its value,
`FORMAT = Format(NAME, owns_key, read, write)` (a directory format adds `directory=True`, `owns_path`,
`describe` and `replaceable`); `BUILTIN` below registers it. Adding a format is one module plus its
entry in `BUILTIN`; detection, `load_lora`, `save_lora`, `convert` and the CLI's `--to` choices then
know it. Detection lives in the formats: each says which keys are its own (`owns_key`, exclusive), and
`registry.detect` refuses files with keys of no format or of two.

`load_lora` auto-detects the format of a file or directory; `save_lora` writes any format atomically.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..progress import progress_bar
from ..model.adapter import LoraAdapter
from ..errors import LoraError, Param
from ..model.sources import NonFinite
from ..io.outputs import atomic_output, check_output
from . import diffsynth, diffusers, fastvideo, kohya, longcat, peft, wanvideo
from ._common import WriteOptions
from .base import Format
from .registry import FORMATS, alias, get, open_input, outputs, register

BUILTIN = (longcat.FORMAT, fastvideo.FORMAT, peft.FORMAT, diffusers.FORMAT, kohya.FORMAT, wanvideo.FORMAT,
           diffsynth.FORMAT)
for _fmt in BUILTIN:
    register(_fmt)
alias("comfyui", wanvideo.NAME)  # what ComfyUI users run LongCat-Video in: ComfyUI-WanVideoWrapper's model


def detect_format(path: str) -> str:
    """The format of a LoRA file or PEFT directory, judged by content (never by file name): its key form,
    and for kohya-form keys with the wrapper's Wan-style names, `wanvideo`."""
    with load_lora(path) as adapter:
        return adapter.format


def load_lora(path: str) -> LoraAdapter:
    """Read any supported LoRA (file, or PEFT directory) into the format-neutral model, lazily."""
    fmt, sf = open_input(path)
    try:
        return fmt.read(sf)
    except BaseException:
        sf.close()
        raise


def save_lora(adapter: LoraAdapter, path: str, format: str, *, overwrite: bool = False,
              skip_unmapped: bool = False, allow_nonfinite: bool = False, inputs: Iterable[str] = (),
              progress: bool = False) -> list[str]:
    """Write `adapter` as `format` to `path` atomically; returns the modules skipped (skip_unmapped)."""
    fmt = get(format)
    opts = WriteOptions(skip_unmapped=skip_unmapped)
    bar = progress_bar(progress, os.path.basename(path))
    if bar is not None:
        opts.progress = bar.update
    try:
        with atomic_output(path, overwrite=overwrite, inputs=inputs, **_output_kind(fmt)) as tmp:
            try:
                with adapter.refusing_nonfinite(not allow_nonfinite):
                    fmt.write(adapter, tmp, opts)
                for f in adapter.files:
                    f.check_unchanged()  # an input rewritten meanwhile: what was read may mix two versions
            except LoraError as e:  # about the adapter's content: name where it came from (not OUT's errors)
                raise e.prefixed(adapter.path or "adapter") from None
    finally:
        if bar is not None:
            bar.close()
    return opts.skipped


def _output_kind(fmt: Format) -> dict:
    """atomic_output's arguments for a format: a file, or a directory that `overwrite=True` may replace
    only when it is an earlier output of that format (`Format.replaceable`)."""
    return {"directory": fmt.directory, "replaceable": fmt.replaceable}


def check_lora_output(path: str, format: str, *, overwrite: bool = False, inputs: Iterable[str] = ()) -> None:
    """Refuse, before any input is read, an output that `save_lora(..., format)` could not write: an
    unknown format, OUT equal to / inside / containing an input, an existing OUT without `overwrite`, or
    one that is not an earlier output of this kind (see `io.outputs.check_output`).

    >>> check_lora_output("out_peft", "peft", inputs=["cfg_step_lora.safetensors"])
    """
    check_output(str(path), overwrite=overwrite, inputs=[str(p) for p in inputs], **_output_kind(get(format)))


def convert(src: str, dst: str, to: str, **kwargs) -> list[str]:
    """Convert a LoRA file (any format) to `to`; returns the modules skipped."""
    check_lora_output(dst, to, overwrite=kwargs.get("overwrite", False), inputs=[src])
    with load_lora(src) as adapter:
        try:
            return save_lora(adapter, dst, to, inputs=[src], **kwargs)
        except NonFinite as e:  # the option to write them anyway is convert's (commands that call save_lora
            # for their own outputs, like combine, do not offer it)
            raise NonFinite(*e.parts, " (pass ", Param("allow_nonfinite"), " to convert anyway)") from None


__all__ = ["BUILTIN", "FORMATS", "Format", "WriteOptions", "alias", "check_lora_output", "convert", "detect_format",
           "get", "load_lora", "outputs", "register", "save_lora"]
