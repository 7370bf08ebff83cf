"""LoRA files in the key forms the ecosystem's trainers write, made from a native LongCat LoRA (test and
demo scaffolding, not the product).

Each writer reads a native file with the real `safetensors` library and writes the same weight change
the way that producer's own save code lays it out (checked against their code for issue 18):

- `diffsynth`: DiffSynth-Studio's LongCat-Video trainer: PEFT layers with the `pipe.dit.` prefix removed,
  `<module>.lora_A.default.weight` [n*r, in] / `lora_B.default.weight` [out, n*r] (a fused module is one
  LoRA with a block-diagonal up), no alpha (scale 1: the native alpha_scale is folded into lora_B),
  metadata {"format": "pt"}.
- `musubi`: musubi-tuner's LongCat trainer (kohya's networks/lora.py save): `lora_unet_<module with _>`
  `.lora_down.weight` / `.lora_up.weight` / `.alpha` (alpha = alpha_scale * n * r), every tensor in the
  file's dtype, `ss_*` and `modelspec.*` metadata.
- `diffusion_pipe`: diffusion-pipe's LongCat trainer: the wrapper's Wan-style names, q/k/v (and k/v) each
  with the whole down matrix and its rows of the up matrix, `alpha` = rank (scale 1: alpha_scale folded
  into the ups), in a PEFT-like directory (`adapter_model.safetensors` + `adapter_config.json`).

The folds multiply by alpha_scale in float64 and store the file's dtype: exact when alpha_scale is a power
of two (the published files' 0.5).
"""

from __future__ import annotations

import json
import os

import torch

from ..model import naming

SEP = "___lorahyphen___"


def _native(path: str) -> dict[str, tuple[torch.Tensor, list[torch.Tensor], float]]:
    """module -> (down, up blocks, alpha_scale) of a native file."""
    from safetensors import safe_open

    groups: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            enc, _, name = k.removeprefix("lora" + SEP).partition(".")
            groups.setdefault(enc.replace(SEP, "."), {})[name] = f.get_tensor(k)
    out = {}
    for m, t in groups.items():
        if "lora_up.weight" in t:
            ups = [t["lora_up.weight"]]
        else:
            ups = [t[f"lora_up.blocks.{i}.weight"] for i in range(sum(k.startswith("lora_up.blocks.") for k in t))]
        out[m] = (t["lora_down.weight"], ups, float(t["alpha_scale"].double()) if "alpha_scale" in t else 1.0)
    return out


def _blockdiag(ups: list[torch.Tensor]) -> torch.Tensor:
    return torch.block_diag(*ups) if len(ups) > 1 else ups[0]


def _folded(t: torch.Tensor, scale: float) -> torch.Tensor:
    return (t.double() * scale).to(t.dtype)


def diffsynth(native: str, out: str, prefix: str = "", adapter: str | None = "default") -> str:
    from safetensors.torch import save_file

    seg = f".{adapter}" if adapter else ""
    sd = {}
    for m, (down, ups, scale) in _native(native).items():
        sd[f"{prefix}{m}.lora_A{seg}.weight"] = down.contiguous()
        sd[f"{prefix}{m}.lora_B{seg}.weight"] = _folded(_blockdiag(ups), scale).contiguous()
    save_file(sd, out, metadata={"format": "pt"})
    return out


def musubi(native: str, out: str) -> str:
    from safetensors.torch import save_file

    sd = {}
    dims = set()
    for m, (down, ups, scale) in _native(native).items():
        key = "lora_unet_" + m.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = down.contiguous()
        sd[f"{key}.lora_up.weight"] = _blockdiag(ups).contiguous()
        sd[f"{key}.alpha"] = torch.tensor(scale * down.shape[0], dtype=down.dtype)
        dims.add(down.shape[0])
    meta = {"ss_network_module": "networks.lora_longcat", "ss_network_dim": str(max(dims)),
            "ss_base_model_version": "longcat_video", "modelspec.architecture": "LongCat-Video/lora",
            "modelspec.implementation": "https://github.com/meituan-longcat/LongCat-Video"}
    save_file(sd, out, metadata=meta)
    return out


def diffusion_pipe(native: str, out_dir: str) -> str:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    sd = {}
    rank = 0
    for m, (down, ups, scale) in _native(native).items():
        layers = naming.layers(m, naming.Scheme.WANVIDEO)
        if layers is None:
            raise ValueError(f"{m}: no Wan-style name")
        up = _folded(_blockdiag(ups), scale)
        h = up.shape[0] // len(layers)
        for j, layer in enumerate(layers):
            key = f"diffusion_model.{layer}"
            sd[f"{key}.lora_down.weight"] = down.clone()
            sd[f"{key}.lora_up.weight"] = up[j * h:(j + 1) * h].contiguous()
            sd[f"{key}.alpha"] = torch.tensor(float(down.shape[0]), dtype=down.dtype)
        rank = max(rank, down.shape[0])
    save_file(sd, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["LongCatSingleStreamBlock"]}, f)
    return out_dir


__all__ = ["diffsynth", "musubi", "diffusion_pipe"]
