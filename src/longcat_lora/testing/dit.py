"""A reference LongCat-Video DiT in plain PyTorch, in both namings, for parity tests and small inference.

`LongCatDiT` follows the official `LongCatVideoTransformer3DModel` forward (single-stream blocks: AdaLN
modulation computed in fp32, fp32 LayerNorms, RMSNorm q/k norms, 3D RoPE, text cross-attention with
per-sample valid lengths, SwiGLU FFN, fp32 final layer) with the official module names and parameter
layout, so an official checkpoint's state_dict loads at any size. `LongCatDiTSplit` is the same network
with FastVideo's split names (to_q/to_k/to_v, adaln_linear_1, ...). `convert_state_dict` moves weights
between the two through the one naming table. Attention runs through torch SDPA (CPU friendly).

Not covered: context parallelism, block-sparse attention, KV caches and conditioning latents.

One module on purpose (about 600 lines): it is one network. The Avatar variant (audio blocks) and the INT8
variant (`QuantizedLinear`, `quantize_dit`) subclass or wrap its blocks, and a parity test reads best when
the whole reference forward is in one place beside the official code it mirrors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model import naming


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 4096
    depth: int = 48
    num_heads: int = 32
    caption_channels: int = 4096
    mlp_ratio: int = 4
    adaln_tembed_dim: int = 512
    frequency_embedding_size: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    ffn_multiple_of: int = 256  # SwiGLU width rounding (the official value; smaller for tiny models)

    @property
    def ffn_dim(self) -> int:
        h = int(2 * self.hidden_size * self.mlp_ratio / 3)
        m = self.ffn_multiple_of
        return m * ((h + m - 1) // m)

    @property
    def dims(self) -> naming.DitDims:
        return naming.DitDims(hidden=self.hidden_size, ffn=self.ffn_dim, adaln=self.adaln_tembed_dim,
                              final_out=math.prod(self.patch_size) * self.out_channels, depth=self.depth)


TINY = DiTConfig(in_channels=4, out_channels=4, hidden_size=64, depth=48, num_heads=4, caption_channels=32,
                 adaln_tembed_dim=32, frequency_embedding_size=32, ffn_multiple_of=16)


# ----------------------------------------------------------------------------- shared pieces

class RMSNormFP32(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return out * self.weight.to(out.dtype)


class LayerNormFP32(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def modulate_fp32(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    x = norm(x.to(torch.float32))
    return (x * (scale + 1.0) + shift).to(dtype)


def fp32_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Linear the official code runs under autocast(fp32): here its weights stay fp32 (see `cast`),
    and the layer's own forward runs so that LoRA hooks on it apply. An INT8 layer (no `weight`)
    computes in fp32, as under the official autocast."""
    w = getattr(layer, "weight", None)
    return layer(x.to(w.dtype if isinstance(w, torch.Tensor) else torch.float32)).float()


