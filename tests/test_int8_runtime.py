"""The runtime on LongCat's INT8 DiT (QuantizedLinear layers: weight_int8 + weight_scale, no weight),
checked against an INT8 layer and quantizer written independently from the spec (int8_reference.py)
and the official LoRA semantics (longcat_lora.official) on the same INT8 model."""

from functools import partial
import copy
import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import longcat_lora as L
from longcat_lora.apply import int8
from longcat_lora.testing.dit import (TINY, LongCatDiT, LongCatDiTSplit, QuantizedLinear, convert_state_dict,
    quantize_dit)
from longcat_lora.errors import LoraError
from longcat_lora.testing.fixtures import write_native_lora

from int8_reference import RefQuantizedLinear, ref_dequant64, ref_quantize, ref_quantize_model
from dit_runs import DitRuns, dit_batch
from reference import official_delta, rel_err

CFG = dataclasses.replace(TINY, depth=4)
SEP = "___lorahyphen___"
# a row's worst error is half a step, plus fp32 rounding of w / scale (|w / scale| <= 127, 2^-24 relative)
HALF_STEP = 0.5 + 127 * 2.0 ** -24


_inputs = partial(dit_batch, CFG)


_RUNS = DitRuns(_inputs)
_run, _official = _RUNS.run, _RUNS.official


def _int8_buffers(model):
    return {n: (m.weight_int8.clone(), m.weight_scale.clone()) for n, m in model.named_modules()
            if hasattr(m, "weight_int8")}


@pytest.fixture(scope="module")
def fp32_model():
    torch.manual_seed(0)
    return LongCatDiT(CFG).eval()


@pytest.fixture(scope="module")
def int8_model(fp32_model):
    """The INT8 DiT built by the test's own quantizer: the runtime never saw this layer class."""
    return ref_quantize_model(copy.deepcopy(fp32_model))


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("int8loras")
    ref = write_native_lora(str(d / "ref.safetensors"), "refinement", dims=CFG.dims, rank=4, dtype=torch.float32,
                            alpha_scale=0.5, seed=1)
    cfg = write_native_lora(str(d / "cfg.safetensors"), "cfg_step", dims=CFG.dims, rank=6, dtype=torch.float32,
                            alpha_scale=0.3, seed=2)
    out = {"ref": ref, "cfg": cfg}
    for fmt in ("fastvideo", "peft"):
        out[f"ref.{fmt}"] = str(d / f"ref.{fmt}")
        L.convert(ref, out[f"ref.{fmt}"], fmt)
    return out


# ------------------------------------------------------------------ the quantizer and the layer


