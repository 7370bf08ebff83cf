"""LongCat-Video-Avatar's audio modules: naming, inspect, convert (real CLI), and the runtime on the
reference Avatar DiT (float and INT8) against the official LoRA semantics."""

import copy
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import longcat_lora as L
from longcat_lora.model import naming
from longcat_lora.testing.dit import TINY_AVATAR, LongCatAvatarDiT
from longcat_lora.testing.fixtures import write_native_lora

from conftest import cli
from int8_reference import ref_quantize_model
from dit_runs import DitRuns
from reference import official_delta, rel_err, worst

CFG = dataclasses.replace(TINY_AVATAR, depth=4)
DIMS = CFG.dims
# spec section 5, spelled out: module -> (out, in) at the official Avatar sizes
OFFICIAL_AUDIO = {
    "blocks.7.audio_adaLN_modulation.1": (3 * 4096, 512),
    "blocks.7.audio_cross_attn.q_linear": (4096, 4096),
    "blocks.7.audio_cross_attn.kv_linear": (2 * 4096, 768),
    "blocks.7.audio_cross_attn.proj": (4096, 4096),
    "audio_proj.proj1": (512, 5 * 12 * 768),
    "audio_proj.proj1_vf": (512, (5 + 4 - 1) * 12 * 768),
    "audio_proj.proj2": (512, 512),
    "audio_proj.proj3": (32 * 768, 512),
}
AUDIO_PER_BLOCK = ["audio_adaLN_modulation.1", "audio_cross_attn.q_linear", "audio_cross_attn.kv_linear",
                   "audio_cross_attn.proj"]
AUDIO_ONCE = ["audio_proj.proj1", "audio_proj.proj1_vf", "audio_proj.proj2", "audio_proj.proj3"]


def _audio_modules(depth: int) -> list[str]:
    return sorted([f"blocks.{i}.{m}" for i in range(depth) for m in AUDIO_PER_BLOCK] + AUDIO_ONCE)


@pytest.fixture(scope="module")
def avatar_lora(tmp_path_factory):
    d = tmp_path_factory.mktemp("avatar")
    return write_native_lora(str(d / "avatar.safetensors"), "avatar", dims=DIMS, rank=4, dtype=torch.float32,
                             alpha_scale=0.5, seed=5)


# ------------------------------------------------------------------ naming


def test_naming_table_knows_the_audio_modules_and_their_shapes():
    shapes = naming.expected_shapes(naming.OFFICIAL, avatar=True)
    for module, shape in OFFICIAL_AUDIO.items():
        assert shapes[module] == shape, module
        kind, i = naming.kind_of(module)
        assert kind.avatar and i == (7 if module.startswith("blocks.") else None)
        assert naming.layers(module, naming.Scheme.FASTVIDEO) is None  # no FastVideo form: unmapped, not ()
        assert naming.Scheme.FASTVIDEO not in naming.resolve(module).schemes
        assert naming.param_to(module + ".weight", naming.Scheme.FASTVIDEO) is None  # no such tensor there
    assert len(shapes) == 48 * 13 + 2 + 4
    assert naming.expected_shapes(naming.OFFICIAL) == {k: v for k, v in shapes.items() if "audio" not in k}
    assert naming.kind_of("blocks.0.audio_adaLN_modulation.1")[0].chunks == 3
    assert naming.kind_of("blocks.0.audio_cross_attn.kv_linear")[0].chunks == 2


def test_reference_avatar_dit_has_the_official_names_and_shapes():
    with torch.device("meta"):
        full = LongCatAvatarDiT()
    lin = {n: (m.out_features, m.in_features) for n, m in full.named_modules() if isinstance(m, nn.Linear)}
    want = naming.expected_shapes(naming.OFFICIAL, avatar=True)
    assert {k: lin[k] for k in want} == want
    tiny = LongCatAvatarDiT(CFG)
    tlin = {n: (m.out_features, m.in_features) for n, m in tiny.named_modules() if isinstance(m, nn.Linear)}
    assert all(tlin[k] == v for k, v in naming.expected_shapes(DIMS, avatar=True).items())


# ------------------------------------------------------------------ inspect and convert through the CLI


def test_inspect_says_avatar_like_with_shapes_checked(avatar_lora, tmp_path):
    r = json.loads(cli("inspect", avatar_lora, "--json").stdout)
    assert r["looks_like"] == "avatar-like"
    assert r["modules"] == 4 * 7 + len(_audio_modules(4))
    assert r["dims"]["audio"] == DIMS.audio and r["dims"]["audio_proj_vf_in"] == DIMS.audio_proj_vf_in
    f = "\n".join(r["findings"])
    assert f"{len(_audio_modules(4))} modules are LongCat-Video-Avatar audio modules" in f
    assert "every module's shape is consistent with that DiT" in f
    assert "not Linear layers" not in f
    assert r["coverage"]["audio_cross_attn.kv_linear"] == "0-3"
    # a misshapen audio module is named against the Avatar DiT's shape
    sd = load_file(avatar_lora)
    key = "lora___lorahyphen___blocks___lorahyphen___2___lorahyphen___audio_cross_attn___lorahyphen___kv_linear"
    sd[f"{key}.lora_down.weight"] = torch.zeros(8, DIMS.audio + 1)
    from safetensors.torch import save_file
    bad = str(tmp_path / "bad.safetensors")
    save_file(sd, bad)
    r = json.loads(cli("inspect", bad, "--json").stdout)
    f = "\n".join(r["findings"])
    assert (f"blocks.2.audio_cross_attn.kv_linear [{2 * DIMS.hidden}, {DIMS.audio + 1}] "
            f"(expected [{2 * DIMS.hidden}, {DIMS.audio}])") in f


