"""The one naming table of the LongCat-Video DiT, and the shapes each module has.

Three schemes name the same modules (`Scheme`): LongCat's original names (the canonical ones), FastVideo's
port (`self_attn.to_q` ...) and ComfyUI-WanVideoWrapper's LongCat model (Wan-style: `self_attn.q`,
`modulation.1`, `head.head` ...). Everything that names a module (LoRA formats, base checkpoints, the
runtime, inspect) goes through this table; nothing else spells a mapping out. A fused projection
(`attn.qkv`) is one layer in some schemes and several in others: each scheme lists its layers in row
order, so a layer name gives the module and its share of the rows. Names written with underscores for
dots (kohya's `lora_unet_blocks_0_attn_qkv`) are matched against the same templates, so a dot is never
guessed. Shapes are data too (which DiT dimension, how many row splits), so expected shapes, the sizes
`inspect` infers from a file, and the test fixtures all derive from `TABLE`: a new module (such as
Avatar's audio modules) is one entry, plus a `DitDims` field if it brings a new dimension.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from enum import StrEnum


class Scheme(StrEnum):
    """A naming of the DiT's modules."""

    LONGCAT = "longcat"  # LongCat-Video's own (official) names: the canonical ones
    FASTVIDEO = "fastvideo"  # FastVideo's LongCat port
    WANVIDEO = "wanvideo"  # ComfyUI-WanVideoWrapper's LongCat model (Wan-style names)


@dataclass(frozen=True)
class DitDims:
    """Sizes that fix every Linear shape of a LongCat-Video DiT."""

    hidden: int = 4096
    ffn: int = 11008
    adaln: int = 512  # adaln_tembed_dim
    final_out: int = 64  # patch (1,2,2) x out_channels 16
    depth: int = 48
    # LongCat-Video-Avatar (spec section 5): audio features, and AudioProjModel's sizes (window 5,
    # vae_scale 4, 12 blocks, 768 channels, intermediate 512, output 768, 32 context tokens)
    audio: int = 768  # audio output_dim: audio_cross_attn.kv_linear input
    audio_proj_in: int = 46080  # proj1 input: window * blocks * channels = 5*12*768
    audio_proj_vf_in: int = 73728  # proj1_vf input: (window + vae_scale - 1) * blocks * channels
    audio_inter: int = 512  # AudioProjModel intermediate_dim
    audio_proj_out: int = 24576  # proj3 output: context_tokens * output_dim = 32*768


OFFICIAL = DitDims()
MAX_BLOCKS = OFFICIAL.depth  # LongCat-Video's and LongCat-Video-Avatar's DiTs have 48 blocks: a module of
# block 48 or later is of neither (a smaller test DiT has fewer; none has more)
# LongCat-Video-Avatar 1.5's audio projection (Whisper features: 5 blocks x 1280 channels instead of 12 x 768)
AVATAR_15 = DitDims(audio_proj_in=32000, audio_proj_vf_in=51200)


