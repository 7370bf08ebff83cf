"""Named adapters on a live model: read once, switched with enable/disable (official demo shape) or
set_adapters (diffusers shape), re-weighted, removed by name, fused by name and unfused bit for bit.
The oracle is the official LoRANetwork semantics (longcat_lora.testing.official) on the same model,
and the float64 weight changes of tests/reference.py."""

from functools import partial
import os
import shutil

import pytest
import torch
from torch.overrides import TorchFunctionMode

import longcat_lora as L
from longcat_lora.apply import runtime
from longcat_lora.testing.dit import TINY, LongCatDiT, LongCatDiTSplit, convert_state_dict
from longcat_lora.testing.fixtures import write_native_lora

from dit_runs import DitRuns, dit_batch
from reference import half_ulp, official_delta, rel_err

CFG = TINY


_inputs = partial(dit_batch, CFG)


_RUNS = DitRuns(_inputs)
_run, _official = _RUNS.run, _RUNS.official


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("switch")
    ref = write_native_lora(str(d / "refinement_lora.safetensors"), "refinement", dims=CFG.dims, rank=4,
                            dtype=torch.float32, alpha_scale=0.5, seed=1)
    cfg = write_native_lora(str(d / "cfg_step_lora.safetensors"), "cfg_step", dims=CFG.dims, rank=6,
                            dtype=torch.float32, alpha_scale=0.3, seed=2)
    L.convert(cfg, str(d / "cfg_step.peft"), "peft")
    return {"ref": ref, "cfg": cfg, "cfg.peft": str(d / "cfg_step.peft")}


@pytest.fixture(scope="module")
def fused():
    torch.manual_seed(0)
    return LongCatDiT(CFG).eval()


@pytest.fixture(scope="module")
def want(fused, files):
    """Official outputs of every combination the tests switch between, and the base output."""
    r, c = files["ref"], files["cfg"]
    return {"base": _run(fused), "ref": _official(fused, [(r, 0.7)]), "cfg": _official(fused, [(c, -1.3)]),
            "both": _official(fused, [(r, 0.7), (c, -1.3)]), "both2": _official(fused, [(r, 0.7), (c, 2.0)]),
            "cfg2": _official(fused, [(c, 2.0)]), "both_x2": _official(fused, [(r, 1.4), (c, 2.0)])}


@pytest.fixture
def model(fused):
    yield fused
    L.remove_lora(fused)
    assert not any(m._forward_hooks for m in fused.modules())


def _torch_calls(model) -> list[str]:
    """Every torch function and tensor method one forward calls, in order."""
    calls = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Record():
        _run(model)
    return calls


def test_read_once_then_switch_like_the_official_demo(tmp_path, model, files, want):
    """Two adapters applied once (their files then deleted, nothing read again), switched with
    disable_loras / enable_loras and set_adapters: each state equals the official enable_loras([...])."""
    paths = {k: shutil.copy(files[k], tmp_path / os.path.basename(files[k])) for k in ("ref", "cfg")}
    reads = []
    real = runtime.load_lora
    runtime.load_lora = lambda *a, **k: reads.append(a) or real(*a, **k)
    try:
        assert L.apply_lora(model, paths["ref"], 0.7) == "refinement_lora"  # default name: the file's stem
        assert L.apply_lora(model, paths["cfg"], -1.3, name="cfg") == "cfg"
        assert len(reads) == 2
        for p in paths.values():
            os.remove(p)
            assert not any(os.path.realpath(f"/proc/self/fd/{fd}") == p for fd in os.listdir("/proc/self/fd"))
        assert rel_err(want["both"], _run(model)) <= 1e-5
        L.disable_loras(model)  # official disable_all_loras()
        assert L.active_loras(model) == {}
        assert torch.equal(_run(model), want["base"])
        L.enable_loras(model, ["cfg"])  # official enable_loras(["cfg"])
        assert L.active_loras(model) == {"cfg": -1.3}
        assert rel_err(want["cfg"], _run(model)) <= 1e-5
        L.disable_loras(model, "cfg")
        L.enable_loras(model, "refinement_lora")
        assert rel_err(want["ref"], _run(model)) <= 1e-5
        L.enable_loras(model)  # every applied adapter
        assert rel_err(want["both"], _run(model)) <= 1e-5
        L.set_adapters(model, ["cfg"])  # diffusers: exactly these
        assert L.active_loras(model) == {"cfg": -1.3}
        assert rel_err(want["cfg"], _run(model)) <= 1e-5
        L.set_adapters(model, ["refinement_lora", "cfg"], weights=[0.7, 2.0])
        assert rel_err(want["both2"], _run(model)) <= 1e-5
        L.set_adapters(model, "cfg", weights=-1.3)
        assert rel_err(want["cfg"], _run(model)) <= 1e-5
        assert {n: (i.strength, i.enabled, i.merged) for n, i in L.list_loras(model).items()} == {
            "refinement_lora": (0.7, False, False), "cfg": (-1.3, True, False)}
    finally:
        runtime.load_lora = real
    assert len(reads) == 2  # switching read nothing


