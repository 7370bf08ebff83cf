"""Runtime: apply / strength / remove / merge / unmerge on the reference DiT in both namings, against
the official LoRANetwork semantics (longcat_lora.official)."""

from functools import partial
import pytest
import torch
from torch import nn

import longcat_lora as L
from longcat_lora.model import naming
from longcat_lora.testing.dit import TINY, LongCatDiT, LongCatDiTSplit, convert_state_dict
from longcat_lora.testing.fixtures import write_native_lora

from dit_runs import DitRuns, dit_batch
from reference import half_ulp, official_delta, rel_err

CFG = TINY


_inputs = partial(dit_batch, CFG)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    fused = LongCatDiT(CFG).eval()
    split = LongCatDiTSplit(CFG).eval()
    split.load_state_dict(convert_state_dict(fused.state_dict(), "fastvideo"))
    return fused, split


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    ref = write_native_lora(str(d / "ref.safetensors"), "refinement", dims=CFG.dims, rank=4, dtype=torch.float32,
                            alpha_scale=0.5, seed=1)
    cfg = write_native_lora(str(d / "cfg.safetensors"), "cfg_step", dims=CFG.dims, rank=6, dtype=torch.float32,
                            alpha_scale=0.3, seed=2)
    out = {"ref": ref, "cfg": cfg}
    for name, src in (("ref", ref), ("cfg", cfg)):
        for fmt in ("fastvideo", "peft", "kohya", "diffusers"):
            out[f"{name}.{fmt}"] = str(d / f"{name}.{fmt}")
            L.convert(src, out[f"{name}.{fmt}"], fmt)
    return out


_RUNS = DitRuns(_inputs)
_run, _official = _RUNS.run, _RUNS.official


def test_split_and_fused_models_agree_and_convert(models):
    fused, split = models
    assert rel_err(_run(fused), _run(split)) < 1e-6
    sd = fused.state_dict()
    back = convert_state_dict(convert_state_dict(sd, "fastvideo"), "longcat")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_official_linear_names_and_shapes(models):
    fused, split = models
    lin = {n: (m.out_features, m.in_features) for n, m in fused.named_modules() if isinstance(m, nn.Linear)}
    for module, shape in naming.expected_shapes(CFG.dims).items():
        assert lin[module] == shape, module
    slin = {n for n, m in split.named_modules() if isinstance(m, nn.Linear)}
    for module in naming.expected_shapes(CFG.dims):
        assert set(naming.layers(module, naming.Scheme.FASTVIDEO)) <= slin


@pytest.mark.parametrize("layout", ["ref", "cfg"])
def test_parity_all_paths(models, loras, layout):
    """official (fused + native) == apply_lora on fused (every format) == split + FastVideo form ==
    merged; multiplier 0.7, <= 1e-5 relative in fp32."""
    fused, split = models
    base = _run(fused)
    want = _official(fused, [(loras[layout], 0.7)])
    assert rel_err(want, base) > 1e-3  # the LoRA changes the output measurably
    errs = {}
    for fmt in ("", ".fastvideo", ".peft", ".kohya", ".diffusers"):
        name = L.apply_lora(fused, loras[layout + fmt], strength=0.7)
        errs["fused" + fmt] = rel_err(want, _run(fused))
        L.remove_lora(fused, name)
        name = L.apply_lora(split, loras[layout + fmt], strength=0.7)
        errs["split" + fmt] = rel_err(want, _run(split))
        L.remove_lora(split, name)
    for model, label in ((fused, "merged fused"), (split, "merged split")):
        L.merge_lora(model, loras[layout + ".fastvideo"], strength=0.7)
        errs[label] = rel_err(want, _run(model))
        L.unmerge_lora(model)
    assert max(errs.values()) <= 1e-5, errs
    assert rel_err(_run(fused), base) == 0.0


def test_two_adapters_at_once_and_strengths(models, loras):
    fused, split = models
    want = _official(fused, [(loras["ref"], 0.7), (loras["cfg"], -1.3)])
    want2 = _official(fused, [(loras["ref"], 0.7), (loras["cfg"], 2.0)])
    want_ref = _official(fused, [(loras["ref"], 0.7)])
    a = L.apply_lora(fused, loras["ref"], 0.7)
    b = L.apply_lora(fused, loras["cfg.peft"], -1.3)
    assert L.active_loras(fused) == {a: 0.7, b: -1.3}
    assert rel_err(want, _run(fused)) <= 1e-5
    L.apply_lora(split, loras["ref.fastvideo"], 0.7, name="r")
    L.apply_lora(split, loras["cfg"], -1.3, name="c")
    assert rel_err(want, _run(split)) <= 1e-5
    # strength changes follow the official multiplier
    L.set_lora_strength(fused, b, 2.0)
    assert rel_err(want2, _run(fused)) <= 1e-5
    L.set_lora_strength(fused, a, 0.0)
    L.set_lora_strength(fused, b, 0.0)
    base_out = _run(fused)
    L.remove_lora(fused)
    assert torch.equal(base_out, _run(fused))
    L.remove_lora(split, "c")
    assert rel_err(want_ref, _run(split)) <= 1e-5
    L.remove_lora(split)
    with pytest.raises(L.LoraError):
        L.set_lora_strength(split, "c", 1.0)


