"""LongCat's INT8 weights: recognising, dequantizing and (re)quantizing them.

The official INT8 DiT (`longcat_video/modules/quantization.py`, `--use_int8`) replaces Linear layers
with `QuantizedLinear`: buffers `weight_int8` int8 [out, in] and `weight_scale` float32 [out] (plus
`bias`), and no `weight`. The weight it computes with is `weight_int8 * weight_scale[:, None]`.
Quantization is per output channel (row) and symmetric:

    scale = clamp(absmax of the row in fp32, min=1e-8) / 127
    q     = clamp(round(W / scale[:, None]), -128, 127)      (torch.round: half to even)

Every function here works row by row, so it gives the same answer on any slice of rows as on the
whole matrix (callers may stream row chunks). Pure torch; no model code.
"""

from __future__ import annotations

import torch
from torch import nn

SCALE_MIN = 1e-8  # the official clamp on a row's absmax
QMAX = 127.0


def is_int8_layer(module: nn.Module) -> bool:
    """True when `module` holds an INT8 weight as the official QuantizedLinear does: a 2-D int8
    `weight_int8` [out, in], a 1-D float32 `weight_scale` [out], and no `weight`. Recognised by
    what it holds, not by its class name."""
    if getattr(module, "weight", None) is not None:
        return False
    q = getattr(module, "weight_int8", None)
    s = getattr(module, "weight_scale", None)
    return (isinstance(q, torch.Tensor) and isinstance(s, torch.Tensor)
            and q.dtype == torch.int8 and q.dim() == 2
            and s.dtype == torch.float32 and s.dim() == 1 and s.shape[0] == q.shape[0])


def dequantize(weight_int8: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [out, in] an INT8 layer stands for: `weight_int8 * weight_scale[:, None]`
    (computed in fp32; the layer itself computes in its input's dtype)."""
    return weight_int8.to(torch.float32) * weight_scale.to(torch.float32)[:, None]


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows of `w` [out, in] with the official per-channel symmetric scheme.

    Returns (weight_int8 int8 [out, in], weight_scale float32 [out]). `w` is taken in fp32, as the
    official quantizer does.
    """
    w = w.to(torch.float32)
    scale = w.abs().amax(dim=1).clamp(min=SCALE_MIN) / QMAX
    q = torch.round(w / scale[:, None]).clamp_(-128, 127).to(torch.int8)
    return q, scale


def requant_error(exact: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor
                  ) -> tuple[float, float]:
    """How far an INT8 weight is from the exact fp32 weight it stands for.

    Returns (relative Frobenius error ||dequant - exact|| / ||exact|| (0 when both are zero; inf when
    only `exact` is), worst |element error| in units of that row's quantization step (its scale);
    at most 0.5 for a weight produced by `quantize_rows(exact)`). Computed in float64.
    """
    exact64 = exact.to(torch.float64)
    s64 = weight_scale.to(torch.float32).to(torch.float64)
    err = weight_int8.to(torch.float64) * s64[:, None] - exact64
    num = float(torch.linalg.vector_norm(err))
    den = float(torch.linalg.vector_norm(exact64))
    rel = (0.0 if num == 0.0 else float("inf")) if den == 0.0 else num / den
    steps = float((err.abs() / s64[:, None]).max()) if err.numel() else 0.0
    return rel, steps
