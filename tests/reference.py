"""Independent float64 references, written from the spec, sharing no code with longcat_lora.

- `official_delta`: LongCat-Video's own forward, `alpha_scale * blockdiag(ups) @ down`, read with the
  real `safetensors` library.
- `fastvideo_delta`: what FastVideo's LoRAPipeline merges for a file (names normalised, rank from
  lora_A, alpha = int(lora_alpha) or rank, scale 1 when that is 0), mapped back to LongCat rows with the
  spec's table (section 3), spelled out here on purpose as an oracle.
- `peft_delta`, `diffusers_delta`, `kohya_delta` (and `lora_delta`, any format by its keys): the standard
  `alpha / r * B @ A` of the formats with original names, with PEFT's own pattern rule.
- `half_ulp`: how far rounding once to a dtype may move an exact value.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import torch
from safetensors import safe_open

SEP = "___lorahyphen___"

# spec section 3: FastVideo layer suffix -> (LongCat suffix, split index, number of splits)
FASTVIDEO_TO_LONGCAT = {
    "self_attn.to_q": ("attn.qkv", 0, 3),
    "self_attn.to_k": ("attn.qkv", 1, 3),
    "self_attn.to_v": ("attn.qkv", 2, 3),
    "self_attn.to_out": ("attn.proj", 0, 1),
    "cross_attn.to_q": ("cross_attn.q_linear", 0, 1),
    "cross_attn.to_k": ("cross_attn.kv_linear", 0, 2),
    "cross_attn.to_v": ("cross_attn.kv_linear", 1, 2),
    "cross_attn.to_out": ("cross_attn.proj", 0, 1),
    "ffn.w1": ("ffn.w1", 0, 1),
    "ffn.w2": ("ffn.w2", 0, 1),
    "ffn.w3": ("ffn.w3", 0, 1),
    "adaln_linear_1": ("adaLN_modulation.1", 0, 1),
}
FINAL = {"final_layer.adaln_linear": "final_layer.adaLN_modulation.1", "final_layer.proj": "final_layer.linear"}


# ComfyUI-WanVideoWrapper's LongCat model (its wanvideo/modules/model.py and LongCat/layers.py, read for
# issue 18): official module suffix -> the wrapper's layer(s) in row order
WANVIDEO_LAYERS = {
    "blocks.{i}.attn.qkv": ("blocks.{i}.self_attn.q", "blocks.{i}.self_attn.k", "blocks.{i}.self_attn.v"),
    "blocks.{i}.attn.proj": ("blocks.{i}.self_attn.o",),
    "blocks.{i}.cross_attn.q_linear": ("blocks.{i}.cross_attn.q",),
    "blocks.{i}.cross_attn.kv_linear": ("blocks.{i}.cross_attn.k", "blocks.{i}.cross_attn.v"),
    "blocks.{i}.cross_attn.proj": ("blocks.{i}.cross_attn.o",),
    "blocks.{i}.ffn.w1": ("blocks.{i}.ffn.w1",),
    "blocks.{i}.ffn.w2": ("blocks.{i}.ffn.w2",),
    "blocks.{i}.ffn.w3": ("blocks.{i}.ffn.w3",),
    "blocks.{i}.adaLN_modulation.1": ("blocks.{i}.modulation.1",),
    "final_layer.adaLN_modulation.1": ("head.modulation.1",),
    "final_layer.linear": ("head.head",),
    "blocks.{i}.audio_adaLN_modulation.1": ("blocks.{i}.audio_modulation.1",),
    "blocks.{i}.audio_cross_attn.q_linear": ("blocks.{i}.audio_cross_attn.q_linear",),
    "blocks.{i}.audio_cross_attn.kv_linear": ("blocks.{i}.audio_cross_attn.kv_linear",),  # stays fused there
    "blocks.{i}.audio_cross_attn.proj": ("blocks.{i}.audio_cross_attn.proj",),
    "audio_proj.proj1": ("multitalk_audio_proj.proj1",),
    "audio_proj.proj1_vf": ("multitalk_audio_proj.proj1_vf",),
    "audio_proj.proj2": ("multitalk_audio_proj.proj2",),
    "audio_proj.proj3": ("multitalk_audio_proj.proj3",),
}
# the other base tensors (module paths; .weight / .bias appended); None: the wrapper has no such tensor
WANVIDEO_PARAMS = {
    "x_embedder.proj": "patch_embedding",
    "t_embedder.mlp.0": "time_embedding.mlp.0",
    "t_embedder.mlp.2": "time_embedding.mlp.2",
    "y_embedder.y_proj.0": "text_embedding.0",
    "y_embedder.y_proj.2": "text_embedding.2",
    "blocks.{i}.pre_crs_attn_norm": "blocks.{i}.norm3",
    "blocks.{i}.attn.q_norm": "blocks.{i}.self_attn.norm_q",
    "blocks.{i}.attn.k_norm": "blocks.{i}.self_attn.norm_k",
    "blocks.{i}.cross_attn.q_norm": "blocks.{i}.cross_attn.norm_q",
    "blocks.{i}.cross_attn.k_norm": "blocks.{i}.cross_attn.norm_k",
    "blocks.{i}.pre_video_crs_attn_norm": "blocks.{i}.norm_x",
    "blocks.{i}.audio_cross_attn.q_norm": "blocks.{i}.audio_cross_attn.q_norm",
    "blocks.{i}.audio_cross_attn.k_norm": "blocks.{i}.audio_cross_attn.k_norm",
    "blocks.{i}.pre_audio_crs_attn_norm": None,
    "audio_proj.norm": "multitalk_audio_proj.norm",
}


def load(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def official_delta(path: str) -> dict[str, torch.Tensor]:
    """module -> dW (float64) of a native LongCat LoRA file, by the official formula."""
    sd = load(path)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for k, v in sd.items():
        enc, _, name = k.removeprefix("lora" + SEP).partition(".")
        groups[enc.replace(SEP, ".")][name] = v
    out = {}
    for module, t in groups.items():
        down = t["lora_down.weight"].double()
        if "lora_up.weight" in t:
            ups = [t["lora_up.weight"].double()]
        else:
            n = sum(1 for k in t if k.startswith("lora_up.blocks."))
            ups = [t[f"lora_up.blocks.{i}.weight"].double() for i in range(n)]
        scale = float(t["alpha_scale"].double().reshape(())) if "alpha_scale" in t else 1.0
        # the official forward: split the down output into n chunks, chunk i through up i, concat
        chunks = torch.chunk(down, len(ups), dim=0)
        out[module] = scale * torch.cat([u @ c for u, c in zip(ups, chunks)], dim=0)
    return out


def fastvideo_layer_deltas(path: str) -> dict[str, torch.Tensor]:
    """FastVideo layer -> merged dW (float64), following FastVideo's loader semantics."""
    sd = load(path)
    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for k, v in sd.items():
        name = k.removeprefix("diffusion_model.").replace(".weight", "")
        layer, _, role = name.rpartition(".")
        layers[layer][role] = v
    out = {}
    for layer, t in layers.items():
        A, B = t["lora_A"].double(), t["lora_B"].double()
        rank = A.shape[0]
        alpha = int(t["lora_alpha"].item()) if "lora_alpha" in t else rank
        scale = (alpha / rank) if (alpha and rank) else 1.0
        out[layer] = scale * (B @ A)
    return out