@dataclass(frozen=True)
class ModuleKind:
    """One kind of LoRA-targetable Linear in the DiT, its shape as data.

    The Linear maps `dims.<inp>` features to `chunks` equal row splits of `dims.<out>` rows each (qkv:
    3 x hidden from hidden); `inp` and `out` name `DitDims` fields. The splits are the fused outputs
    (q/k/v, shift/scale/gate...): the published native files keep one up block per split, and FastVideo
    has one layer per split or one for the whole.
    """

    kind: str  # short name used in reports, e.g. "attn.qkv"
    longcat: str  # template; {i} is the block index
    fastvideo: tuple[str, ...]  # FastVideo layer(s): one, or one per split, in row order; () = no form
    out: str  # DitDims field: each split's rows
    inp: str  # DitDims field: the input features
    chunks: int = 1  # equal row splits; out_features = chunks * dims.<out>
    avatar: bool = False  # only in LongCat-Video-Avatar's DiT (the audio modules)
    wanvideo: tuple[str, ...] = ()  # the wrapper's layer(s), likewise

    @property
    def per_block(self) -> bool:
        return "{i}" in self.longcat

    def templates(self, scheme: Scheme) -> tuple[str, ...]:
        """This module's layer name templates in `scheme`, in row order (() where it has no form)."""
        return (self.longcat,) if scheme is Scheme.LONGCAT else getattr(self, scheme.value)

    def shape(self, dims: DitDims) -> tuple[int, int]:
        """(out_features, in_features) of this Linear in a DiT of these dims."""
        return self.chunks * getattr(dims, self.out), getattr(dims, self.inp)

    def reveals(self, out_features: int, in_features: int) -> list[tuple[str, int]]:
        """The DiT sizes a module of this kind with this shape states: [(DitDims field, size)]; the
        inverse of `shape` (a row count that does not split into `chunks` states nothing)."""
        found = [(self.inp, in_features)]
        if out_features % self.chunks == 0:
            found.append((self.out, out_features // self.chunks))
        return found


TABLE: tuple[ModuleKind, ...] = (
    ModuleKind("attn.qkv", "blocks.{i}.attn.qkv",
               ("blocks.{i}.self_attn.to_q", "blocks.{i}.self_attn.to_k", "blocks.{i}.self_attn.to_v"),
               "hidden", "hidden", 3,
               wanvideo=("blocks.{i}.self_attn.q", "blocks.{i}.self_attn.k", "blocks.{i}.self_attn.v")),
    ModuleKind("attn.proj", "blocks.{i}.attn.proj", ("blocks.{i}.self_attn.to_out",), "hidden", "hidden",
               wanvideo=("blocks.{i}.self_attn.o",)),
    ModuleKind("cross_attn.q_linear", "blocks.{i}.cross_attn.q_linear", ("blocks.{i}.cross_attn.to_q",),
               "hidden", "hidden", wanvideo=("blocks.{i}.cross_attn.q",)),
    ModuleKind("cross_attn.kv_linear", "blocks.{i}.cross_attn.kv_linear",
               ("blocks.{i}.cross_attn.to_k", "blocks.{i}.cross_attn.to_v"), "hidden", "hidden", 2,
               wanvideo=("blocks.{i}.cross_attn.k", "blocks.{i}.cross_attn.v")),
    ModuleKind("cross_attn.proj", "blocks.{i}.cross_attn.proj", ("blocks.{i}.cross_attn.to_out",),
               "hidden", "hidden", wanvideo=("blocks.{i}.cross_attn.o",)),
    ModuleKind("ffn.w1", "blocks.{i}.ffn.w1", ("blocks.{i}.ffn.w1",), "ffn", "hidden", wanvideo=("blocks.{i}.ffn.w1",)),
    ModuleKind("ffn.w2", "blocks.{i}.ffn.w2", ("blocks.{i}.ffn.w2",), "hidden", "ffn", wanvideo=("blocks.{i}.ffn.w2",)),
    ModuleKind("ffn.w3", "blocks.{i}.ffn.w3", ("blocks.{i}.ffn.w3",), "ffn", "hidden", wanvideo=("blocks.{i}.ffn.w3",)),
    ModuleKind("adaLN_modulation.1", "blocks.{i}.adaLN_modulation.1", ("blocks.{i}.adaln_linear_1",),
               "hidden", "adaln", 6, wanvideo=("blocks.{i}.modulation.1",)),  # shift/scale/gate (msa), (mlp)
    ModuleKind("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1", ("final_layer.adaln_linear",),
               "hidden", "adaln", 2, wanvideo=("head.modulation.1",)),  # shift / scale
    ModuleKind("final_layer.linear", "final_layer.linear", ("final_layer.proj",), "final_out", "hidden",
               wanvideo=("head.head",)),
    # LongCat-Video-Avatar's audio modules (spec section 5). FastVideo has no Avatar model: no form there.
    # The wrapper keeps the audio attention's names (its kv_linear stays fused) and renames the rest.
    ModuleKind("audio_adaLN_modulation.1", "blocks.{i}.audio_adaLN_modulation.1", (), "hidden", "adaln", 3,
               avatar=True, wanvideo=("blocks.{i}.audio_modulation.1",)),  # shift / scale / gate
    ModuleKind("audio_cross_attn.q_linear", "blocks.{i}.audio_cross_attn.q_linear", (), "hidden", "hidden",
               avatar=True, wanvideo=("blocks.{i}.audio_cross_attn.q_linear",)),
    ModuleKind("audio_cross_attn.kv_linear", "blocks.{i}.audio_cross_attn.kv_linear", (), "hidden", "audio", 2,
               avatar=True, wanvideo=("blocks.{i}.audio_cross_attn.kv_linear",)),  # rows k, v
    ModuleKind("audio_cross_attn.proj", "blocks.{i}.audio_cross_attn.proj", (), "hidden", "hidden",
               avatar=True, wanvideo=("blocks.{i}.audio_cross_attn.proj",)),
    ModuleKind("audio_proj.proj1", "audio_proj.proj1", (), "audio_inter", "audio_proj_in", avatar=True,
               wanvideo=("multitalk_audio_proj.proj1",)),
    ModuleKind("audio_proj.proj1_vf", "audio_proj.proj1_vf", (), "audio_inter", "audio_proj_vf_in", avatar=True,
               wanvideo=("multitalk_audio_proj.proj1_vf",)),
    ModuleKind("audio_proj.proj2", "audio_proj.proj2", (), "audio_inter", "audio_inter", avatar=True,
               wanvideo=("multitalk_audio_proj.proj2",)),
    ModuleKind("audio_proj.proj3", "audio_proj.proj3", (), "audio_proj_out", "audio_inter", avatar=True,
               wanvideo=("multitalk_audio_proj.proj3",)),
)

# Module kinds in the published files (spec section 2).
CFG_STEP_KINDS = frozenset(["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear",
                            "ffn.w1", "ffn.w2", "ffn.w3"])
REFINEMENT_KINDS = CFG_STEP_KINDS | {"adaLN_modulation.1", "final_layer.adaLN_modulation.1", "final_layer.linear"}


def avatar_kinds() -> frozenset[str]:
    """LongCat-Video-Avatar's audio module kinds (no FastVideo form)."""
    return frozenset(k.kind for k in TABLE if k.avatar)


def dims_named(avatar: bool) -> tuple[str, ...]:
    """The DitDims fields the table's shapes name, in DitDims order: without avatar those of the base
    DiT's kinds, with avatar those only the Avatar audio modules name."""
    base = {f for k in TABLE if not k.avatar for f in (k.out, k.inp)}
    named = {f for k in TABLE if k.avatar for f in (k.out, k.inp)} - base if avatar else base
    return tuple(f.name for f in fields(DitDims) if f.name in named)


# Base-checkpoint parameters that are not LoRA targets, by scheme: (LongCat, FastVideo, wrapper); None
# where a scheme has no such tensor (FastVideo has no Avatar model; the wrapper has no audio pre-norm).
# The parameter-free norms (mod_norm_attn, mod_norm_ffn, norm_final) have no tensors in any scheme.
OTHER_PARAMS: tuple[tuple[str, str | None, str | None], ...] = (
    ("x_embedder.proj", "patch_embed.proj", "patch_embedding"),
    ("t_embedder.mlp.0", "time_embedder.linear_1", "time_embedding.mlp.0"),
    ("t_embedder.mlp.2", "time_embedder.linear_2", "time_embedding.mlp.2"),
    ("y_embedder.y_proj.0", "caption_embedder.linear_1", "text_embedding.0"),
    ("y_embedder.y_proj.2", "caption_embedder.linear_2", "text_embedding.2"),
    ("blocks.{i}.pre_crs_attn_norm", "blocks.{i}.norm_cross", "blocks.{i}.norm3"),
    ("blocks.{i}.attn.q_norm", "blocks.{i}.self_attn.q_norm", "blocks.{i}.self_attn.norm_q"),
    ("blocks.{i}.attn.k_norm", "blocks.{i}.self_attn.k_norm", "blocks.{i}.self_attn.norm_k"),
    ("blocks.{i}.cross_attn.q_norm", "blocks.{i}.cross_attn.q_norm", "blocks.{i}.cross_attn.norm_q"),
    ("blocks.{i}.cross_attn.k_norm", "blocks.{i}.cross_attn.k_norm", "blocks.{i}.cross_attn.norm_k"),
    ("blocks.{i}.mod_norm_attn", "blocks.{i}.norm_attn", "blocks.{i}.norm1"),
    ("blocks.{i}.mod_norm_ffn", "blocks.{i}.norm_ffn", "blocks.{i}.norm2"),
    ("final_layer.norm_final", "final_layer.norm", "head.norm"),
    # LongCat-Video-Avatar
    ("blocks.{i}.pre_video_crs_attn_norm", None, "blocks.{i}.norm_x"),
    ("blocks.{i}.audio_cross_attn.q_norm", None, "blocks.{i}.audio_cross_attn.q_norm"),
    ("blocks.{i}.audio_cross_attn.k_norm", None, "blocks.{i}.audio_cross_attn.k_norm"),
    ("blocks.{i}.pre_audio_crs_attn_norm", None, None),  # only with audio_prenorm=True
    ("audio_proj.norm", None, "multitalk_audio_proj.norm"),
)
_OTHER_COLUMN = {Scheme.LONGCAT: 0, Scheme.FASTVIDEO: 1, Scheme.WANVIDEO: 2}


@dataclass(frozen=True)
class Layer:
    """What a layer name stands for: rows `split` of `nsplit` equal parts of LongCat module `module` (block
    `block`), in the schemes whose names include it (several: `blocks.0.ffn.w1` is the same in all three)."""

    module: str
    split: int
    nsplit: int
    schemes: frozenset[Scheme]
    kind: ModuleKind
    block: int | None


# A block index as PyTorch spells it: ASCII digits, no leading zero, at most 9 of them. "blocks.01" or
# "blocks.\u0661" (an Arabic-Indic one) would otherwise alias block 1, and a 5000-digit index would be
# parsed into a huge block count. Every per-block template starts with "blocks.{i}.".
_BLOCK = {".": re.compile(r"^blocks\.(0|[1-9][0-9]{0,8})\."), "_": re.compile(r"^blocks_(0|[1-9][0-9]{0,8})_")}
_compiled: tuple[tuple[ModuleKind, ...] | None, dict] = (None, {})


def _lookups() -> dict:
    """TABLE's and OTHER_PARAMS' names as dicts keyed by template (block index as "{i}"), with dots and
    with underscores, compiled once per TABLE (a test may replace it)."""
    global _compiled
    table, found = _compiled
    if table is not TABLE:
        found = {".": {}, "_": {}, "other": {}}
        for k in TABLE:
            for scheme in Scheme:
                names = k.templates(scheme)
                for j, t in enumerate(names):
                    for sep in ".", "_":
                        entry = found[sep].setdefault(t.replace(".", sep), {})
                        if entry.setdefault("at", (k, j, len(names))) != (k, j, len(names)):
                            raise AssertionError(f"naming table: {t!r} names two different layers")
                        entry.setdefault("schemes", set()).add(scheme)
        for row in OTHER_PARAMS:
            for c, t in enumerate(row):
                if t is not None:
                    found["other"].setdefault(t, []).append((c, row))
        _compiled = (TABLE, found)
    return found


def _template(name: str, sep: str) -> tuple[str, int | None]:
    """(name with its block index as "{i}", the index) for a name starting with a block, else (name, None)."""
    m = _BLOCK[sep].match(name)
    if m is None:
        return name, None
    return f"blocks{sep}{{i}}{sep}" + name[m.end():], int(m.group(1))


def _match(name: str, sep: str = ".") -> Layer | None:
    t, i = _template(name, sep)
    entry = _lookups()[sep].get(t)
    if entry is None or (i is None) == entry["at"][0].per_block or (i is not None and i >= MAX_BLOCKS):
        return None
    k, j, n = entry["at"]
    return Layer(k.longcat.format(i=i), j, n, frozenset(entry["schemes"]), k, i)


def kind_of(module: str) -> tuple[ModuleKind, int | None] | None:
    """(kind, block index) of a LongCat module name, or None if the DiT has no such Linear."""
    found = _match(module)
    if found is None or Scheme.LONGCAT not in found.schemes:
        return None
    return found.kind, found.block


def resolve(layer: str) -> Layer | None:
    """The module a layer name in any scheme stands for (LongCat, FastVideo or the wrapper's), or None.

    >>> resolve("blocks.3.self_attn.k").module, resolve("blocks.3.self_attn.k").split
    ('blocks.3.attn.qkv', 1)
    """
    return _match(layer)


def resolve_underscored(name: str) -> Layer | None:
    """The same for a name written with underscores for dots (kohya's `lora_unet_` names, prefix removed):
    matched against the table's templates with their dots as underscores, so `cross_attn_kv_linear` is
    `cross_attn.kv_linear` because that module exists, never by guessing where the dots were.

    >>> resolve_underscored("blocks_0_cross_attn_kv_linear").module
    'blocks.0.cross_attn.kv_linear'
    """
    return _match(name, "_")


def layers(module: str, scheme: Scheme) -> tuple[str, ...] | None:
    """A LongCat module's layer names in `scheme`, in row order (equal row splits), or None (unknown
    module, or one the scheme has no form for, such as the Avatar audio modules in FastVideo)."""
    found = kind_of(module)
    if found is None or not found[0].templates(scheme):
        return None
    k, i = found
    return tuple(t.format(i=i) for t in k.templates(scheme))


def _rename(name: str, to: Scheme, frm: Scheme | None) -> str | None:
    """An OTHER_PARAMS module name from `frm` (any scheme when None) to `to`: the name, "" where `to` has
    no such tensor, None if the table does not know the name."""
    t, i = _template(name, ".")
    for c, row in _lookups()["other"].get(t, []):
        if frm is None or c == _OTHER_COLUMN[frm]:
            target = row[_OTHER_COLUMN[to]]
            if target is None:
                return ""
            if ("{i}" in target) != (i is not None):
                return None
            return target.format(i=i)
    return None


def param_to(name: str, scheme: Scheme) -> list[tuple[str, int, int]] | None:
    """The tensor(s) of `scheme` for a LongCat base parameter: [(name, split index, splits)]; None where
    the scheme has no such tensor (FastVideo has no Avatar modules), for the caller to refuse.

    A fused Linear's weight and bias split by rows into equal parts; names the table does not know
    pass through unchanged.
    """
    module, leaf = split_param(name)
    names = layers(module, scheme)
    if names is not None:
        return [(f"{layer}.{leaf}", j, len(names)) for j, layer in enumerate(names)]
    if kind_of(module) is not None:  # a LoRA-targetable Linear the scheme has no form for
        return None
    other = _rename(module, scheme, Scheme.LONGCAT)
    if other == "":
        return None
    return [(f"{other}.{leaf}" if other else name, 0, 1)]


def param_from(name: str) -> tuple[str, int, int]:
    """(LongCat name, split index, splits) of a base parameter named in any scheme; unknown names pass
    through (split 0 of 1)."""
    module, leaf = split_param(name)
    found = resolve(module)
    if found is not None:
        return f"{found.module}.{leaf}", found.split, found.nsplit
    other = _rename(module, Scheme.LONGCAT, None)
    return (f"{other}.{leaf}" if other else name), 0, 1


def split_param(name: str) -> tuple[str, str]:
    """'blocks.0.attn.qkv.weight' -> ('blocks.0.attn.qkv', 'weight')."""
    module, _, leaf = name.rpartition(".")
    return module, leaf


def expected_shapes(dims: DitDims, avatar: bool = False) -> dict[str, tuple[int, int]]:
    """Every LoRA-targetable Linear of a DiT with these dims, LongCat name -> (out, in); with avatar,
    LongCat-Video-Avatar's DiT (the audio modules too)."""
    out: dict[str, tuple[int, int]] = {}
    for k in TABLE:
        if k.avatar and not avatar:
            continue
        for i in range(dims.depth) if k.per_block else [None]:
            out[k.longcat.format(i=i)] = k.shape(dims)
    return out


_SCHEME_LABEL = {Scheme.LONGCAT: "LongCat's", Scheme.FASTVIDEO: "FastVideo's", Scheme.WANVIDEO: "the wrapper's (Wan-style)"}


def hint(name: str) -> str | None:
    """What an unknown module name resembles, for a refusal: a known layer behind an unknown prefix, or a
    module path a scheme has, ending in a layer it does not have. None when it resembles nothing."""
    for sep in ".", "_":
        for k in range(len(name)):
            if name[k] == sep and k + 1 < len(name):
                tail = name[k + 1:]
                found = _match(tail, sep)
                if found is not None:
                    return f"{name!r} ends in the layer {tail!r} after the prefix {name[:k + 1]!r}, which is not one the format takes"
    for sep in ".", "_":
        t, i = _template(name, sep)
        if i is not None and i >= MAX_BLOCKS and _match(t.replace("{i}", "0"), sep) is not None:
            return f"block {i} is past the {MAX_BLOCKS} blocks of LongCat-Video and LongCat-Video-Avatar"
    t, i = _template(name, ".")
    parent = t.rpartition(".")[0]
    if not parent:
        return None
    schemes = sorted({s for k in TABLE for s in Scheme for tt in k.templates(s) if tt.rpartition(".")[0] == parent},
                     key=list(Scheme).index)
    if not schemes:
        return None
    shown = parent.replace("{i}", "N")
    return (f"{shown}.* is a module path in {' and '.join(_SCHEME_LABEL[s] for s in schemes)} naming, but "
            f"{t.rpartition('.')[2]!r} is no layer there")