def test_inspect_checks_official_avatar_sizes(tmp_path):
    path = write_native_lora(str(tmp_path / "a.safetensors"), "avatar",
                             dims=dataclasses.replace(naming.OFFICIAL, depth=1), rank=1, dtype=torch.bfloat16)
    r = json.loads(cli("inspect", path, "--json").stdout)
    assert r["looks_like"] == "avatar-like"
    assert (r["dims"]["audio"], r["dims"]["audio_proj_in"], r["dims"]["audio_proj_vf_in"], r["dims"]["audio_inter"],
            r["dims"]["audio_proj_out"]) == (768, 46080, 73728, 512, 24576)
    assert "every module's shape is consistent with that DiT" in r["findings"]


def test_cfg_step_and_refinement_detection_unchanged(native):
    assert json.loads(cli("inspect", native("cfg_step"), "--json").stdout)["looks_like"] == "cfg_step-like"
    assert json.loads(cli("inspect", native("refinement"), "--json").stdout)["looks_like"] == "refinement-like"


def test_convert_to_fastvideo_refuses_naming_audio_modules(avatar_lora, tmp_path):
    out = str(tmp_path / "fv.safetensors")
    p = cli("convert", avatar_lora, out, "--to", "fastvideo", check=2)
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert f"{len(_audio_modules(4))} modules have no name in FastVideo's naming" in p.stderr
    assert "audio_proj.proj1" in p.stderr and "--skip-unmapped" in p.stderr
    assert not os.path.exists(out)
    p = cli("convert", avatar_lora, out, "--to", "fastvideo", "--skip-unmapped")
    skipped = sorted(line.removeprefix("skipped (no name in fastvideo): ")
                     for line in p.stderr.splitlines() if line.startswith("skipped"))
    assert skipped == _audio_modules(4)
    keys = load_file(out).keys()
    assert not any("audio" in k for k in keys) and any("self_attn.to_q" in k for k in keys)
    base = {k: v for k, v in official_delta(avatar_lora).items() if "audio" not in k}
    back = str(tmp_path / "back.safetensors")
    cli("convert", out, back, "--to", "longcat")
    assert worst(base, official_delta(back)) < 1e-6


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "kohya", "wanvideo", "longcat"])
def test_other_formats_keep_audio_modules_bit_exact(avatar_lora, tmp_path, fmt):
    mid, back = str(tmp_path / f"mid.{fmt}"), str(tmp_path / "back.safetensors")
    cli("convert", avatar_lora, mid, "--to", fmt)
    cli("convert", mid, back, "--to", "longcat")
    a, b = load_file(avatar_lora), load_file(back)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert sum("audio" in k for k in a) == 4 * (5 + 3 + 4 + 3) + 4 * 3  # the audio modules' keys are there
    if fmt == "wanvideo":  # under the wrapper's names for them (an independent table)
        mids = {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in load_file(mid)}
        assert {"blocks.0.audio_modulation.1", "blocks.0.audio_cross_attn.kv_linear",
                "multitalk_audio_proj.proj1_vf"} <= mids and not any("audio_adaLN" in m for m in mids)


# ------------------------------------------------------------------ runtime on the Avatar DiT


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, CFG.in_channels, 2, 4, 4, generator=g)
    t = torch.tensor([800.0, 150.0])
    y = torch.randn(2, 1, 6, CFG.caption_channels, generator=g)
    audio = torch.randn(2, 2, DIMS.audio_proj_vf_in, generator=g)
    return x, t, y, None, audio


_RUNS = DitRuns(_inputs)
_run, _official = _RUNS.run, _RUNS.official


@pytest.fixture(scope="module")
def avatar_models():
    torch.manual_seed(0)
    fp = LongCatAvatarDiT(CFG).eval()
    return fp, ref_quantize_model(copy.deepcopy(fp))


@pytest.fixture(scope="module")
def audio_only(tmp_path_factory, avatar_lora):
    """The avatar LoRA's audio modules alone (native), and the whole LoRA in PEFT form."""
    d = tmp_path_factory.mktemp("audio_only")
    from safetensors.torch import save_file
    sd = {k: v for k, v in load_file(avatar_lora).items() if "audio" in k}
    path = str(d / "audio.safetensors")
    save_file(sd, path)
    peft = str(d / "avatar.peft")
    L.convert(avatar_lora, peft, "peft")
    return path, peft


@pytest.mark.parametrize("which", [0, 1], ids=["float", "int8"])
def test_apply_on_avatar_dit_matches_official(avatar_models, avatar_lora, audio_only, which):
    model = avatar_models[which]
    audio_path, peft = audio_only
    base = _run(model)
    assert rel_err(_official(model, [(audio_path, 0.8)]), base) > 1e-3  # the audio modules matter
    want = _official(model, [(avatar_lora, 0.8)])
    for lora in (avatar_lora, peft, audio_path):
        if lora == audio_path:
            want = _official(model, [(audio_path, 0.8)])
        name = L.apply_lora(model, lora, 0.8)
        assert rel_err(want, _run(model)) <= 1e-5, lora
        L.remove_lora(model, name)
    assert torch.equal(_run(model), base)