def test_disabled_adapters_cost_nothing_in_the_forward(model, files, want):
    """All adapters disabled: no hook anywhere, the very same torch calls as the bare model, and
    bit-identical outputs. Enabled, the forward does measurably more (so the count can fail)."""
    base_calls = _torch_calls(model)
    assert any(c in ("linear", "addmm", "matmul") for c in base_calls)
    L.apply_lora(model, files["ref"], 0.7, name="r")
    L.apply_lora(model, files["cfg"], -1.3, name="c")
    lora_calls = _torch_calls(model)
    assert len(lora_calls) > len(base_calls) and lora_calls.count("addmm_") > 0
    L.disable_loras(model, ["r", "c"])
    assert not any(m._forward_hooks for m in model.modules())
    assert _torch_calls(model) == base_calls
    assert torch.equal(_run(model), want["base"])
    # strength 0 is no work either
    L.enable_loras(model, ["r", "c"])
    L.set_lora_strength(model, "r", 0.0)
    L.set_lora_strength(model, "c", 0.0)
    assert _torch_calls(model) == base_calls
    L.set_lora_strength(model, "c", 2.0)
    assert rel_err(want["cfg2"], _run(model)) <= 1e-5


def test_strength_per_name_and_remove_by_name(model, files, want):
    a = L.apply_lora(model, files["ref"], 0.7)
    b = L.apply_lora(model, files["cfg.peft"], 0.1)  # any format; default name from the directory
    assert (a, b) == ("refinement_lora", "cfg_step")
    L.set_lora_strength(model, b, 2.0)
    assert L.active_loras(model) == {a: 0.7, b: 2.0}
    assert rel_err(want["both2"], _run(model)) <= 1e-5
    L.remove_lora(model, a)
    assert L.active_loras(model) == {b: 2.0}
    assert rel_err(want["cfg2"], _run(model)) <= 1e-5
    assert L.apply_lora(model, files["ref"], 0.7) == a  # the name is free again
    assert L.apply_lora(model, files["ref"], 0.7) == a + "_2"  # a default name is made unique
    L.remove_lora(model, [a, a + "_2", b])
    assert L.list_loras(model) == {} and not any(m._forward_hooks for m in model.modules())
    assert torch.equal(_run(model), want["base"])


@pytest.mark.parametrize("split", [False, True])
def test_merge_by_names_then_unmerge_bit_exact(fused, files, want, split):
    """Fuse an applied adapter by name (like diffusers' fuse_lora(adapter_names=...)): its weight
    change equals the float64 reference, its hook stands down, the output stays the official one;
    unmerge restores every weight bit for bit and puts the adapter back in the forward."""
    model = fused
    if split:
        model = LongCatDiTSplit(CFG).eval()
        model.load_state_dict(convert_state_dict(fused.state_dict(), "fastvideo"))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        L.apply_lora(model, files["ref"], 0.7, name="r")
        L.apply_lora(model, files["cfg"], -1.3, name="c")
        report = L.merge_lora(model, names=["c"])
        assert L.active_loras(model) == {"r": 0.7}
        assert L.list_loras(model)["c"] == runtime.LoraInfo(-1.3, True, True)
        delta = official_delta(files["cfg"])
        qkv = "blocks.2.self_attn.to_k.weight" if split else "blocks.2.attn.qkv.weight"
        rows = slice(CFG.hidden_size, 2 * CFG.hidden_size) if split else slice(None)
        got = model.state_dict()[qkv].double()
        assert torch.allclose(got, sd[qkv].double() + -1.3 * delta["blocks.2.attn.qkv"][rows], rtol=0, atol=1e-6)
        assert report.requantized == {}
        assert set(report.layers) == set(delta) if not split else len(report.layers) > len(delta)
        assert rel_err(want["both"], _run(model)) <= 1e-5  # r by its hook, c in the weights
        for call in (lambda: L.set_lora_strength(model, "c", 1.0), lambda: L.disable_loras(model, "c"),
                     lambda: L.remove_lora(model, "c"), lambda: L.merge_lora(model, names="c"),
                     lambda: L.set_adapters(model, ["r"])):
            with pytest.raises(L.LoraError, match="'c' is merged into the weights: call unmerge_lora"):
                call()
        L.unmerge_lora(model)
        assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
        assert L.active_loras(model) == {"r": 0.7, "c": -1.3}
        assert rel_err(want["both"], _run(model)) <= 1e-5
        # names=None fuses every active adapter; strength scales each one's own
        L.set_lora_strength(model, "c", 1.0)
        L.merge_lora(model, strength=2.0)
        assert L.active_loras(model) == {} and not any(m._forward_hooks for m in model.modules())
        assert rel_err(want["both_x2"], _run(model)) <= 1e-5
        L.unmerge_lora(model)
        L.disable_loras(model)
        assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
        assert torch.equal(_run(model), want["base"])
    finally:
        L.remove_lora(model)


