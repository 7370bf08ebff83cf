"""longcat-lora: read, validate, convert, apply and merge LongCat-Video LoRA adapters exactly."""

__version__ = "0.1.0"

from .adapter import LoraAdapter, LoraModule, Part  # noqa: E402
from .errors import LoraError  # noqa: E402
from .formats import FORMATS, convert, detect_format, load_lora, save_lora  # noqa: E402

__all__ = ["FORMATS", "LoraAdapter", "LoraError", "LoraModule", "Part", "convert", "detect_format",
           "load_lora", "save_lora", "__version__"]
