"""LongCat-Video's own LoRA semantics, re-implemented as the parity reference.

This follows the official `LoRANetwork` / `enable_loras` path on a model with the original names: the
native file is read with `safetensors` itself, each LoRA is cast to the model's dtype and device, and
each adapted Linear's forward becomes `org(x) + sum_i (up_i(down_i(x.to(lora dtype))).to(x dtype) *
multiplier_i * alpha_scale_i)`, with the down output split into n chunks (one per up block) and the
results concatenated. It shares no code with the converters or the runtime.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from safetensors.torch import load_file
from torch import nn

PREFIX, SEP = "lora___lorahyphen___", "___lorahyphen___"


class _OfficialLoRA(nn.Module):
    def __init__(self, down: torch.Tensor, ups: list[torch.Tensor], alpha_scale: torch.Tensor, multiplier: float):
        super().__init__()
        self.down, self.ups, self.alpha_scale, self.multiplier = down, ups, alpha_scale, multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lx = x.to(self.down.dtype) @ self.down.T
        if len(self.ups) > 1:
            chunks = torch.chunk(lx, len(self.ups), dim=-1)
            lx = torch.cat([c @ u.T for c, u in zip(chunks, self.ups)], dim=-1)
        else:
            lx = lx @ self.ups[0].T
        return lx


def enable_official_loras(model: nn.Module, loras: list[tuple[str, float]]) -> None:
    """Patch the model's Linear forwards with the official multi-LoRA forward."""
    disable_official_loras(model)
    p = next(model.parameters())
    per_module: dict[str, list[_OfficialLoRA]] = defaultdict(list)
    for path, multiplier in loras:
        sd = load_file(path)
        names = {k.split(".lora_down.weight")[0] for k in sd if k.endswith(".lora_down.weight")}
        for lora_name in names:
            n = sum(1 for k in sd if k.startswith(lora_name + ".lora_up.blocks"))
            ups = ([sd[f"{lora_name}.lora_up.blocks.{i}.weight"] for i in range(n)] if n
                   else [sd[f"{lora_name}.lora_up.weight"]])
            scale = sd.get(f"{lora_name}.alpha_scale", torch.tensor(1.0))
            cast = dict(device=p.device, dtype=p.dtype)  # enable_loras: lora.to(model device, model dtype)
            module_name = lora_name.replace(PREFIX, "").replace(SEP, ".")
            per_module[module_name].append(_OfficialLoRA(sd[f"{lora_name}.lora_down.weight"].to(**cast),
                                                         [u.to(**cast) for u in ups], scale.to(**cast), multiplier))
    for module_name, loras_here in per_module.items():
        module = model.get_submodule(module_name)
        module.org_forward = module.forward

        def forward(x, *args, _m=module, _l=loras_here, **kwargs):
            weight_dtype = x.dtype
            out = _m.org_forward(x, *args, **kwargs)
            total = 0
            for lora in _l:
                total = total + lora(x).to(weight_dtype) * lora.multiplier * lora.alpha_scale
            return out + total

        module.forward = forward


def disable_official_loras(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "org_forward"):
            module.forward = module.org_forward
            del module.org_forward