def rope_freqs(head_dim: int, grid: tuple[int, int, int], base: float = 10000.0) -> torch.Tensor:
    """3D RoPE angles [T*H*W, head_dim] (time gets the remainder, height and width 2*(d//6) each)."""
    T, H, W = grid
    dim_t = head_dim - 4 * (head_dim // 6)
    dim_h = dim_w = 2 * (head_dim // 6)

    def axis(n: int, dim: int) -> torch.Tensor:
        inv = 1.0 / (base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        f = torch.arange(n, dtype=torch.float32)[:, None] * inv[None]
        return f.repeat_interleave(2, dim=-1)  # (n, dim), each frequency twice

    ft, fh, fw = axis(T, dim_t), axis(H, dim_h), axis(W, dim_w)
    f = torch.cat([ft[:, None, None].expand(T, H, W, dim_t), fh[None, :, None].expand(T, H, W, dim_h),
                   fw[None, None, :].expand(T, H, W, dim_w)], dim=-1)
    return f.reshape(T * H * W, head_dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x = x.unflatten(-1, (-1, 2))
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


def apply_rope(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = freqs.cos()[None, None], freqs.sin()[None, None]
    qf, kf = q.float(), k.float()
    return (qf * cos + _rotate_half(qf) * sin).type_as(q), (kf * cos + _rotate_half(kf) * sin).type_as(k)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


# ----------------------------------------------------------------------------- blocks, both namings

class _BlockBase(nn.Module):
    """The official single-stream block; subclasses only name the layers."""

    def __init__(self, c: DiTConfig):
        super().__init__()
        self.heads, self.head_dim = c.num_heads, c.hidden_size // c.num_heads
        if self.head_dim % 8:
            raise ValueError("head dim must be a multiple of 8 for 3D RoPE")

    # layer accessors, overridden per naming
    def modulation(self, t): raise NotImplementedError  # noqa: E704
    def self_qkv(self, x): raise NotImplementedError  # noqa: E704
    def self_out(self, x): raise NotImplementedError  # noqa: E704
    def cross_q(self, x): raise NotImplementedError  # noqa: E704
    def cross_kv(self, y): raise NotImplementedError  # noqa: E704
    def cross_out(self, x): raise NotImplementedError  # noqa: E704

    def forward(self, x, y, t, y_seqlens: list[int], grid: tuple[int, int, int], freqs: torch.Tensor):
        B, N, C = x.shape
        T = grid[0]
        dtype = x.dtype
        mod = self.modulation(t).unsqueeze(2)  # fp32 [B, T, 1, 6C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)

        xm = modulate_fp32(self.norm_a, x.view(B, T, -1, C), shift_msa, scale_msa).view(B, N, C)
        q, k, v = self.self_qkv(xm)  # each [B, N, C]
        q, k, v = (z.view(B, N, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        q, k = self.q_norm_s(q), self.k_norm_s(k)
        q, k = apply_rope(q, k, freqs)
        a = _attend(q, k, v).transpose(1, 2).reshape(B, N, C)
        xs = self.self_out(a)
        x = (x.float() + (gate_msa * xs.view(B, T, -1, C).float()).view(B, N, C)).to(dtype)

        x = x + self._cross(self.norm_cross_(x), y, y_seqlens)

        xm = modulate_fp32(self.norm_f, x.view(B, T, -1, C), shift_mlp, scale_mlp).view(B, N, C)
        xs = self.ffn(xm)
        return (x.float() + (gate_mlp * xs.view(B, T, -1, C).float()).view(B, N, C)).to(dtype)

    def _cross(self, x: torch.Tensor, y: torch.Tensor, y_seqlens: list[int]) -> torch.Tensor:
        B, N, C = x.shape
        q = self.cross_q(x).view(B, N, self.heads, self.head_dim)
        k, v = self.cross_kv(y)  # each [B, L, C]
        L = y.shape[1]
        k = k.view(B, L, self.heads, self.head_dim)
        v = v.view(B, L, self.heads, self.head_dim)
        q, k = self.q_norm_c(q), self.k_norm_c(k)
        outs = []
        for b in range(B):  # each sample attends to its own valid text tokens
            n = y_seqlens[b]
            outs.append(_attend(q[b:b + 1].transpose(1, 2), k[b:b + 1, :n].transpose(1, 2),
                                v[b:b + 1, :n].transpose(1, 2)).transpose(1, 2))
        return self.cross_out(torch.cat(outs, 0).reshape(B, N, C))


class _Attn(nn.Module):
    def __init__(self, c: DiTConfig):
        super().__init__()
        hd = c.hidden_size // c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.q_norm, self.k_norm = RMSNormFP32(hd), RMSNormFP32(hd)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)


class _Cross(nn.Module):
    """Cross-attention projections; `kv_in` is the context width (text: hidden; audio: audio_dim)."""

    def __init__(self, c: DiTConfig, kv_in: int | None = None):
        super().__init__()
        hd = c.hidden_size // c.num_heads
        self.q_linear = nn.Linear(c.hidden_size, c.hidden_size)
        self.kv_linear = nn.Linear(kv_in or c.hidden_size, 2 * c.hidden_size)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.q_norm, self.k_norm = RMSNormFP32(hd), RMSNormFP32(hd)


class Block(_BlockBase):
    """Official naming: attn.qkv (fused), cross_attn.kv_linear (fused), adaLN_modulation.1."""

    def __init__(self, c: DiTConfig):
        super().__init__(c)
        C = c.hidden_size
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.adaln_tembed_dim, 6 * C))
        self.mod_norm_attn = LayerNormFP32(C, eps=1e-6, elementwise_affine=False)
        self.mod_norm_ffn = LayerNormFP32(C, eps=1e-6, elementwise_affine=False)
        self.pre_crs_attn_norm = LayerNormFP32(C, eps=1e-6, elementwise_affine=True)
        self.attn, self.cross_attn = _Attn(c), _Cross(c)
        self.ffn = SwiGLU(C, c.ffn_dim)

    norm_a = property(lambda s: s.mod_norm_attn)
    norm_f = property(lambda s: s.mod_norm_ffn)
    norm_cross_ = property(lambda s: s.pre_crs_attn_norm)
    q_norm_s = property(lambda s: s.attn.q_norm)
    k_norm_s = property(lambda s: s.attn.k_norm)
    q_norm_c = property(lambda s: s.cross_attn.q_norm)
    k_norm_c = property(lambda s: s.cross_attn.k_norm)

    def modulation(self, t):
        return fp32_linear(self.adaLN_modulation[1], F.silu(t.float()))

    def self_qkv(self, x):
        return self.attn.qkv(x).chunk(3, dim=-1)

    def self_out(self, x):
        return self.attn.proj(x)

    def cross_q(self, x):
        return self.cross_attn.q_linear(x)

    def cross_kv(self, y):
        return self.cross_attn.kv_linear(y).chunk(2, dim=-1)

    def cross_out(self, x):
        return self.cross_attn.proj(x)


class _SelfSplit(nn.Module):
    def __init__(self, c: DiTConfig):
        super().__init__()
        C, hd = c.hidden_size, c.hidden_size // c.num_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.to_out = nn.Linear(C, C)
        self.q_norm, self.k_norm = RMSNormFP32(hd), RMSNormFP32(hd)


class _CrossSplit(_SelfSplit):
    pass


class BlockSplit(_BlockBase):
    """FastVideo naming: self_attn.to_q/to_k/to_v/to_out, cross_attn.to_*, adaln_linear_1."""

    def __init__(self, c: DiTConfig):
        super().__init__(c)
        C = c.hidden_size
        self.adaln_linear_1 = nn.Linear(c.adaln_tembed_dim, 6 * C)
        self.norm_attn = LayerNormFP32(C, eps=1e-6, elementwise_affine=False)
        self.norm_ffn = LayerNormFP32(C, eps=1e-6, elementwise_affine=False)
        self.norm_cross = LayerNormFP32(C, eps=1e-6, elementwise_affine=True)
        self.self_attn, self.cross_attn = _SelfSplit(c), _CrossSplit(c)
        self.ffn = SwiGLU(C, c.ffn_dim)

    norm_a = property(lambda s: s.norm_attn)
    norm_f = property(lambda s: s.norm_ffn)
    norm_cross_ = property(lambda s: s.norm_cross)
    q_norm_s = property(lambda s: s.self_attn.q_norm)
    k_norm_s = property(lambda s: s.self_attn.k_norm)
    q_norm_c = property(lambda s: s.cross_attn.q_norm)
    k_norm_c = property(lambda s: s.cross_attn.k_norm)

    def modulation(self, t):
        return fp32_linear(self.adaln_linear_1, F.silu(t.float()))

    def self_qkv(self, x):
        a = self.self_attn
        return a.to_q(x), a.to_k(x), a.to_v(x)

    def self_out(self, x):
        return self.self_attn.to_out(x)

    def cross_q(self, x):
        return self.cross_attn.to_q(x)

    def cross_kv(self, y):
        return self.cross_attn.to_k(y), self.cross_attn.to_v(y)

    def cross_out(self, x):
        return self.cross_attn.to_out(x)


# ----------------------------------------------------------------------------- whole models

class _DiTBase(nn.Module):
    """Shared forward: embed, run the blocks, final layer in fp32, unpatchify."""

    dit_config: DiTConfig  # not `config`: diffusers models use that name

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [B, C, T, H, W]; timestep [B] or [B, T]; encoder_hidden_states [B, 1, L, Cc];
        encoder_attention_mask [B, L] (1 = valid). Returns [B, C_out, T, H, W] in float32."""
        c = self.dit_config
        dtype = self.patch.weight.dtype
        B, _, T, H, W = hidden_states.shape
        pt, ph, pw = c.patch_size
        grid = (T // pt, H // ph, W // pw)
        if timestep.dim() == 1:
            timestep = timestep[:, None].expand(-1, grid[0])
        x = self.patch(hidden_states.to(dtype)).flatten(2).transpose(1, 2)  # [B, N, C]
        tf = timestep_embedding(timestep.float().flatten(), c.frequency_embedding_size)
        t = fp32_linear(self.t_lin2, F.silu(fp32_linear(self.t_lin1, tf))).reshape(B, grid[0], -1)
        y = self.y_lin2(F.gelu(self.y_lin1(encoder_hidden_states.to(dtype)), approximate="tanh")).squeeze(1)
        if encoder_attention_mask is not None:
            seqlens = encoder_attention_mask.reshape(B, -1).sum(1).to(torch.int64).tolist()
        else:
            seqlens = [y.shape[1]] * B
        freqs = rope_freqs(c.hidden_size // c.num_heads, grid)
        for block in self.blocks:
            x = block(x, y, t, seqlens, grid, freqs)
        mod = fp32_linear(self.final_adaln, F.silu(t.float())).unsqueeze(2)
        shift, scale = mod.chunk(2, dim=-1)
        N, C = x.shape[1], x.shape[2]
        x = modulate_fp32(self.final_norm, x.view(B, grid[0], -1, C), shift, scale).view(B, N, C)
        x = fp32_linear(self.final_proj, x)
        return self._unpatchify(x, grid).float()

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        c = self.dit_config
        pt, ph, pw = c.patch_size
        Nt, Nh, Nw = grid
        B = x.shape[0]
        x = x.view(B, Nt, Nh, Nw, pt, ph, pw, c.out_channels)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, c.out_channels, Nt * pt, Nh * ph, Nw * pw)

    def cast(self, dtype: torch.dtype) -> _DiTBase:
        """Cast to dtype, keeping the modulation, timestep and final layers in fp32 as the official code
        computes them."""
        self.to(dtype)
        for m in self._fp32_modules():
            m.to(torch.float32)
        return self


class LongCatDiT(_DiTBase):
    """The official LongCatVideoTransformer3DModel layout and names."""

    def __init__(self, config: DiTConfig = DiTConfig()):
        super().__init__()
        c = self.dit_config = config
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv3d(c.in_channels, c.hidden_size, c.patch_size, c.patch_size)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(c.frequency_embedding_size, c.adaln_tembed_dim), nn.SiLU(),
                                            nn.Linear(c.adaln_tembed_dim, c.adaln_tembed_dim))
        self.y_embedder = nn.Module()
        self.y_embedder.y_proj = nn.Sequential(nn.Linear(c.caption_channels, c.hidden_size), nn.GELU("tanh"),
                                               nn.Linear(c.hidden_size, c.hidden_size))
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.depth)])
        self.final_layer = nn.Module()
        self.final_layer.norm_final = LayerNormFP32(c.hidden_size, eps=1e-6, elementwise_affine=False)
        self.final_layer.linear = nn.Linear(c.hidden_size, math.prod(c.patch_size) * c.out_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.adaln_tembed_dim, 2 * c.hidden_size))

    patch = property(lambda s: s.x_embedder.proj)
    t_lin1 = property(lambda s: s.t_embedder.mlp[0])
    t_lin2 = property(lambda s: s.t_embedder.mlp[2])
    y_lin1 = property(lambda s: s.y_embedder.y_proj[0])
    y_lin2 = property(lambda s: s.y_embedder.y_proj[2])
    final_adaln = property(lambda s: s.final_layer.adaLN_modulation[1])
    final_norm = property(lambda s: s.final_layer.norm_final)
    final_proj = property(lambda s: s.final_layer.linear)

    def _fp32_modules(self):
        return [self.t_embedder, self.final_layer] + [b.adaLN_modulation for b in self.blocks]


class LongCatDiTSplit(_DiTBase):
    """The same network with FastVideo's names and split projections."""

    def __init__(self, config: DiTConfig = DiTConfig()):
        super().__init__()
        c = self.dit_config = config
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(c.in_channels, c.hidden_size, c.patch_size, c.patch_size)
        self.time_embedder = nn.Module()
        self.time_embedder.linear_1 = nn.Linear(c.frequency_embedding_size, c.adaln_tembed_dim)
        self.time_embedder.linear_2 = nn.Linear(c.adaln_tembed_dim, c.adaln_tembed_dim)
        self.caption_embedder = nn.Module()
        self.caption_embedder.linear_1 = nn.Linear(c.caption_channels, c.hidden_size)
        self.caption_embedder.linear_2 = nn.Linear(c.hidden_size, c.hidden_size)
        self.blocks = nn.ModuleList([BlockSplit(c) for _ in range(c.depth)])
        self.final_layer = nn.Module()
        self.final_layer.norm = LayerNormFP32(c.hidden_size, eps=1e-6, elementwise_affine=False)
        self.final_layer.proj = nn.Linear(c.hidden_size, math.prod(c.patch_size) * c.out_channels)
        self.final_layer.adaln_linear = nn.Linear(c.adaln_tembed_dim, 2 * c.hidden_size)

    patch = property(lambda s: s.patch_embed.proj)
    t_lin1 = property(lambda s: s.time_embedder.linear_1)
    t_lin2 = property(lambda s: s.time_embedder.linear_2)
    y_lin1 = property(lambda s: s.caption_embedder.linear_1)
    y_lin2 = property(lambda s: s.caption_embedder.linear_2)
    final_adaln = property(lambda s: s.final_layer.adaln_linear)
    final_norm = property(lambda s: s.final_layer.norm)
    final_proj = property(lambda s: s.final_layer.proj)

    def _fp32_modules(self):
        return [self.time_embedder, self.final_layer] + [b.adaln_linear_1 for b in self.blocks]


def convert_state_dict(sd: dict[str, torch.Tensor], to: str) -> dict[str, torch.Tensor]:
    """Base weights LongCat <-> FastVideo naming (fused projections split by rows, or re-fused)."""
    if to == "fastvideo":
        out = {}
        for name, t in sd.items():
            targets = naming.param_to(name, naming.Scheme.FASTVIDEO)
            if targets is None:
                raise ValueError(f"{name}: FastVideo's naming has no such tensor")
            n = len(targets)
            for new, j, _ in targets:
                out[new] = t.chunk(n, dim=0)[j].clone() if n > 1 else t
        return out
    if to == "longcat":
        pieces: dict[str, dict[int, torch.Tensor]] = {}
        counts: dict[str, int] = {}
        for name, t in sd.items():
            new, j, n = naming.param_from(name)
            pieces.setdefault(new, {})[j] = t
            counts[new] = n
        out = {}
        for new, parts in pieces.items():
            if len(parts) != counts[new]:
                raise ValueError(f"{new}: {len(parts)} of {counts[new]} split parts present")
            out[new] = torch.cat([parts[j] for j in range(counts[new])], 0) if counts[new] > 1 else parts[0]
        return out
    raise ValueError(f"unknown naming {to!r}")


# ----------------------------------------------------------------------------- LongCat-Video-Avatar

@dataclass(frozen=True)
class AvatarConfig(DiTConfig):
    """LongCat-Video-Avatar's DiT: the base config plus the audio path's sizes (AudioProjModel defaults)."""

    audio_dim: int = 768  # output_dim: audio tokens' width, audio_cross_attn.kv_linear input
    audio_window: int = 5
    audio_vae_scale: int = 4
    audio_blocks: int = 12
    audio_channels: int = 768
    audio_intermediate: int = 512
    audio_context_tokens: int = 32

    @property
    def dims(self) -> naming.DitDims:
        base = super().dims
        return naming.DitDims(
            hidden=base.hidden, ffn=base.ffn, adaln=base.adaln, final_out=base.final_out, depth=base.depth,
            audio=self.audio_dim, audio_proj_in=self.audio_window * self.audio_blocks * self.audio_channels,
            audio_proj_vf_in=(self.audio_window + self.audio_vae_scale - 1) * self.audio_blocks * self.audio_channels,
            audio_inter=self.audio_intermediate, audio_proj_out=self.audio_context_tokens * self.audio_dim)


TINY_AVATAR = AvatarConfig(**{f: getattr(TINY, f) for f in DiTConfig.__dataclass_fields__}, audio_dim=24,
                           audio_window=2, audio_vae_scale=2, audio_blocks=2, audio_channels=6,
                           audio_intermediate=16, audio_context_tokens=4)


class AvatarBlock(Block):
    """The official block plus audio cross-attention, gated and modulated by audio_adaLN_modulation.

    The audio Linear layers have the official names and shapes; the audio path around them is a simple
    faithful-in-shape stand-in: each latent frame's tokens attend to that frame's audio tokens, and the
    result is added to x through the gate. The model sets `audio_tokens` [B, T, tokens, audio_dim]
    for the duration of its forward."""

    def __init__(self, c: AvatarConfig):
        super().__init__(c)
        C = c.hidden_size
        self.audio_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.adaln_tembed_dim, 3 * C))
        self.audio_norm = LayerNormFP32(C, eps=1e-6, elementwise_affine=False)
        self.audio_cross_attn = _Cross(c, kv_in=c.audio_dim)
        self.audio_tokens: torch.Tensor | None = None

    def forward(self, x, y, t, y_seqlens, grid, freqs):
        x = super().forward(x, y, t, y_seqlens, grid, freqs)
        B, N, C = x.shape
        T = grid[0]
        mod = fp32_linear(self.audio_adaLN_modulation[1], F.silu(t.float())).unsqueeze(2)  # [B, T, 1, 3C]
        shift, scale, gate = mod.chunk(3, dim=-1)
        xm = modulate_fp32(self.audio_norm, x.view(B, T, -1, C), shift, scale)  # [B, T, N/T, C]
        a = self.audio_cross_attn
        audio = self.audio_tokens  # [B, T, L, audio_dim]
        L = audio.shape[2]
        q = a.q_linear(xm).view(B * T, -1, self.heads, self.head_dim)
        k, v = a.kv_linear(audio.to(x.dtype)).chunk(2, dim=-1)
        k = k.reshape(B * T, L, self.heads, self.head_dim)
        v = v.reshape(B * T, L, self.heads, self.head_dim)
        q, k = a.q_norm(q), a.k_norm(k)
        o = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).reshape(B, T, -1, C)
        o = a.proj(o)
        return (x.float() + (gate * o.float()).view(B, N, C)).to(x.dtype)


class _AudioProj(nn.Module):
    """AudioProjModel's Linear layers (official names and shapes): frame 0's window through proj1,
    later latent frames' (longer) windows through proj1_vf, then proj2, proj3 -> context tokens."""

    def __init__(self, c: AvatarConfig):
        super().__init__()
        d = c.dims
        self.proj1 = nn.Linear(d.audio_proj_in, d.audio_inter)
        self.proj1_vf = nn.Linear(d.audio_proj_vf_in, d.audio_inter)
        self.proj2 = nn.Linear(d.audio_inter, d.audio_inter)
        self.proj3 = nn.Linear(d.audio_inter, d.audio_proj_out)
        self.norm = nn.LayerNorm(c.audio_dim)
        self.tokens, self.dim = c.audio_context_tokens, c.audio_dim
        self.in_first, self.in_vf = d.audio_proj_in, d.audio_proj_vf_in  # (the layers may be INT8 ones)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, T, proj1_vf input] -> tokens [B, T, context_tokens, audio_dim]; frame 0 uses the
        first proj1-input features."""
        first = F.relu(self.proj1(audio[:, :1, :self.in_first]))
        rest = F.relu(self.proj1_vf(audio[:, 1:]))
        h = F.relu(self.proj2(torch.cat([first, rest], dim=1)))
        out = self.proj3(h)
        return self.norm(out.view(*out.shape[:2], self.tokens, self.dim))


class LongCatAvatarDiT(LongCatDiT):
    """LongCat-Video-Avatar's DiT layout (`LongCatVideoAvatarTransformer3DModel`'s module names): the base
    DiT with AvatarBlocks and an `audio_proj`. forward takes `audio` [B, T_latent, proj1_vf input]."""

    def __init__(self, config: AvatarConfig = AvatarConfig()):
        super().__init__(config)
        self.blocks = nn.ModuleList([AvatarBlock(config) for _ in range(config.depth)])
        self.audio_proj = _AudioProj(config)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None, audio=None):
        c = self.dit_config
        B, T = hidden_states.shape[0], hidden_states.shape[2] // c.patch_size[0]
        if audio is None:
            g = torch.Generator().manual_seed(0)
            audio = torch.randn(B, T, self.audio_proj.in_vf, generator=g)
        tokens = self.audio_proj(audio.to(self.patch.weight.dtype))
        for b in self.blocks:
            b.audio_tokens = tokens
        try:
            return super().forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask)
        finally:
            for b in self.blocks:
                b.audio_tokens = None

    def _fp32_modules(self):
        return super()._fp32_modules() + [b.audio_adaLN_modulation for b in self.blocks]


# ----------------------------------------------------------------------------- the INT8 DiT

class QuantizedLinear(nn.Module):
    """LongCat's INT8 layer (`longcat_video/modules/quantization.py`): buffers `weight_int8` int8
    [out, in], `weight_scale` float32 [out], `bias` (or None); no `weight`. Forward:
    `w = weight_int8.to(x.dtype) * weight_scale.to(x.dtype)[:, None]`, `y = x @ w.T + bias.to(x.dtype)`.
    The scales stay float32 when the model is cast (as after the official load)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        """Quantize a Linear with the official per-channel symmetric scheme (`int8.quantize_rows`)."""
        from ..apply.int8 import quantize_rows

        q = cls(linear.in_features, linear.out_features, linear.bias is not None).to(linear.weight.device)
        with torch.no_grad():
            q.weight_int8, q.weight_scale = quantize_rows(linear.weight.detach())
            if linear.bias is not None:
                q.bias = linear.bias.detach().clone()
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        y = x @ w.T
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _apply(self, fn, recurse=True):
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:  # a dtype cast: the scales stay float32
            self.weight_scale = scale.to(self.weight_scale.device)
        return self


INT8_SKIP = ("final_layer.linear",)  # the official quantizer's skip_patterns (substring match)


def quantize_dit(model: nn.Module, skip: tuple[str, ...] = INT8_SKIP) -> nn.Module:
    """Replace every nn.Linear of `model` whose name contains none of `skip` with a QuantizedLinear,
    as the official `--use_int8` quantizer does. In place; returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and not any(p in name for p in skip):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, QuantizedLinear.from_linear(m))
    return model
