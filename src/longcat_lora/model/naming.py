"""The one LongCat <-> FastVideo naming table, and the DiT shapes each module has.

Everything that names a module (LoRA formats, base checkpoints, the runtime, inspect) goes through
this table; nothing else spells the mapping out. LongCat's original names are the canonical ones.
Shapes are data too (which DiT dimension, how many row splits), so expected shapes, the sizes
`inspect` infers from a file, and the test fixtures all derive from `TABLE`: a new module (such as
Avatar's audio modules) is one entry, plus a `DitDims` field if it brings a new dimension.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields


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

    @property
    def per_block(self) -> bool:
        return "{i}" in self.longcat

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
               "hidden", "hidden", 3),
    ModuleKind("attn.proj", "blocks.{i}.attn.proj", ("blocks.{i}.self_attn.to_out",), "hidden", "hidden"),
    ModuleKind("cross_attn.q_linear", "blocks.{i}.cross_attn.q_linear", ("blocks.{i}.cross_attn.to_q",),
               "hidden", "hidden"),
    ModuleKind("cross_attn.kv_linear", "blocks.{i}.cross_attn.kv_linear",
               ("blocks.{i}.cross_attn.to_k", "blocks.{i}.cross_attn.to_v"), "hidden", "hidden", 2),
    ModuleKind("cross_attn.proj", "blocks.{i}.cross_attn.proj", ("blocks.{i}.cross_attn.to_out",),
               "hidden", "hidden"),
    ModuleKind("ffn.w1", "blocks.{i}.ffn.w1", ("blocks.{i}.ffn.w1",), "ffn", "hidden"),
    ModuleKind("ffn.w2", "blocks.{i}.ffn.w2", ("blocks.{i}.ffn.w2",), "hidden", "ffn"),
    ModuleKind("ffn.w3", "blocks.{i}.ffn.w3", ("blocks.{i}.ffn.w3",), "ffn", "hidden"),
    ModuleKind("adaLN_modulation.1", "blocks.{i}.adaLN_modulation.1", ("blocks.{i}.adaln_linear_1",),
               "hidden", "adaln", 6),  # shift / scale / gate (msa), shift / scale / gate (mlp)
    ModuleKind("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1",
               ("final_layer.adaln_linear",), "hidden", "adaln", 2),  # shift / scale
    ModuleKind("final_layer.linear", "final_layer.linear", ("final_layer.proj",), "final_out", "hidden"),
    # LongCat-Video-Avatar's audio modules (spec section 5). FastVideo has no Avatar model: no form there.
    ModuleKind("audio_adaLN_modulation.1", "blocks.{i}.audio_adaLN_modulation.1", (),
               "hidden", "adaln", 3, avatar=True),  # shift / scale / gate
    ModuleKind("audio_cross_attn.q_linear", "blocks.{i}.audio_cross_attn.q_linear", (),
               "hidden", "hidden", avatar=True),
    ModuleKind("audio_cross_attn.kv_linear", "blocks.{i}.audio_cross_attn.kv_linear", (),
               "hidden", "audio", 2, avatar=True),  # rows k, v
    ModuleKind("audio_cross_attn.proj", "blocks.{i}.audio_cross_attn.proj", (), "hidden", "hidden", avatar=True),
    ModuleKind("audio_proj.proj1", "audio_proj.proj1", (), "audio_inter", "audio_proj_in", avatar=True),
    ModuleKind("audio_proj.proj1_vf", "audio_proj.proj1_vf", (), "audio_inter", "audio_proj_vf_in", avatar=True),
    ModuleKind("audio_proj.proj2", "audio_proj.proj2", (), "audio_inter", "audio_inter", avatar=True),
    ModuleKind("audio_proj.proj3", "audio_proj.proj3", (), "audio_proj_out", "audio_inter", avatar=True),
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


# Base-checkpoint parameters that are not LoRA targets, LongCat -> FastVideo (FastVideo's
# param_names_mapping). The parameter-free norms (mod_norm_attn, mod_norm_ffn, norm_final) have no tensors.
OTHER_PARAMS: tuple[tuple[str, str], ...] = (
    ("x_embedder.proj", "patch_embed.proj"),
    ("t_embedder.mlp.0", "time_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_embedder.linear_2"),
    ("y_embedder.y_proj.0", "caption_embedder.linear_1"),
    ("y_embedder.y_proj.2", "caption_embedder.linear_2"),
    ("blocks.{i}.pre_crs_attn_norm", "blocks.{i}.norm_cross"),
    ("blocks.{i}.attn.q_norm", "blocks.{i}.self_attn.q_norm"),
    ("blocks.{i}.attn.k_norm", "blocks.{i}.self_attn.k_norm"),
    ("blocks.{i}.cross_attn.q_norm", "blocks.{i}.cross_attn.q_norm"),
    ("blocks.{i}.cross_attn.k_norm", "blocks.{i}.cross_attn.k_norm"),
    ("blocks.{i}.mod_norm_attn", "blocks.{i}.norm_attn"),
    ("blocks.{i}.mod_norm_ffn", "blocks.{i}.norm_ffn"),
    ("final_layer.norm_final", "final_layer.norm"),
)


def _regex(template: str) -> re.Pattern[str]:
    # A block index as PyTorch spells it: ASCII digits, no leading zero, at most 9 of them. "blocks.01"
    # or "blocks.\u0661" (an Arabic-Indic one) would otherwise alias block 1, and a 5000-digit index
    # would be parsed into a huge block count.
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(0|[1-9][0-9]{0,8})") + "$")


_Patterns = tuple[list[tuple[re.Pattern[str], ModuleKind]], list[tuple[re.Pattern[str], ModuleKind, int]]]
_compiled: tuple[tuple[ModuleKind, ...] | None, _Patterns] = (None, ([], []))


def _patterns() -> _Patterns:
    """TABLE's LongCat and FastVideo name patterns, compiled once per TABLE (a test may replace it)."""
    global _compiled
    table, patterns = _compiled
    if table is not TABLE:
        table = TABLE
        patterns = ([(_regex(k.longcat), k) for k in table],
                    [(_regex(t), k, j) for k in table for j, t in enumerate(k.fastvideo)])
        _compiled = (table, patterns)
    return patterns