def test_quantize_rows_is_the_official_scheme():
    s = 0.01
    # absmax 1.27 -> scale exactly representable 0.01-ish; ties at 0.5, 1.5, 2.5, -2.5 round half to even
    w = torch.tensor([[127 * s, 0.5 * s, 1.5 * s, 2.5 * s, -2.5 * s, -127 * s],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    q, scale = int8.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale[1].item() == pytest.approx(1e-8 / 127, rel=1e-6)  # the clamp on an all-zero row
    assert q[1].tolist() == [0] * 6
    rq, rs = ref_quantize(w)
    assert torch.equal(q, rq) and torch.equal(scale, rs)
    assert q[0, 0].item() == 127 and q[0, -1].item() == -127
    # ties: exact halves in units of the row's step round to even (0, 2, 2, -2), not away from zero
    halves = (w[0, 1:5] / scale[0]).tolist()
    assert [round(h, 4) for h in halves] == [0.5, 1.5, 2.5, -2.5] and q[0, 1:5].tolist() == [0, 2, 2, -2]


def test_quantizer_matches_reference_and_is_row_chunk_friendly():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 200, generator=g) * torch.logspace(-4, 1, 96)[:, None]
    q, s = int8.quantize_rows(w)
    rq, rs = ref_quantize(w)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    for lo, hi in ((0, 7), (7, 50), (50, 96)):  # any row slice gives the same rows
        cq, cs = int8.quantize_rows(w[lo:hi])
        assert torch.equal(cq, q[lo:hi]) and torch.equal(cs, s[lo:hi])
    assert torch.equal(int8.dequantize(q, s), ref_dequant64(q, s).float())
    rel, steps = int8.requant_error(w, q, s)
    err = ref_dequant64(q, s) - w.double()
    assert rel == pytest.approx((err.norm() / w.double().norm()).item(), rel=1e-12)
    assert steps == pytest.approx((err.abs() / s.double()[:, None]).max().item(), rel=1e-12)
    assert 0.49 < steps <= HALF_STEP
    # an off-by-one int8 value is a whole step off
    q2 = q.clone()
    q2[5, 9] += 1 if q2[5, 9] < 127 else -1
    assert int8.requant_error(w, q2, s)[1] > 0.5


def test_is_int8_layer_by_what_it_holds():
    lin = nn.Linear(8, 6)
    ref = RefQuantizedLinear(lin)
    assert int8.is_int8_layer(ref) and int8.is_int8_layer(QuantizedLinear.from_linear(lin))
    assert not int8.is_int8_layer(lin)
    bad = RefQuantizedLinear(lin)
    bad.weight_scale = bad.weight_scale.bfloat16()
    assert not int8.is_int8_layer(bad)
    bad = RefQuantizedLinear(lin)
    bad.weight_int8 = bad.weight_int8.to(torch.int16)
    assert not int8.is_int8_layer(bad)


def test_project_quantizer_builds_the_reference_int8_dit(fp32_model, int8_model):
    ours = quantize_dit(copy.deepcopy(fp32_model))
    assert isinstance(ours.final_layer.linear, nn.Linear)  # the official skip pattern
    mine, ref = _int8_buffers(ours), _int8_buffers(int8_model)
    n_linear = sum(isinstance(m, nn.Linear) for m in fp32_model.modules())
    assert mine.keys() == ref.keys() and len(ref) == n_linear - 1
    assert all(torch.equal(mine[k][0], ref[k][0]) and torch.equal(mine[k][1], ref[k][1]) for k in ref)
    assert torch.equal(_run(ours), _run(int8_model))
    assert 1e-4 < rel_err(_run(ours), _run(fp32_model)) < 3e-2  # really quantized, still the same network
    cast = copy.deepcopy(ours).to(torch.bfloat16)  # as after the official load: scales stay float32
    assert cast.blocks[0].attn.qkv.weight_scale.dtype == torch.float32
    assert torch.equal(cast.blocks[0].attn.qkv.weight_scale, ours.blocks[0].attn.qkv.weight_scale)


# ------------------------------------------------------------------ unmerged: apply / strength / remove


@pytest.mark.parametrize("form", ["ref", "ref.peft", "ref.fastvideo", "cfg"])
def test_apply_on_int8_model_matches_official(int8_model, loras, form):
    layout = form.split(".")[0]
    base = _run(int8_model)
    want = _official(int8_model, [(loras[layout], 0.7)])
    want2 = _official(int8_model, [(loras[layout], -1.3)])
    assert rel_err(want, base) > 1e-3
    name = L.apply_lora(int8_model, loras[form], strength=0.7)
    assert rel_err(want, _run(int8_model)) <= 1e-5
    L.set_lora_strength(int8_model, name, -1.3)
    assert rel_err(want2, _run(int8_model)) <= 1e-5
    L.remove_lora(int8_model, name)
    assert torch.equal(_run(int8_model), base)


def test_two_adapters_on_int8_model(int8_model, loras):
    want = _official(int8_model, [(loras["ref"], 0.7), (loras["cfg"], -1.3)])
    L.apply_lora(int8_model, loras["ref.fastvideo"], 0.7, name="a")
    L.apply_lora(int8_model, loras["cfg"], -1.3, name="b")
    try:
        assert rel_err(want, _run(int8_model)) <= 1e-5
    finally:
        L.remove_lora(int8_model)


def test_apply_on_split_int8_model(int8_model, loras):
    """FastVideo-named INT8 model: per-row quantization splits with the rows, so the fused INT8 layers'
    buffers split exactly into the split layers' buffers."""
    split = LongCatDiTSplit(CFG).eval()
    split = ref_quantize_model(split, skip="final_layer.proj")  # FastVideo's name for final_layer.linear
    split.load_state_dict(convert_state_dict(int8_model.state_dict(), "fastvideo"))
    assert torch.equal(_run(split), _run(int8_model))
    want = _official(int8_model, [(loras["ref"], 0.7)])
    for form in ("ref", "ref.fastvideo"):
        name = L.apply_lora(split, loras[form], 0.7)
        assert rel_err(want, _run(split)) <= 1e-5, form
        L.remove_lora(split, name)


# ------------------------------------------------------------------ merged into INT8


def test_merge_into_int8_requantizes_reports_and_unmerges_bit_exact(int8_model, loras):
    model = copy.deepcopy(int8_model)
    before = _int8_buffers(model)
    final_before = model.final_layer.linear.weight.detach().clone()
    base = _run(model)
    unmerged = _official(model, [(loras["ref"], 0.7)])

    report = L.merge_lora(model, loras["ref"], strength=0.7)
    delta = official_delta(loras["ref"])
    assert set(report.layers) == set(delta)
    assert set(report.requantized) == set(delta) - {"final_layer.linear"}  # the one non-INT8 layer
    after = _int8_buffers(model)
    worst_rel = 0.0
    for layer, (q0, s0) in before.items():
        if layer not in delta:
            assert torch.equal(after[layer][0], q0) and torch.equal(after[layer][1], s0), layer
            continue
        exact = ref_dequant64(q0, s0) + 0.7 * delta[layer]  # independent float64 merged weight
        q, s = after[layer]
        rq, rs = ref_quantize(exact.float())  # the official scheme on the merged weight: a new scale per row
        assert torch.allclose(s, rs, rtol=1e-6, atol=0), layer
        assert (q.int() - rq.int()).abs().max().item() <= 1, layer  # at most a rounding tie apart
        err = ref_dequant64(q, s) - exact
        rel = (err.norm() / exact.norm()).item()
        steps = (err.abs() / s.double()[:, None]).max().item()
        got = report.requantized[layer]
        assert got.rel_frobenius == pytest.approx(rel, rel=1e-4, abs=1e-9), layer
        assert got.worst_steps == pytest.approx(steps, abs=1e-4), layer
        assert steps <= HALF_STEP, layer
        worst_rel = max(worst_rel, rel)
    assert report.worst()[1].rel_frobenius == pytest.approx(worst_rel, rel=1e-4)
    assert 0.4 < report.worst_steps() <= HALF_STEP
    # the float layer is merged as any float layer is
    want_final = (final_before.double() + 0.7 * delta["final_layer.linear"]).float()
    assert torch.allclose(model.final_layer.linear.weight, want_final, rtol=0, atol=1e-6)
    # output: close to the unmerged LoRA on the INT8 model, but lossy (requantization)
    err_out = rel_err(unmerged, _run(model))
    assert 1e-6 < err_out < 2e-2, err_out

    L.merge_lora(model, loras["cfg"], strength=-1.3)  # a second merge requantizes again
    L.unmerge_lora(model)
    restored = _int8_buffers(model)
    assert all(torch.equal(restored[k][0], before[k][0]) and torch.equal(restored[k][1], before[k][1])
               for k in before)
    assert torch.equal(model.final_layer.linear.weight, final_before)
    assert torch.equal(_run(model), base)


def test_fuse_applied_adapters_by_name_into_int8_and_unmerge_bit_exact(int8_model, loras):
    """merge_lora(names=...) on INT8 layers: both applied adapters' changes requantized once per layer
    (the official scheme on the exact float64 merged weight), the error reported; unmerge restores the
    buffers bit for bit and the adapters are back in the forward."""
    model = copy.deepcopy(int8_model)
    before = _int8_buffers(model)
    both = _official(model, [(loras["ref"], 0.7), (loras["cfg"], -1.3)])
    L.apply_lora(model, loras["ref.fastvideo"], 0.7, name="a")
    L.apply_lora(model, loras["cfg"], -1.3, name="b")
    report = L.merge_lora(model, names=["a", "b"])
    assert L.active_loras(model) == {} and not any(m._forward_hooks for m in model.modules())
    da, db = official_delta(loras["ref"]), official_delta(loras["cfg"])
    after = _int8_buffers(model)
    assert set(report.requantized) == (set(da) | set(db)) - {"final_layer.linear"}
    for layer in report.requantized:
        q0, s0 = before[layer]
        exact = ref_dequant64(q0, s0) + 0.7 * da.get(layer, 0) - 1.3 * db.get(layer, 0)
        rq, rs = ref_quantize(exact.float())
        q, s = after[layer]
        assert torch.allclose(s, rs, rtol=1e-6, atol=0), layer
        assert (q.int() - rq.int()).abs().max().item() <= 1, layer
        steps = ((ref_dequant64(q, s) - exact).abs() / s.double()[:, None]).max().item()
        assert report.requantized[layer].worst_steps == pytest.approx(steps, abs=1e-4), layer
        assert steps <= HALF_STEP, layer
    assert 1e-6 < rel_err(both, _run(model)) < 2e-2  # lossy, close
    L.unmerge_lora(model)
    restored = _int8_buffers(model)
    assert all(torch.equal(restored[k][0], before[k][0]) and torch.equal(restored[k][1], before[k][1])
               for k in before)
    assert L.active_loras(model) == {"a": 0.7, "b": -1.3}
    assert rel_err(both, _run(model)) <= 1e-5
    L.remove_lora(model)


# ------------------------------------------------------------------ layers the runtime cannot adapt


class _Empty(nn.Module):
    def forward(self, x):
        return x


class _OneD(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))


