"""Issue 18: the LoRAs the LongCat-Video ecosystem writes, read exactly; `--to wanvideo` for ComfyUI's model.

Inputs are full-structure files (48 blocks, every module type the producer trains) made from a native
LoRA in each producer's own key form (longcat_lora.testing.producers, written from their save code):
DiffSynth-Studio, musubi-tuner, diffusion-pipe. Each is inspected (naming and producer named), converted
to every format through the real CLI and verified against the native original, and its weight change
equals an independent float64 reference read with the real safetensors library (tests/reference.py).
Bad inputs in these forms are one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import longcat_lora as L
from longcat_lora.testing import producers

from conftest import DIMS, cli
from reference import WANVIDEO_LAYERS, lora_delta, official_delta, worst

OUTPUTS = ("longcat", "fastvideo", "peft", "diffusers", "kohya", "wanvideo")


@pytest.fixture(scope="module")
def wild(tmp_path_factory):
    """The native originals and each producer's form of them (bf16, alpha_scale 0.5 as published)."""
    from longcat_lora.testing.fixtures import write_native_lora

    d = tmp_path_factory.mktemp("wild")
    ref = write_native_lora(str(d / "refinement.safetensors"), "refinement", dims=DIMS, rank=4,
                            dtype=torch.bfloat16, alpha_scale=0.5, seed=41)
    cfg = write_native_lora(str(d / "cfg_step.safetensors"), "cfg_step", dims=DIMS, rank=4,
                            dtype=torch.bfloat16, alpha_scale=0.5, seed=42)
    files = {
        "diffsynth": (producers.diffsynth(ref, str(d / "diffsynth.safetensors")), ref),
        "diffsynth_pipe_dit": (producers.diffsynth(ref, str(d / "ds_pipe.safetensors"), prefix="pipe.dit."), ref),
        "musubi": (producers.musubi(cfg, str(d / "musubi.safetensors")), cfg),
        "diffusion_pipe": (producers.diffusion_pipe(cfg, str(d / "dpipe")), cfg),
    }
    return d, files


@pytest.mark.parametrize("name, fmt, naming, producer", [
    ("diffsynth", "diffsynth", "LongCat's original names", "DiffSynth-Studio"),
    ("diffsynth_pipe_dit", "diffsynth", "LongCat's original names", "DiffSynth-Studio"),
    ("musubi", "kohya", "kohya's lora_unet_", "musubi-tuner"),
    ("diffusion_pipe", "wanvideo", "ComfyUI-WanVideoWrapper's Wan-style names", "diffusion-pipe"),
])
def test_inspect_names_the_form_the_naming_and_the_producer(wild, name, fmt, naming, producer):
    d, files = wild
    path, native = files[name]
    r = json.loads(cli("inspect", path, "--json").stdout)
    assert r["format"] == fmt and naming in r["naming"], (r["format"], r["naming"])
    assert any(producer in p for p in r["producer"]), r["producer"]
    assert r["modules"] == len(official_delta(native))
    assert "every module's shape is consistent with that DiT" in r["findings"]
    assert not any("not modules of LongCat" in f for f in r["findings"])


@pytest.mark.parametrize("name", ["diffsynth", "diffsynth_pipe_dit", "musubi", "diffusion_pipe"])
def test_each_producer_form_is_read_exactly_and_converts_to_every_format(wild, tmp_path, name):
    d, files = wild
    path, native = files[name]
    want = official_delta(native)
    got = lora_delta(path)  # the independent reference of the producer's own form
    assert worst(want, got) == 0.0
    with L.load_lora(path) as a:  # ours, read lazily
        assert worst(want, {m.name: m.delta() for m in a.modules.values()}) == 0.0
    for to in OUTPUTS:
        out = tmp_path / (to if to == "peft" else f"{to}.safetensors")
        cli("convert", path, out, "--to", to)
        assert worst(want, lora_delta(str(out))) <= 1e-7, to
        p = cli("verify", native, out)
        assert "equivalent" in p.stdout and "NOT" not in p.stdout, (to, p.stdout)