def kind_of(module: str) -> tuple[ModuleKind, int | None] | None:
    """(kind, block index) of a LongCat module name, or None if the DiT has no such Linear."""
    for rx, k in _patterns()[0]:
        m = rx.match(module)
        if m:
            return k, (int(m.group(1)) if k.per_block else None)
    return None


def fastvideo_layers(module: str) -> tuple[str, ...] | None:
    """FastVideo layer names for a LongCat module, in row order (equal row splits), or None (unknown
    module, or one FastVideo has no form for, such as the Avatar audio modules)."""
    found = kind_of(module)
    if found is None or not found[0].fastvideo:
        return None
    k, i = found
    return tuple(t.format(i=i) for t in k.fastvideo)


def from_fastvideo(layer: str) -> tuple[str, int, int] | None:
    """(LongCat module, split index, number of splits) of a FastVideo layer name, or None."""
    for rx, k, j in _patterns()[1]:
        m = rx.match(layer)
        if m:
            i = int(m.group(1)) if k.per_block else None
            return k.longcat.format(i=i), j, len(k.fastvideo)
    return None


_OTHER_LC = [(_regex(a), b) for a, b in OTHER_PARAMS]
_OTHER_FV = [(_regex(b), a) for a, b in OTHER_PARAMS]


def _rename(module: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for rx, template in table:
        m = rx.match(module)
        if m:
            return template.format(i=m.group(1)) if m.groups() else template
    return None


def param_to_fastvideo(name: str) -> list[tuple[str, int, int]]:
    """FastVideo tensor(s) for a LongCat base parameter: [(name, split index, splits)].

    A fused Linear's weight and bias split by rows into equal parts; unknown names pass through.
    """
    module, leaf = split_param(name)
    layers = fastvideo_layers(module)
    if layers is not None:
        return [(f"{layer}.{leaf}", j, len(layers)) for j, layer in enumerate(layers)]
    other = _rename(module, _OTHER_LC)
    return [(f"{other}.{leaf}" if other else name, 0, 1)]


def param_from_fastvideo(name: str) -> tuple[str, int, int]:
    """(LongCat name, split index, splits) of a FastVideo base parameter; unknown names pass through."""
    module, leaf = split_param(name)
    found = from_fastvideo(module)
    if found is not None:
        return f"{found[0]}.{leaf}", found[1], found[2]
    other = _rename(module, _OTHER_FV)
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
