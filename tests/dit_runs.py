"""Running the reference DiT in tests: one small fixed batch, a no-grad forward, the official LoRA forward.

    runs = DitRuns(lambda: dit_batch(CFG))
    runs.run(model)                    # our forward
    runs.official(model, specs)        # the same with the official LoRANetwork semantics enabled, then disabled
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from longcat_lora.testing.official import disable_official_loras, enable_official_loras


def dit_batch(cfg, seed: int = 0) -> tuple:
    """Two samples (x, t, y, mask) of the small shape every runtime test uses; the second has padded text."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, 2, 4, 4, generator=g)
    t = torch.tensor([800.0, 150.0])
    y = torch.randn(2, 1, 6, cfg.caption_channels, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    return x, t, y, mask


class DitRuns:
    """Forwards of a model on the batch `make()` returns."""

    def __init__(self, make: Callable[[], tuple]):
        self.inputs = make

    def run(self, model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(*self.inputs())

    def official(self, model: torch.nn.Module, specs) -> torch.Tensor:
        enable_official_loras(model, specs)
        try:
            return self.run(model)
        finally:
            disable_official_loras(model)