def test_diffsynth_with_a_dense_up_matrix_and_an_alpha(tmp_path):
    """A trained DiffSynth qkv has a dense lora_B (one LoRA of rank 3r): kept whole, exact; an alpha key
    scales by alpha / rank as its loader does."""
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(12, DIMS.hidden, generator=g), torch.randn(3 * DIMS.hidden, 12, generator=g)
    path = str(tmp_path / "d.safetensors")
    save_file({"blocks.0.attn.qkv.lora_A.default.weight": A, "blocks.0.attn.qkv.lora_B.default.weight": B,
               "blocks.1.ffn.w1.lora_A.default.weight": A[:4].clone(),
               "blocks.1.ffn.w1.lora_B.default.weight": torch.randn(DIMS.ffn, 4, generator=g)}, path)
    with L.load_lora(path) as a:
        m = a.modules["blocks.0.attn.qkv"]
        assert len(m.parts) == 1 and torch.equal(m.delta(), B.double() @ A.double())
    out = str(tmp_path / "n.safetensors")
    cli("convert", path, out, "--to", "longcat")
    assert worst(lora_delta(path), official_delta(out)) == 0.0
    save_file({"dit.blocks.0.attn.qkv.lora_A.weight": A, "dit.blocks.0.attn.qkv.lora_B.weight": B,
               "dit.blocks.0.attn.qkv.alpha": torch.tensor(3.0)}, path)
    with L.load_lora(path) as a:
        assert torch.equal(a.modules["blocks.0.attn.qkv"].delta(), 0.25 * (B.double() @ A.double()))


def test_wanvideo_output_is_the_wrappers_form(wild, tmp_path):
    """`--to wanvideo` (and its other name, comfyui): the wrapper's names from an independent table, each
    split layer its slice of the down matrix and its up block, alpha / rank = the part's scale exactly,
    diffusion_model. prefix, keys ending .weight / .alpha; and alpha_scale 0.3 (no float32 alpha / rank
    gives it) still exact in float64."""
    d, files = wild
    native = str(d / "refinement.safetensors")
    out = str(tmp_path / "w.safetensors")
    cli("convert", native, out, "--to", "wanvideo")
    sd = load_file(out)
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in sd)
    want_layers = {t.format(i=i) for suffix, ts in WANVIDEO_LAYERS.items()
                   if "audio" not in suffix and "cross_attn.proj" not in suffix  # (the refinement layout)
                   for i in range(DIMS.depth) for t in ts}
    got_layers = {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in sd if k.endswith(".lora_down.weight")}
    assert got_layers == want_layers
    nat = load_file(native)
    key = "lora___lorahyphen___blocks___lorahyphen___5___lorahyphen___attn___lorahyphen___qkv"
    for j, part in enumerate("qkv"):
        layer = f"diffusion_model.blocks.5.self_attn.{part}"
        assert torch.equal(sd[f"{layer}.lora_down.weight"], nat[f"{key}.lora_down.weight"][j * 4:(j + 1) * 4])
        assert torch.equal(sd[f"{layer}.lora_up.weight"], nat[f"{key}.lora_up.blocks.{j}.weight"])
        assert float(sd[f"{layer}.alpha"]) / 4 == 0.5
    ada = "diffusion_model.blocks.5.modulation.1"
    assert sd[f"{ada}.lora_down.weight"].shape == (24, DIMS.adaln)  # whole down, block-diagonal up
    assert float(sd[f"{ada}.alpha"]) / 24 == 0.5
    cli("convert", native, str(tmp_path / "c.safetensors"), "--to", "comfyui")
    assert open(str(tmp_path / "c.safetensors"), "rb").read() == open(out, "rb").read()
    odd = L.testing.fixtures.write_native_lora(str(tmp_path / "odd.safetensors"), "cfg_step", dims=DIMS, rank=3,
                                               dtype=torch.float32, alpha_scale=0.3, seed=5)
    cli("convert", odd, str(tmp_path / "w3.safetensors"), "--to", "wanvideo")
    w3 = load_file(str(tmp_path / "w3.safetensors"))
    scale = float(torch.tensor(0.3, dtype=torch.float32))  # the native file's alpha_scale, a float32
    for k, v in w3.items():
        if k.endswith(".alpha"):
            assert float(v.double()) / w3[k.removesuffix("alpha") + "lora_down.weight"].shape[0] == scale, k
    assert worst(official_delta(odd), lora_delta(str(tmp_path / "w3.safetensors"))) == 0.0