def _tiny_model(qkv: nn.Module) -> nn.Module:
    root = nn.Module()
    root.blocks = nn.ModuleList([nn.Module()])
    root.blocks[0].attn = nn.Module()
    root.blocks[0].attn.qkv = qkv
    root.blocks[0].attn.proj = nn.Linear(4, 4)
    return root


def _tiny_lora(path) -> str:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, out in (("blocks.0.attn.qkv", 12), ("blocks.0.attn.proj", 4)):
        p = "lora" + SEP + name.replace(".", SEP)
        sd[f"{p}.lora_down.weight"] = torch.randn(2, 4, generator=g)
        sd[f"{p}.lora_up.weight"] = torch.randn(out, 2, generator=g)
        sd[f"{p}.alpha_scale"] = torch.tensor(0.5)
    save_file(sd, str(path))
    return str(path)


def _bad_scale() -> nn.Module:
    m = RefQuantizedLinear(nn.Linear(4, 12))
    m.weight_scale = m.weight_scale.bfloat16()
    return m


def _bad_int8() -> nn.Module:
    m = RefQuantizedLinear(nn.Linear(4, 12))
    m.weight_int8 = m.weight_int8.to(torch.int16)
    return m


@pytest.mark.parametrize("qkv, reason", [
    (_Empty, "no weight and no weight_int8"),
    (_OneD, "weight is 1-D, not [out, in]"),
    (_bad_scale, "weight_scale is torch.bfloat16 [12], not float32 [12]"),
    (_bad_int8, "weight_int8 is torch.int16 [12, 4], not 2-D int8"),
])
def test_unadaptable_layer_is_named_with_the_reason(tmp_path, qkv, reason):
    model = _tiny_model(qkv())
    lora = _tiny_lora(tmp_path / "l.safetensors")
    w = model.blocks[0].attn.proj.weight.detach().clone()
    for call in (L.apply_lora, L.merge_lora):
        with pytest.raises(LoraError) as e:
            call(model, lora)
        msg = str(e.value)
        assert f"blocks.0.attn.qkv ({reason})" in msg and "have no layer" not in msg, msg
        assert "blocks.0.attn.proj" not in msg  # the adaptable layer is not blamed
    assert not model.blocks[0].attn.proj._forward_hooks and torch.equal(model.blocks[0].attn.proj.weight, w)


def test_absent_layer_is_still_reported_missing(tmp_path):
    model = _tiny_model(nn.Linear(4, 12))
    del model.blocks[0].attn.qkv
    lora = _tiny_lora(tmp_path / "l.safetensors")
    with pytest.raises(LoraError, match="1 LoRA modules have no layer in the model"):
        L.apply_lora(model, lora)
    name = L.apply_lora(model, lora, skip_missing=True)  # the present layer is adapted
    assert len(model.blocks[0].attn.proj._forward_hooks) == 1
    L.remove_lora(model, name)
