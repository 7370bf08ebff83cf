import dataclasses

import pytest
import torch
from torch import nn

from longcat_lora.commands.inspect import inspect_lora
from longcat_lora.model import naming
from longcat_lora.testing.dit import AvatarConfig, LongCatAvatarDiT
from longcat_lora.testing.fixtures import native_entries, write_native_lora
from longcat_lora.io.reader import SafeFile

from conftest import DIMS


@pytest.mark.parametrize("layout,keys,modules", [("cfg_step", 1152, 336), ("refinement", 1543, 386)])
def test_published_key_sets(layout, keys, modules):
    entries = native_entries(layout)  # official dims: only headers are built, no data
    assert len(entries) == keys
    assert len({e.name.split(".")[0] for e in entries}) == modules


def test_published_shapes_and_sizes():
    shapes = {e.name.split("___lorahyphen___", 1)[1]: e.shape for e in native_entries("refinement")}
    qkv = "blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
    assert shapes[f"{qkv}.lora_down.weight"] == (384, 4096)
    assert shapes[f"{qkv}.lora_up.blocks.2.weight"] == (4096, 128)
    ada = "blocks___lorahyphen___7___lorahyphen___adaLN_modulation___lorahyphen___1"
    assert shapes[f"{ada}.lora_down.weight"] == (768, 512)
    assert shapes[f"{ada}.lora_up.blocks.5.weight"] == (4096, 128)
    w2 = "blocks___lorahyphen___47___lorahyphen___ffn___lorahyphen___w2"
    assert shapes[f"{w2}.lora_down.weight"] == (128, 11008)
    fin = "final_layer___lorahyphen___linear"
    assert shapes[f"{fin}.lora_up.weight"] == (64, 128)
    fada = "final_layer___lorahyphen___adaLN_modulation___lorahyphen___1"
    assert shapes[f"{fada}.lora_down.weight"] == (256, 512)
    # spec: 630.7M and 802.3M parameters, about 1.26 GB and 1.60 GB in bf16
    for layout, params in (("cfg_step", 630.7e6), ("refinement", 802.3e6)):
        n = sum(e.nbytes for e in native_entries(layout) if len(e.shape) == 2) / 2
        assert abs(n - params) < 0.1e6


def test_small_fixture_is_a_valid_file(native):
    path = native("cfg_step")
    with SafeFile(path) as f:
        assert len(f.keys()) == 1152


def test_naming_table_round_trips():
    for module, (out, inp) in naming.expected_shapes(naming.OFFICIAL, avatar=True).items():
        for scheme in naming.Scheme:
            layers = naming.layers(module, scheme)
            if scheme is naming.Scheme.FASTVIDEO and naming.kind_of(module)[0].avatar:
                assert layers is None
                continue
            assert layers
            for j, layer in enumerate(layers):
                found = naming.resolve(layer)
                assert (found.module, found.split, found.nsplit) == (module, j, len(layers))
                assert scheme in found.schemes
                under = naming.resolve_underscored(layer.replace(".", "_"))
                assert (under.module, under.split, under.nsplit) == (module, j, len(layers))
    assert naming.layers("blocks.3.attn.qkv", naming.Scheme.FASTVIDEO) == (
        "blocks.3.self_attn.to_q", "blocks.3.self_attn.to_k", "blocks.3.self_attn.to_v")
    assert naming.layers("final_layer.adaLN_modulation.1", naming.Scheme.FASTVIDEO) == ("final_layer.adaln_linear",)
    assert naming.layers("blocks.0.cross_attn.proj", naming.Scheme.FASTVIDEO) == ("blocks.0.cross_attn.to_out",)
    assert naming.resolve("blocks.01.attn.qkv") is None and naming.resolve_underscored("blocks_01_attn_qkv") is None
    assert naming.kind_of("blocks.12.ffn.w2")[1] == 12
    assert naming.kind_of("blocks.0.audio_attn.qkv") is None
    assert naming.expected_shapes(naming.OFFICIAL)["blocks.0.ffn.w1"] == (11008, 4096)
    assert len(naming.expected_shapes(DIMS)) == 48 * 9 + 2


# ------------------------------------------------------------------ shapes as data: every consumer derives from TABLE

# An Avatar DiT whose sizes are pairwise distinct (depth included), so a table entry naming the wrong
# dimension cannot hide behind two equal sizes (officially adaln = audio_inter = 512).
DISTINCT = AvatarConfig(in_channels=3, out_channels=3, hidden_size=64, depth=2, num_heads=4, caption_channels=8,
                        adaln_tembed_dim=40, frequency_embedding_size=16, ffn_multiple_of=16, audio_dim=20,
                        audio_window=3, audio_vae_scale=2, audio_blocks=1, audio_channels=7,
                        audio_intermediate=24, audio_context_tokens=5)