def test_inspect_warns_that_the_official_names_do_not_load_in_comfyui(wild, tmp_path):
    d, _ = wild
    out = str(tmp_path / "k.safetensors")
    cli("convert", str(d / "refinement.safetensors"), out, "--to", "kohya")
    r = json.loads(cli("inspect", out, "--json").stdout)
    note = [f for f in r["findings"] if "ComfyUI's LongCat model" in f]
    assert len(note) == 1 and "attn.qkv" in note[0] and "--to wanvideo" in note[0]
    assert "only ffn.w1, ffn.w2, ffn.w3 would apply" in note[0]
    w = str(tmp_path / "w.safetensors")
    cli("convert", out, w, "--to", "wanvideo")
    r = json.loads(cli("inspect", w, "--json").stdout)
    assert not any("ComfyUI's LongCat model" in f for f in r["findings"])
    assert any("merge_loras" in f for f in r["findings"])  # its final-layer modules need the merged path


# ------------------------------------------------------------------ bad input in the wild forms

def _bad(tmp_path, sd, needle, name="bad.safetensors"):
    path = tmp_path / name
    save_file(sd, str(path))
    out = tmp_path / "out.safetensors"
    p = cli("convert", path, out, "--to", "longcat", check=2)
    assert p.stderr.count("\n") == 1 and str(path) in p.stderr and needle in p.stderr, p.stderr
    assert not out.exists() and "Traceback" not in p.stderr
    return p.stderr


def test_wild_bad_inputs_are_one_line_and_exit_2(tmp_path):
    H = DIMS.hidden
    r = lambda *s: torch.randn(*s)  # noqa: E731
    # the wrapper's names: q and k of one block disagree in input size
    _bad(tmp_path, {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": r(2, H),
                    "diffusion_model.blocks.0.self_attn.q.lora_up.weight": r(H, 2),
                    "diffusion_model.blocks.0.self_attn.k.lora_down.weight": r(2, H + 1),
                    "diffusion_model.blocks.0.self_attn.k.lora_up.weight": r(H, 2)}, "blocks.0.attn.qkv")
    # a kohya underscore name that matches no module
    err = _bad(tmp_path, {"lora_unet_blocks_0_attn_qkvz.lora_down.weight": r(2, H),
                          "lora_unet_blocks_0_attn_qkvz.lora_up.weight": r(3 * H, 2)}, "blocks_0_attn_qkvz")
    assert "not modules of LongCat-Video" in err
    # a lora_B without its lora_A (DiffSynth's form)
    _bad(tmp_path, {"blocks.0.attn.qkv.lora_B.default.weight": r(3 * H, 2)}, "blocks.0.attn.qkv")
    # alphas that are zero, negative or not finite
    for alpha in (0.0, -2.0, float("inf"), float("nan")):
        _bad(tmp_path, {"diffusion_model.blocks.0.ffn.w1.lora_down.weight": r(2, H),
                        "diffusion_model.blocks.0.ffn.w1.lora_up.weight": r(DIMS.ffn, 2),
                        "diffusion_model.blocks.0.ffn.w1.alpha": torch.tensor(alpha)}, "blocks.0.ffn.w1.alpha")
    # a DiffSynth file whose adapter segment differs between its tensors
    _bad(tmp_path, {"blocks.0.ffn.w1.lora_A.default.weight": r(2, H),
                    "blocks.0.ffn.w1.lora_B.default.weight": r(DIMS.ffn, 2),
                    "blocks.0.ffn.w2.lora_A.other.weight": r(2, DIMS.ffn),
                    "blocks.0.ffn.w2.lora_B.other.weight": r(H, 2)}, "blocks.0.ffn.w2.lora_A.other.weight")
    # two names for one weight: FastVideo's to_q beside the fused attn.qkv
    _bad(tmp_path, {"blocks.0.self_attn.to_q.lora_A": r(2, H), "blocks.0.self_attn.to_q.lora_B": r(H, 2),
                    "blocks.0.attn.qkv.lora_A": r(2, H), "blocks.0.attn.qkv.lora_B": r(3 * H, 2)},
         "two names for one weight")


