"""LoRA algebra: resize (SVD truncation), combine (sum of LoRAs), extract and plot.

The shared low-rank machinery (rank rules, factored and dense SVDs, the report) is in `lowrank`.
"""

from __future__ import annotations

from .lowrank import ModuleReport, RankRule, Report, dense_svd, factored_svd

_LAZY = {"resize_lora": "resize", "combine_loras": "combine", "extract_lora": "extract", "plot_lora": "plot",
         "plot_resize": "plot"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ModuleReport", "RankRule", "Report", "dense_svd", "factored_svd", *_LAZY]