def fastvideo_delta(path: str) -> dict[str, torch.Tensor]:
    """module (LongCat naming) -> dW that FastVideo would merge for a FastVideo-form file."""
    rows: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    nsplit: dict[str, int] = {}
    for layer, d in fastvideo_layer_deltas(path).items():
        if layer in FINAL:
            rows[FINAL[layer]][0] = d
            nsplit[FINAL[layer]] = 1
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)$", layer)
        assert m, layer
        target, j, n = FASTVIDEO_TO_LONGCAT[m.group(2)]
        module = f"blocks.{m.group(1)}.{target}"
        rows[module][j] = d
        nsplit[module] = n
    out = {}
    for module, parts in rows.items():
        n = nsplit[module]
        h, w = next(iter(parts.values())).shape
        out[module] = torch.cat([parts.get(j, torch.zeros(h, w, dtype=torch.float64)) for j in range(n)], 0)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = max(a.norm().item(), b.norm().item())
    return 0.0 if denom == 0 else (a - b).norm().item() / denom


def worst(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    assert set(ref) == set(got), (sorted(set(ref) ^ set(got)))[:5]
    return max(rel_err(ref[k], got[k]) for k in ref)


# ------------------------------------------------ the formats with LongCat's original names (spec section 4)

def _peft_pattern(patterns: dict, module: str):
    """PEFT's own rule (peft.utils.other.get_pattern_key): the first key k, in config order, with
    re.match(rf"(.*\\.)?({k})$", module); None if there is none."""
    for k in patterns:
        if re.match(rf"(.*\.)?({k})$", module):
            return patterns[k]
    return None


def _standard_deltas(sd: dict[str, torch.Tensor], prefix: str, a: str, b: str,
                     scale_of) -> dict[str, torch.Tensor]:
    out = {}
    for k in sd:
        if k.startswith(prefix) and k.endswith(a):
            m = k[len(prefix):-len(a)]
            A, B = sd[k].double(), sd[prefix + m + b].double()
            out[m] = scale_of(m, A.shape[0]) * (B @ A)
    return out


def peft_config_scale(config: dict):
    """module, rank -> lora_alpha / r as PEFT resolves it (rank_pattern / alpha_pattern, use_rslora)."""
    def scale(module: str, rank: int) -> float:
        r = _peft_pattern(config.get("rank_pattern") or {}, module)
        r = config.get("r", 8) if r is None else r
        alpha = _peft_pattern(config.get("alpha_pattern") or {}, module)
        alpha = config.get("lora_alpha", 8) if alpha is None else alpha
        assert r == rank, (module, r, rank)  # PEFT would refuse to load the weights
        return alpha / (r ** 0.5 if config.get("use_rslora") else r)

    return scale


def peft_delta(directory: str) -> dict[str, torch.Tensor]:
    """module -> dW of a PEFT adapter directory (adapter_model.safetensors + adapter_config.json)."""
    import json
    import os

    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    sd = load(os.path.join(directory, "adapter_model.safetensors"))
    return _standard_deltas(sd, "base_model.model.", ".lora_A.weight", ".lora_B.weight", peft_config_scale(config))


def diffusers_delta(path: str) -> dict[str, torch.Tensor]:
    """module -> dW of a diffusers LoRA file: config in the `lora_adapter_metadata` metadata (keys
    prefixed `transformer.`); without it diffusers uses alpha = rank."""
    import json

    with safe_open(path, framework="pt") as f:
        meta = (f.metadata() or {}).get("lora_adapter_metadata")
    config = {k.removeprefix("transformer."): v for k, v in json.loads(meta).items()} if meta else None
    scale = peft_config_scale(config) if config else (lambda m, r: 1.0)
    return _standard_deltas(load(path), "transformer.", ".lora_A.weight", ".lora_B.weight", scale)


def _dotted(underscored: str) -> str:
    """kohya's `lora_unet_blocks_0_attn_qkv` -> `blocks.0.attn.qkv`, by matching the official module
    templates written with underscores (no dot is guessed)."""
    name = underscored.removeprefix("lora_unet_")
    templates = list(WANVIDEO_LAYERS) + [t for ts in WANVIDEO_LAYERS.values() for t in ts]
    for t in templates:
        rx = "^" + re.escape(t.replace(".", "_")).replace(re.escape("{i}"), r"(\d+)") + "$"
        m = re.match(rx, name)
        if m:
            return t.format(i=m.group(1)) if m.groups() else t
    return underscored


def diffsynth_delta(path: str) -> dict[str, torch.Tensor]:
    """module -> dW of a DiffSynth-Studio file: `<module>.lora_A[.<adapter>].weight` / `lora_B...`, optional
    `pipe.dit.` / `dit.` prefix, scale alpha / rank with a `<module>.alpha`, else 1."""
    sd = {}
    for k, v in load(path).items():
        for p in ("pipe.dit.", "dit."):
            k = k.removeprefix(p)
        sd[re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", k)] = v

    def scale(m: str, rank: int) -> float:
        return float(sd[m + ".alpha"].double().reshape(())) / rank if m + ".alpha" in sd else 1.0

    return _standard_deltas(sd, "", ".lora_A.weight", ".lora_B.weight", scale)


def kohya_delta(path: str) -> dict[str, torch.Tensor]:
    """module -> dW of a kohya / ComfyUI / Wan2GP file: dW = alpha / rank * up @ down (alpha = rank when
    absent), optional `diffusion_model.` prefix, kohya's `lora_unet_` underscore names; layers named as
    ComfyUI-WanVideoWrapper names them (WANVIDEO_LAYERS) are placed on their rows of the official module."""
    sd = {}
    for k, v in load(path).items():
        k = k.removeprefix("diffusion_model.")
        if k.startswith("lora_unet_"):
            layer, dot, leaf = k.partition(".")
            k = _dotted(layer) + dot + leaf
        sd[k] = v

    def scale(m: str, rank: int) -> float:
        return float(sd[m + ".alpha"].double().reshape(())) / rank if m + ".alpha" in sd else 1.0

    return _place_wanvideo(_standard_deltas(sd, "", ".lora_down.weight", ".lora_up.weight", scale))


def _place_wanvideo(deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer deltas, the wrapper's split layers joined by rows into their official modules (zeros where
    a split is missing); other names as they are."""
    where = {}
    for official, layers in WANVIDEO_LAYERS.items():
        for j, layer in enumerate(layers):
            rx = "^" + re.escape(layer).replace(re.escape("{i}"), r"(\d+)") + "$"
            where[rx] = (official, j, len(layers))
    rows: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    nsplit = {}
    out = {}
    for name, d in deltas.items():
        for rx, (official, j, n) in where.items():
            m = re.match(rx, name)
            if m:
                module = official.format(i=m.group(1)) if m.groups() else official
                rows[module][j] = d
                nsplit[module] = n
                break
        else:
            out[name] = d
    for module, parts in rows.items():
        h, w = next(iter(parts.values())).shape
        out[module] = torch.cat([parts.get(j, torch.zeros(h, w, dtype=torch.float64)) for j in range(nsplit[module])], 0)
    return out


def lora_delta(path: str) -> dict[str, torch.Tensor]:
    """module (LongCat naming) -> dW of a LoRA in any of the five formats, told apart by its keys."""
    import os

    if os.path.isdir(path):
        with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as f:
            if any(k.endswith(".lora_down.weight") for k in f.keys()):  # diffusion-pipe's directories
                return kohya_delta(os.path.join(path, "adapter_model.safetensors"))
        return peft_delta(path)
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    if any(k.startswith("lora" + SEP) for k in keys):
        return official_delta(path)
    if any(k.startswith("transformer.") for k in keys):
        return diffusers_delta(path)
    if any(k.endswith(".lora_down.weight") for k in keys):
        return kohya_delta(path)
    if any(re.search(r"\.lora_[AB]\.[^.]+\.weight$", k) or k.startswith(("pipe.dit.", "dit.")) for k in keys):
        return diffsynth_delta(path)
    return fastvideo_delta(path)


def half_ulp(want: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of `dtype` at each value of the float64 tensor `want`: the most that rounding
    the exact value once to `dtype` may move it (subnormals included)."""
    fi = torch.finfo(dtype)
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}[dtype]
    _, e = torch.frexp(want.abs())  # |want| = m * 2**e, 0.5 <= m < 1
    exp = torch.clamp(e.double() - 1, min=math.log2(fi.smallest_normal))
    return torch.exp2(exp - mant) / 2