def test_unknown_modules_are_refused_by_merge_apply_and_the_algebra(tmp_path):
    """The unknown-module rule through the CLI: merge, resize and combine refuse (one line), and
    --skip-unmapped leaves the module out and says so; apply_lora refuses in the library."""
    from longcat_lora.testing.dit import TINY
    from longcat_lora.testing.fixtures import write_base_checkpoint

    H = TINY.dims.hidden
    g = torch.Generator().manual_seed(1)
    lora = str(tmp_path / "l.safetensors")
    save_file({"diffusion_model.blocks.0.ffn.w1.lora_down.weight": torch.randn(2, H, generator=g),
               "diffusion_model.blocks.0.ffn.w1.lora_up.weight": torch.randn(TINY.dims.ffn, 2, generator=g),
               "diffusion_model.blocks.0.self_attn.qq.lora_down.weight": torch.randn(2, H, generator=g),
               "diffusion_model.blocks.0.self_attn.qq.lora_up.weight": torch.randn(H, 2, generator=g)}, lora)
    base = write_base_checkpoint(str(tmp_path / "base"), TINY, "longcat", shards=1, dtype=torch.float32)
    for args in (("merge", base, tmp_path / "m", "--lora", lora), ("resize", lora, tmp_path / "r.safetensors", "--rank", "1"),
                 ("combine", tmp_path / "c.safetensors", "--lora", lora, "--lora", lora)):
        p = cli(*args, check=2)
        assert p.stderr.count("\n") == 1 and "blocks.0.self_attn.qq" in p.stderr and "--skip-unmapped" in p.stderr, p.stderr
        assert "not modules of LongCat-Video" in p.stderr and "'qq' is no layer there" in p.stderr
        assert not os.path.exists(args[2] if args[0] != "combine" else args[1])
    p = cli("merge", base, tmp_path / "m", "--lora", lora, "--skip-unmapped")
    assert "blocks.0.self_attn.qq" in p.stderr and "1 weights changed" in p.stdout
    from longcat_lora.testing.dit import LongCatDiT

    with pytest.raises(L.LoraError, match="not modules of LongCat-Video"):
        L.apply_lora(LongCatDiT(TINY), lora)


def _many(path, n: int) -> str:
    """A LoRA-looking file of n tiny tensors (FastVideo-style names, 2 per layer)."""
    import struct

    parts = [f'"blocks.{i // 2}.x.lora_{"AB"[i % 2]}":{{"dtype":"F32","shape":[1,1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
             for i in range(n)]
    raw = ("{" + ",".join(parts) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * n))
    return str(path)