def test_merge_by_name_is_undone_by_remove_all(model, files, want):
    L.apply_lora(model, files["ref"], 0.7, name="r")
    L.merge_lora(model, names="r")
    L.merge_lora(model, files["cfg"], -1.3)  # and a file merged on top
    assert rel_err(want["both"], _run(model)) <= 1e-5
    L.remove_lora(model)
    assert L.list_loras(model) == {}
    assert torch.equal(_run(model), want["base"])


def test_unknown_duplicate_and_conflicting_names_are_clear_errors(model, files):
    L.apply_lora(model, files["ref"], 0.7, name="r")
    with pytest.raises(L.LoraError, match=r"^name: an adapter named 'r' is already applied"):
        L.apply_lora(model, files["cfg"], name="r")
    for call in (lambda: L.set_lora_strength(model, "x", 1.0), lambda: L.enable_loras(model, ["r", "x"]),
                 lambda: L.disable_loras(model, "x"), lambda: L.remove_lora(model, ["x"]),
                 lambda: L.merge_lora(model, names=["x"]), lambda: L.set_adapters(model, ["x"])):
        with pytest.raises(L.LoraError, match=r"^names: no adapter named 'x' is applied \(applied: \['r'\]\)"):
            call()
    assert L.active_loras(model) == {"r": 0.7}  # nothing changed
    with pytest.raises(L.LoraError, match=r"^weights: 1 given for 2 names"):
        L.set_adapters(model, ["r", "r"], weights=[1.0])
    with pytest.raises(L.LoraError, match=r"^names: give either a LoRA to merge"):
        L.merge_lora(model, files["cfg"], names=["r"])
    L.disable_loras(model)
    with pytest.raises(L.LoraError, match=r"^nothing to merge"):
        L.merge_lora(model)
    assert L.list_loras(model)["r"] == runtime.LoraInfo(0.7, False, False)


def test_fuse_by_name_on_bf16_is_fp32_cast_once(tmp_path):
    """A bf16 model and a bf16 LoRA (so the weights as applied are the file's, exactly): fusing by
    name gives each weight within half a bf16 ulp of the exact float64 W + strength * dW; unmerge is
    bit-exact."""
    torch.manual_seed(3)
    m = LongCatDiT(CFG).cast(torch.bfloat16)
    path = write_native_lora(str(tmp_path / "r.safetensors"), "refinement", dims=CFG.dims, rank=4,
                             dtype=torch.bfloat16, alpha_scale=0.5, seed=5)
    orig = {k: v.clone() for k, v in m.state_dict().items()}
    L.apply_lora(m, path, 0.9, name="r")
    L.merge_lora(m, names="r")
    delta = official_delta(path)
    for module in ("blocks.3.attn.qkv", "blocks.1.ffn.w2"):
        w = orig[module + ".weight"]
        want = w.double() + 0.9 * delta[module]
        got = m.state_dict()[module + ".weight"]
        assert got.dtype == torch.bfloat16
        assert ((got.double() - want).abs() <= half_ulp(want, torch.bfloat16) * (1 + 2 ** -10)
                + 2e-7 * (w.double().abs() + delta[module].abs())).all(), module
        assert not torch.equal(got, w), module
    L.unmerge_lora(m)
    assert all(torch.equal(orig[k], v) for k, v in m.state_dict().items())
    L.remove_lora(m)