# the same sizes spelled out (spec section 1 and 5 formulas): ffn = 16 * ceil(int(2 * 64 * 4 / 3) / 16),
# final_out = 1 * 2 * 2 * 3, proj1 in = 3 * 1 * 7, proj1_vf in = (3 + 2 - 1) * 1 * 7, proj3 out = 5 * 20
DISTINCT_SIZES = {"hidden": 64, "ffn": 176, "adaln": 40, "final_out": 12, "depth": 2, "audio": 20,
                  "audio_proj_in": 21, "audio_proj_vf_in": 28, "audio_inter": 24, "audio_proj_out": 100}


def _dit_linears(config) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear of the reference (Avatar) DiT, built on the meta device."""
    with torch.device("meta"):
        model = LongCatAvatarDiT(config)
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


OFFICIAL_LINEARS = _dit_linears(AvatarConfig())
DISTINCT_LINEARS = _dit_linears(DISTINCT)


def _table_disagrees() -> list[str]:
    """Modules whose table-derived shape differs from the reference DiT's Linear (official and distinct sizes)."""
    bad = []
    for dims, linears in ((naming.OFFICIAL, OFFICIAL_LINEARS), (DISTINCT.dims, DISTINCT_LINEARS)):
        for module, shape in naming.expected_shapes(dims, avatar=True).items():
            if linears.get(module) != shape:
                bad.append(f"{module} {shape} != {linears.get(module)}")
    return bad


def test_distinct_sizes_are_distinct_and_what_the_config_says():
    assert dataclasses.asdict(DISTINCT.dims) == DISTINCT_SIZES
    assert len(set(DISTINCT_SIZES.values())) == len(DISTINCT_SIZES)


def test_table_shapes_equal_the_reference_dits_linears():
    assert _table_disagrees() == []
    # every LoRA-targetable Linear of the Avatar DiT is in the table; the rest are the embedders
    others = set(DISTINCT_LINEARS) - set(naming.expected_shapes(DISTINCT.dims, avatar=True))
    assert sorted(others) == ["t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.y_proj.0", "y_embedder.y_proj.2"]


def test_a_wrong_dimension_or_split_count_in_any_entry_is_caught(monkeypatch):
    fields = [f.name for f in dataclasses.fields(naming.DitDims)]
    table = naming.TABLE
    for n, k in enumerate(table):
        wrong = [dataclasses.replace(k, out=f) for f in fields if f != k.out]
        wrong += [dataclasses.replace(k, inp=f) for f in fields if f != k.inp]
        wrong += [dataclasses.replace(k, chunks=k.chunks + 1), dataclasses.replace(k, chunks=max(1, k.chunks - 1))]
        for w in wrong:
            if w == k:
                continue  # chunks 1 - 1 clamps back to 1
            monkeypatch.setattr(naming, "TABLE", table[:n] + (w,) + table[n + 1:])
            assert _table_disagrees(), w
    monkeypatch.setattr(naming, "TABLE", table)
    assert _table_disagrees() == []


def test_reveals_inverts_shape_and_fastvideo_splits_are_the_row_splits():
    dims = DISTINCT.dims
    for k in naming.TABLE:
        out, inp = k.shape(dims)
        assert sorted(k.reveals(out, inp)) == sorted([(k.inp, DISTINCT_SIZES[k.inp]), (k.out, DISTINCT_SIZES[k.out])])
        assert k.reveals(out + 1, inp) == ([(k.inp, inp)] if k.chunks > 1 else [(k.inp, inp), (k.out, out + 1)])
        assert len(k.fastvideo) in ((0,) if k.avatar else (1, k.chunks)), k.kind
    assert naming.dims_named(False) == ("hidden", "ffn", "adaln", "final_out")
    assert naming.dims_named(True) == ("audio", "audio_proj_in", "audio_proj_vf_in", "audio_inter", "audio_proj_out")


@pytest.mark.parametrize("layout", ["refinement", "avatar"])
def test_inspect_infers_every_size_of_a_non_default_dit(tmp_path, layout):
    path = write_native_lora(str(tmp_path / "x.safetensors"), layout, dims=DISTINCT.dims, rank=2,
                             dtype=torch.float32)
    r = inspect_lora(path)
    base = {f: DISTINCT_SIZES[f] for f in ("hidden", "ffn", "adaln", "final_out", "depth")}
    audio = {f: v for f, v in DISTINCT_SIZES.items() if f.startswith("audio")}
    if layout == "avatar":  # cfg_step's kinds plus audio: no final_layer.linear states final_out (official 64)
        base["final_out"] = 64
    assert r["dims"] == ({**base, **audio} if layout == "avatar" else base)
    assert "every module's shape is consistent with that DiT" in r["findings"]
    assert f"module sizes imply a DiT of hidden 64, ffn 176, adaln 40, final_out {base['final_out']}; the " \
           "official one has hidden 4096, ffn 11008, adaln 512, final_out 64" in r["findings"]
    assert r["looks_like"] == ("avatar-like" if layout == "avatar" else "refinement-like")
    if layout == "avatar":
        f = [x for x in r["findings"] if "Avatar audio modules" in x]
        assert len(f) == 1 and "(audio 20, audio_proj_in 21, audio_proj_vf_in 28, audio_inter 24, " \
                                "audio_proj_out 100; the official Avatar DiT: audio 768, " in f[0]