def test_remove_restores_outputs_and_state_dict_exactly(models, loras):
    fused, _ = models
    sd = {k: v.clone() for k, v in fused.state_dict().items()}
    before = _run(fused)
    L.apply_lora(fused, loras["ref.kohya"], 1.5)
    assert fused.state_dict().keys() == sd.keys()  # hooks: no new parameters or buffers
    L.merge_lora(fused, loras["cfg"], 0.5)
    assert not torch.equal(before, _run(fused))
    L.remove_lora(fused)
    assert torch.equal(before, _run(fused))
    assert all(torch.equal(sd[k], v) for k, v in fused.state_dict().items())


def test_merge_is_fp32_cast_once_and_unmerge_bit_exact(loras):
    torch.manual_seed(3)
    m = LongCatDiT(CFG).cast(torch.bfloat16)
    orig = {k: v.clone() for k, v in m.state_dict().items()}
    L.merge_lora(m, loras["ref.peft"], strength=0.9)
    ref = official_delta(loras["ref"])  # independent float64 reference
    dW, dA = ref["blocks.3.attn.qkv"], ref["blocks.3.adaLN_modulation.1"]
    w = orig["blocks.3.attn.qkv.weight"]
    want = w.double() + 0.9 * dW
    got = m.state_dict()["blocks.3.attn.qkv.weight"]
    # fp32 then cast once: within half a bf16 ulp of the exact value (a second rounding could be a whole ulp)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - want).abs() <= half_ulp(want, torch.bfloat16) * (1 + 2 ** -10)
            + 2e-7 * (w.double().abs() + dW.abs())).all()
    wa = orig["blocks.3.adaLN_modulation.1.weight"]
    assert wa.dtype == torch.float32  # kept fp32 like the official autocast
    assert torch.allclose(m.state_dict()["blocks.3.adaLN_modulation.1.weight"].double(), wa.double() + 0.9 * dA,
                          rtol=0, atol=1e-6)
    L.unmerge_lora(m)
    assert all(torch.equal(orig[k], v) for k, v in m.state_dict().items())


def test_bf16_parity_figure(loras, capsys):
    torch.manual_seed(0)
    m = LongCatDiT(CFG)
    ref32 = _official(m, [(loras["ref"], 0.7)])
    m.cast(torch.bfloat16)
    official = _official(m, [(loras["ref"], 0.7)])
    L.apply_lora(m, loras["ref.fastvideo"], 0.7)
    ours = _run(m)
    L.remove_lora(m)
    e_between, e_vs32 = rel_err(official, ours), rel_err(ref32, ours)
    print(f"bf16: apply_lora vs official (both bf16) {e_between:.2e}; vs fp32 official {e_vs32:.2e}")
    assert e_between < 2e-2 and e_vs32 < 5e-2


def test_missing_targets_raise_listing_them_and_touch_nothing(tmp_path, models, loras):
    from safetensors.torch import load_file, save_file

    fused, split = models
    sd = load_file(loras["cfg"])
    audio = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___audio_attn___lorahyphen___qkv"
    sd[f"{audio}.lora_down.weight"] = torch.randn(2, 64)
    sd[f"{audio}.lora_up.weight"] = torch.randn(64, 2)
    path = str(tmp_path / "avatar.safetensors")
    save_file(sd, path)
    for model in (fused, split):
        with pytest.raises(L.LoraError, match="blocks.0.audio_attn.qkv"):
            L.apply_lora(model, path)
        assert L.active_loras(model) == {}
        assert not any(m._forward_hooks for m in model.modules())
        with pytest.raises(L.LoraError, match="audio_attn"):
            L.merge_lora(model, path)
    name = L.apply_lora(fused, path, skip_missing=True)
    assert L.active_loras(fused) == {name: 1.0}
    L.remove_lora(fused)
    # shapes checked first: a LoRA for a wider model
    wide = write_native_lora(str(tmp_path / "wide.safetensors"), "cfg_step",
                             dims=naming.DitDims(hidden=128, ffn=352, adaln=32, final_out=16, depth=2), rank=2)
    with pytest.raises(L.LoraError, match="do not fit"):
        L.apply_lora(fused, wide)
    assert not any(m._forward_hooks for m in fused.modules())


class ReplicatedLinear(nn.Module):
    """Shaped like FastVideo's layers: a weight [out, in], forward returns (output, output_bias)."""

    def __init__(self, inp, out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, inp) * 0.05)
        self.bias = nn.Parameter(torch.zeros(out))

    def forward(self, x):
        return x @ self.weight.T + self.bias, None


def test_fastvideo_style_layers_returning_tuples(loras):
    """A model whose split layers are not nn.Linear and return (out, bias), as FastVideo's do."""
    h = CFG.hidden_size
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module() for _ in range(CFG.depth)])
    for b in model.blocks:
        b.self_attn = nn.Module()
        for n in ("to_q", "to_k", "to_v"):
            setattr(b.self_attn, n, ReplicatedLinear(h, h))
    x = torch.randn(3, h)
    dW = official_delta(loras["cfg"])["blocks.4.attn.qkv"].float()  # independent float64 reference
    with L.load_lora(loras["cfg"]) as a:
        for k in [k for k in a.modules if not k.endswith("attn.qkv") or "cross" in k]:
            del a.modules[k]  # keep only self-attention qkv, which this model has
        L.apply_lora(model, a, 0.5)
    layer = model.blocks[4].self_attn.to_k
    with torch.no_grad():
        out, bias = layer(x)
        want = x @ (layer.weight + 0.5 * dW[h:2 * h]).T + layer.bias
    assert bias is None and rel_err(want, out) < 1e-6
    L.merge_lora(model, loras["cfg.fastvideo"], 1.0, skip_missing=True)
    L.remove_lora(model)
    with torch.no_grad():
        assert torch.equal(layer(x)[0], x @ layer.weight.T + layer.bias)
