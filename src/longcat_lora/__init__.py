"""longcat-lora: read, validate, convert, apply and merge LongCat-Video LoRA adapters exactly.

Reading, writing and converting need no torch import (it costs more than copying a gigabyte); the
runtime and merge functions import it when first used.
"""

__version__ = "0.1.0"

from .model.adapter import LoraAdapter, LoraModule, Part  # noqa: E402
from .errors import LoraError  # noqa: E402
from .formats import FORMATS, convert, detect_format, load_lora, save_lora  # noqa: E402

_LAZY = {
    "apply_lora": "apply.runtime", "set_lora_strength": "apply.runtime", "remove_lora": "apply.runtime",
    "merge_lora": "apply.runtime", "unmerge_lora": "apply.runtime", "active_loras": "apply.runtime",
    "enable_loras": "apply.runtime", "disable_loras": "apply.runtime", "set_adapters": "apply.runtime",
    "list_loras": "apply.runtime",
    "merge_checkpoint": "apply.merge",
    "resize_lora": "algebra.resize", "combine_loras": "algebra.combine", "extract_lora": "algebra.extract",
    "plot_lora": "algebra.plot",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FORMATS", "LoraAdapter", "LoraError", "LoraModule", "Part", "convert", "detect_format",
           "load_lora", "save_lora", "__version__", *_LAZY]