def test_a_table_entry_added_in_a_test_reaches_shapes_fixtures_and_inspect(tmp_path, monkeypatch):
    gate = naming.ModuleKind("audio_gate", "blocks.{i}.audio_cross_attn.gate", (), "ffn", "audio", 2, avatar=True)
    once = naming.ModuleKind("audio_proj.norm_proj", "audio_proj.norm_proj", (), "audio", "audio_proj_out",
                             avatar=True)
    monkeypatch.setattr(naming, "TABLE", naming.TABLE + (gate, once))
    dims = DISTINCT.dims
    shapes = naming.expected_shapes(dims, avatar=True)
    assert shapes["blocks.1.audio_cross_attn.gate"] == (2 * 176, 20)
    assert shapes["audio_proj.norm_proj"] == (20, 100)
    assert "blocks.1.audio_cross_attn.gate" not in naming.expected_shapes(dims)
    assert naming.kind_of("blocks.1.audio_cross_attn.gate") == (gate, 1)
    entries = {e.name: e.shape for e in native_entries("avatar", dims, rank=2, dtype=torch.float32)}
    key = "lora___lorahyphen___blocks___lorahyphen___1___lorahyphen___audio_cross_attn___lorahyphen___gate"
    assert entries[f"{key}.lora_down.weight"] == (2 * 2, 20)
    assert entries[f"{key}.lora_up.blocks.0.weight"] == entries[f"{key}.lora_up.blocks.1.weight"] == (176, 2)
    assert entries["lora___lorahyphen___audio_proj___lorahyphen___norm_proj.lora_up.weight"] == (20, 2)
    path = write_native_lora(str(tmp_path / "a.safetensors"), "avatar", dims=dims, rank=2, dtype=torch.float32)
    r = inspect_lora(path)
    assert r["coverage"]["audio_gate"] == "0-1" and r["up_blocks"]["audio_gate"] == {"2": 2}
    assert r["up_blocks"]["audio_proj.norm_proj"] == {"1": 1}
    assert r["modules"] == 2 * (7 + 5) + 5 and r["looks_like"] == "avatar-like"
    assert "every module's shape is consistent with that DiT" in r["findings"]
    assert not any("not modules of LongCat" in f for f in r["findings"])
    assert r["dims"] == {**DISTINCT_SIZES, "final_out": 64}  # no final_layer.linear in the avatar layout
    # the new entry's shape is checked too: without it the file's modules are unknown
    monkeypatch.setattr(naming, "TABLE", naming.TABLE[:-2])
    r = inspect_lora(path)
    assert any("3 modules are not modules of LongCat-Video or LongCat-Video-Avatar" in f for f in r["findings"])


def test_wanvideo_names_against_an_independent_table():
    """Every LoRA target and every other base tensor named as ComfyUI-WanVideoWrapper's LongCat model names
    it, checked against the table in tests/reference.py (written from the wrapper's model code, not from
    naming.py): layers, split order, and the parameters that are not LoRA targets, Avatar's included."""
    from reference import WANVIDEO_LAYERS, WANVIDEO_PARAMS

    depth = 3
    want = {}
    for suffix, layers in WANVIDEO_LAYERS.items():
        for i in range(depth) if suffix.startswith("blocks.") else [None]:
            want[suffix.format(i=i)] = tuple(t.format(i=i) for t in layers)
    got = {m: naming.layers(m, naming.Scheme.WANVIDEO)
           for m in naming.expected_shapes(naming.DitDims(depth=depth), avatar=True)}
    assert got == want
    for official, wan in WANVIDEO_PARAMS.items():
        for i in range(depth) if "{i}" in official else [None]:
            for leaf in ("weight", "bias"):
                o, w = f"{official.format(i=i)}.{leaf}", None if wan is None else f"{wan.format(i=i)}.{leaf}"
                assert naming.param_to(o, naming.Scheme.WANVIDEO) == (None if w is None else [(w, 0, 1)]), o
                if w is not None:
                    assert naming.param_from(w) == (o, 0, 1)
    # underscored names resolve only to modules the table has: no dot is guessed
    assert naming.resolve_underscored("blocks_0_cross_attn_kv_linear").module == "blocks.0.cross_attn.kv_linear"
    assert naming.resolve_underscored("blocks_0_cross_attn_kv") is None
    assert naming.resolve_underscored("blocks_0_attn_qkv_x") is None