def test_a_lora_with_more_tensors_than_any_longcat_lora_is_refused_before_parsing(tmp_path, monkeypatch):
    """Issue 18 item 6: a hostile file of a million tiny tensors took minutes and gigabytes; a LoRA input
    with more entries than MAX_LORA_TENSORS (no LongCat LoRA has a 25th of that) is one line, exit 2,
    before its header is parsed. The count is of objects in the header, so no key spelling escapes it."""
    import time

    from longcat_lora.formats import registry

    big = _many(tmp_path / "big.safetensors", registry.MAX_LORA_TENSORS + 1)
    for args in (("inspect", big), ("convert", big, tmp_path / "o.safetensors", "--to", "longcat")):
        t = time.perf_counter()
        p = cli(*args, check=2)
        assert p.stderr.count("\n") == 1 and "more than 65,536 tensor entries" in p.stderr, p.stderr
        assert time.perf_counter() - t < 30  # (a generous bound for a loaded machine: it takes ~0.3 s)
    assert not (tmp_path / "o.safetensors").exists()
    # the edge, in process: the cap itself is read, one more is refused, spelled keys counted too
    monkeypatch.setattr(registry, "MAX_LORA_TENSORS", 6)
    with L.load_lora(_many(tmp_path / "six.safetensors", 6)) as a:
        assert len(a.modules) == 3
    with pytest.raises(L.LoraError, match="more than 6 tensor entries"):
        L.load_lora(_many(tmp_path / "seven.safetensors", 7))
    data = open(_many(tmp_path / "s.safetensors", 8), "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].replace(b'"data_offsets"', b'"data\\u005foffsets"')  # the same key, spelled
    header += b" " * (-len(header) % 8)
    spelled = tmp_path / "spelled.safetensors"
    spelled.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n:])
    monkeypatch.setattr(registry, "MAX_LORA_TENSORS", 8)
    with L.load_lora(str(spelled)) as a:  # a valid file (json reads the escape), 8 entries: read
        assert len(a.files[0].tensors) == 8
    monkeypatch.setattr(registry, "MAX_LORA_TENSORS", 7)
    with pytest.raises(L.LoraError, match="more than 7 tensor entries"):
        L.load_lora(str(spelled))


def test_convert_to_wanvideo_says_when_the_wrappers_unmerged_path_would_skip_modules(wild, tmp_path):
    """Measured with the wrapper's own code: its unmerged LoRA path attaches nothing to head.* layers (the
    final layer), silently; convert says so on stderr, and only then."""
    d, _ = wild
    p = cli("convert", str(d / "refinement.safetensors"), tmp_path / "r.safetensors", "--to", "comfyui")
    assert "note: ComfyUI-WanVideoWrapper applies head.head, head.modulation.1 only with merge_loras on" in p.stderr
    p = cli("convert", str(d / "cfg_step.safetensors"), tmp_path / "c.safetensors", "--to", "wanvideo")
    assert "note:" not in p.stderr


def test_alphas_give_the_scale_exactly_where_a_float64_can():
    """kohya / wanvideo / PEFT loaders compute alpha / rank: the alpha written gives the part's scale exactly
    in float64 whenever any float64 near scale * rank does (checked against the 9 neighbours), and is within
    one float64 ulp otherwise (0.1 at rank 3: no float64 alpha gives it); never <= 0 where loaders read 0
    as "no alpha"."""
    import math
    import random

    from longcat_lora.formats._common import exact_alpha

    rnd = random.Random(3)
    scales = [0.5, 0.3, 0.1, 0.37, 1 / 3, float(torch.tensor(0.3, dtype=torch.float32))] + [rnd.uniform(1e-3, 4)
                                                                                             for _ in range(300)]
    inexact = 0
    for s in scales:
        for r in (1, 3, 4, 6, 7, 128, 384, 768):
            a = exact_alpha(s, r)
            near = [s * r]
            for _ in range(4):
                near = [near[0], *near, near[-1]]
                near[0], near[-1] = math.nextafter(near[0], 0.0), math.nextafter(near[-1], math.inf)
            possible = any(x / r == s for x in near)
            assert a > 0 and (a / r == s) == possible, (s, r, a)
            assert abs(a / r - s) <= math.ulp(s)
            inexact += not possible
    assert inexact > 0  # (0.1 at rank 3 is one)
    assert exact_alpha(0.0, 4) is None and exact_alpha(-0.5, 4) is None and exact_alpha(-0.5, 4, positive=False) == -2.0
