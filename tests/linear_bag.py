"""A torch model with every LoRA-targetable Linear of a LongCat DiT under its original name.

Used to load converted adapters with real PEFT and diffusers and compare each layer's output with the
native LoRA reference. (The full reference DiT lives in longcat_lora.dit.)
"""

from __future__ import annotations

import torch
from torch import nn

from longcat_lora.model.naming import DitDims


def _linear(i: int, o: int, bias: bool = True) -> nn.Linear:
    return nn.Linear(i, o, bias=bias)


class _Attn(nn.Module):
    def __init__(self, d: DitDims):
        super().__init__()
        self.qkv, self.proj = _linear(d.hidden, 3 * d.hidden), _linear(d.hidden, d.hidden)


class _Cross(nn.Module):
    def __init__(self, d: DitDims):
        super().__init__()
        self.q_linear = _linear(d.hidden, d.hidden)
        self.kv_linear = _linear(d.hidden, 2 * d.hidden)
        self.proj = _linear(d.hidden, d.hidden)


class _FFN(nn.Module):
    def __init__(self, d: DitDims):
        super().__init__()
        self.w1 = _linear(d.hidden, d.ffn, False)
        self.w2 = _linear(d.ffn, d.hidden, False)
        self.w3 = _linear(d.hidden, d.ffn, False)


class _Block(nn.Module):
    def __init__(self, d: DitDims):
        super().__init__()
        self.attn, self.cross_attn, self.ffn = _Attn(d), _Cross(d), _FFN(d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _linear(d.adaln, 6 * d.hidden))


class _Final(nn.Module):
    def __init__(self, d: DitDims):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _linear(d.adaln, 2 * d.hidden))
        self.linear = _linear(d.hidden, d.final_out)


class LinearBag(nn.Module):
    def __init__(self, d: DitDims):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(d) for _ in range(d.depth)])
        self.final_layer = _Final(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # not used: tests call layers directly
        return x

