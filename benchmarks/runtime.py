"""Unmerged LoRA forward overhead against the base Linear, at LongCat sizes.

attn.qkv: 4096 -> 12288, a native LoRA with 3 up blocks of rank 128 (down [384, 4096]), 4096 tokens,
fp32 on the CPU. Times (median of interleaved repeats, same run): the base Linear; the Linear with
`apply_lora` (one down product, one in-place addmm per up block); and the official formulation
(down, chunk, per-block up, concatenate, cast, scale, add). Overheads are relative to the base; the
ideal is the FLOP ratio, 6.25% here. Then the same on LongCat's INT8 layer (the layer quantized with the
official per-channel scheme: weight_int8 + weight_scale, no weight): the INT8 layer alone, with
`apply_lora`, and with the official LoRA form around it, and the ratio of the two overheads.
Usage: python benchmarks/runtime.py [--tokens 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import longcat_lora as L
from longcat_lora.model.adapter import LoraAdapter, LoraModule, Part
from longcat_lora.model.sources import TensorSource


def official_forward(base: nn.Linear, down: torch.Tensor, ups: list[torch.Tensor], scale: float, x: torch.Tensor):
    out = base(x)
    lx = x.to(down.dtype) @ down.T
    chunks = torch.chunk(lx, len(ups), dim=-1)
    lx = torch.cat([c @ u.T for c, u in zip(chunks, ups)], dim=-1)
    return out + lx.to(x.dtype) * 1.0 * scale


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    d, n, r = 4096, 3, 128
    layer = nn.Linear(d, n * d)
    down = torch.randn(n * r, d) * d ** -0.5
    ups = [torch.randn(d, r) * 0.02 for _ in range(n)]
    x = torch.randn(args.tokens, d)
    parts = [Part((i * d, (i + 1) * d), TensorSource(down[i * r:(i + 1) * r]), TensorSource(ups[i]), 0.5)
             for i in range(n)]
    adapter = LoraAdapter({"qkv": LoraModule("qkv", n * d, d, parts)})
    model = nn.Module()
    model.qkv = layer
    lora_layer = nn.Module()
    lora_layer.qkv = nn.Linear(d, n * d)
    lora_layer.qkv.load_state_dict(layer.state_dict())
    L.apply_lora(lora_layer, adapter, 1.0)

    with torch.no_grad():
        ref = official_forward(layer, down, ups, 0.5, x)
        got = lora_layer.qkv(x)
        err = float((ref - got).norm() / ref.norm())
        fns = {"base": lambda: layer(x), "ours": lambda: lora_layer.qkv(x),
               "official": lambda: official_forward(layer, down, ups, 0.5, x)}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for f in fns.values():
            f()  # warm up
        for _ in range(args.repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    flops_base = 2 * args.tokens * d * n * d
    flops_lora = 2 * args.tokens * (d * n * r + n * r * d)
    ideal = flops_lora / flops_base
    print(f"qkv {d}->{n * d}, rank {r} x {n} blocks, {args.tokens} tokens, fp32, {torch.get_num_threads()} threads")
    print(f"base Linear        {med['base'] * 1e3:8.1f} ms")
    for k in ("ours", "official"):
        over = med[k] / med["base"] - 1
        print(f"{k:18s} {med[k] * 1e3:8.1f} ms  overhead {over * 100:5.2f}%  ({over / ideal:.2f}x the FLOP ratio)")
    print(f"ideal FLOP ratio   {ideal * 100:.2f}%   (target: ours within 1.5x = {1.5 * ideal * 100:.2f}%)")
    print(f"ours vs official output: relative difference {err:.1e}")
    int8_section(layer, down, ups, x, args.repeats)


def int8_section(layer: nn.Linear, down: torch.Tensor, ups: list[torch.Tensor], x: torch.Tensor,
                 repeats: int) -> None:
    """apply_lora's overhead on an INT8 layer against the official LoRA form on the same layer."""
    from longcat_lora.testing.dit import QuantizedLinear

    n, d, r = len(ups), layer.in_features, ups[0].shape[1]
    q = QuantizedLinear.from_linear(layer)
    parts = [Part((i * d, (i + 1) * d), TensorSource(down[i * r:(i + 1) * r]), TensorSource(ups[i]), 0.5)
             for i in range(n)]
    model = nn.Module()
    model.qkv = QuantizedLinear.from_linear(layer)  # no float parameters: the LoRA lives in fp32, as x
    L.apply_lora(model, LoraAdapter({"qkv": LoraModule("qkv", n * d, d, parts)}), 1.0)
    with torch.no_grad():
        ref = official_forward(q, down, ups, 0.5, x)
        err = float((ref - model.qkv(x)).norm() / ref.norm())
        fns = {"base": lambda: q(x), "ours": lambda: model.qkv(x),
               "official": lambda: official_forward(q, down, ups, 0.5, x)}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    over = {k: med[k] / med["base"] - 1 for k in ("ours", "official")}
    print(f"\nINT8 layer (weight_int8 + weight_scale) {d}->{n * d}, rank {r} x {n} blocks, {x.shape[0]} tokens, "
          f"fp32 compute")
    print(f"INT8 layer alone   {med['base'] * 1e3:8.1f} ms")
    for k in ("ours", "official"):
        print(f"{k:18s} {med[k] * 1e3:8.1f} ms  overhead {over[k] * 100:5.2f}%")
    print(f"ours / official: time {med['ours'] / med['official']:.3f}, overhead "
          f"{over['ours'] / over['official']:.2f}x the official's" if over["official"] > 0 else
          f"ours / official: time {med['ours'] / med['official']:.3f}")
    print(f"ours vs official output on the INT8 layer: relative difference {err:.1e}")


if __name__ == "__main__":
    main()
