"""An independent INT8 layer and quantizer, written from the spec (section 5), sharing no code with
longcat_lora: the parity reference for the runtime on LongCat's INT8 DiT.

- `RefQuantizedLinear`: buffers weight_int8 int8 [out, in], weight_scale float32 [out], bias; no
  `weight`. Forward `w = weight_int8.to(x.dtype) * weight_scale.to(x.dtype)[:, None]`,
  `y = x @ w.T + bias.to(x.dtype)`.
- `ref_quantize`: scale = clamp(row absmax (fp32), min=1e-8) / 127, q = clamp(round(W / scale), -128, 127),
  torch.round rounding half to even.
- `ref_quantize_model`: every nn.Linear replaced except names containing "final_layer.linear".
"""

from __future__ import annotations

import torch
from torch import nn


def ref_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.detach().to(torch.float32)
    absmax = torch.amax(torch.abs(w), dim=1)
    scale = torch.clamp(absmax, min=1e-8) / 127.0
    q = torch.clamp(torch.round(w / scale.unsqueeze(1)), -128, 127).to(torch.int8)
    return q, scale


def ref_dequant64(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The exact value the INT8 weight stands for, in float64."""
    return q.double() * scale.double().unsqueeze(1)


class RefQuantizedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, s = ref_quantize(linear.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", s)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        y = x @ w.T
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


def ref_quantize_model(model: nn.Module, skip: str = "final_layer.linear") -> nn.Module:
    """Replace every nn.Linear except those whose name contains `skip` (in place)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and skip not in n]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, RefQuantizedLinear(getattr(parent, leaf)))
    return model
