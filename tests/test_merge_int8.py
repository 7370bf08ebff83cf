"""`merge` into LongCat's INT8 checkpoints (spec section 5), against an independent quantizer and reference.

The INT8 base is built here from the reference DiT with a quantizer written from the spec (not
longcat_lora.int8), in the official layout: `quantized_model.safetensors.index.json`, three shards
written by the real `safetensors` library (which puts every F32 tensor before the I8 ones, so each
scale precedes its int8 weight in a file), `config.json`, `quantization_config.json`. Two layers are
split across shards on purpose: one with its scale in an earlier shard than its int8 weight, one the
other way round.
"""

import json
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import longcat_lora as L
from longcat_lora.testing.dit import TINY, LongCatDiT
from longcat_lora.errors import LoraError
from longcat_lora.testing.fixtures import write_native_lora
from longcat_lora.apply.merge_int8 import Int8Merge

from conftest import cli
from reference import official_delta
from rounding_reference import merge_reference, round_exact_f64, same_bits

INDEX = "quantized_model.safetensors.index.json"
SHARD = "quantized_model-{:05d}-of-00003.safetensors"
QCONFIG = {"quantization_method": "int8_per_channel_symmetric", "skip_patterns": ["final_layer.linear"],
           "bits": 8}
SCALE_FIRST = "blocks.10.attn.qkv"  # its weight_scale sits in shard 1, its weight_int8 in shard 3
INT8_FIRST = "blocks.40.ffn.w1"  # its weight_int8 sits in shard 1, its weight_scale in shard 3
STRENGTHS = {"ref": 1.0, "cfg": -0.7}


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official per-channel symmetric INT8 quantizer, from the spec's formula."""
    w = w.to(torch.float32)
    absmax = w.abs().max(dim=1).values
    scale = torch.clamp(absmax, min=1e-8) / 127
    return torch.clamp(torch.round(w / scale[:, None]), -128, 127).to(torch.int8), scale


class QLinear(nn.Module):
    """The official QuantizedLinear's state: weight_int8, weight_scale, bias (no weight)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.register_buffer("weight_int8", torch.zeros(lin.weight.shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(lin.weight.shape[0], dtype=torch.float32))
        self.register_buffer("bias", None if lin.bias is None else torch.zeros(lin.bias.shape, dtype=torch.bfloat16))


def int8_model() -> nn.Module:
    """The official INT8 DiT as its loader builds it: every Linear but final_layer.linear swapped."""
    model = LongCatDiT(TINY)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and "final_layer.linear" not in name:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, QLinear(mod))
    return model


def quantized_linears() -> set[str]:
    return {n for n, m in LongCatDiT(TINY).named_modules() if isinstance(m, nn.Linear) and "final_layer.linear" not in n}


def int8_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = LongCatDiT(TINY)
    qlin = quantized_linears()
    sd = {}
    for k, v in model.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        if mod in qlin and leaf == "weight":
            sd[mod + ".weight_int8"], sd[mod + ".weight_scale"] = quantize(v)
        else:
            sd[k] = v.to(torch.bfloat16)  # the official loader's cast
    return sd


def write_int8_base(path, sd) -> str:
    os.makedirs(path)
    keys = list(sd)
    groups = [keys[: len(keys) // 3], keys[len(keys) // 3: 2 * len(keys) // 3], keys[2 * len(keys) // 3:]]
    for g in groups:
        for k in (SCALE_FIRST + ".weight_int8", SCALE_FIRST + ".weight_scale", INT8_FIRST + ".weight_int8",
                  INT8_FIRST + ".weight_scale"):
            if k in g:
                g.remove(k)
    groups[0] += [SCALE_FIRST + ".weight_scale", INT8_FIRST + ".weight_int8"]
    groups[2] += [SCALE_FIRST + ".weight_int8", INT8_FIRST + ".weight_scale"]
    weight_map = {}
    for i, g in enumerate(groups):
        save_file({k: sd[k] for k in g}, os.path.join(path, SHARD.format(i + 1)), {"format": "pt"})
        weight_map.update({k: SHARD.format(i + 1) for k in g})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "LongCatVideoAvatarTransformer3DModel", "hidden_size": TINY.hidden_size}, f)
    with open(os.path.join(path, "quantization_config.json"), "w") as f:
        json.dump(QCONFIG, f)
    return str(path)


def load_dir(path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(path, f)))
    return sd


def headers(path) -> dict[str, dict[str, tuple]]:
    """shard -> tensor -> (dtype, shape), read with the real safetensors library."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as s:
                out[f] = {k: (s.get_slice(k).get_dtype(), tuple(s.get_slice(k).get_shape())) for k in s.keys()}
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("int8")
    sd = int8_state_dict()
    base = write_int8_base(d / "base_model_int8", sd)
    loras = {"ref": write_native_lora(str(d / "ref.safetensors"), "refinement", dims=TINY.dims, rank=4,
                                      dtype=torch.float32, alpha_scale=0.5, seed=21),
             "cfg": write_native_lora(str(d / "cfg.safetensors"), "cfg_step", dims=TINY.dims, rank=3,
                                      dtype=torch.bfloat16, alpha_scale=0.25, seed=22)}
    deltas = {}  # module -> sum strength * dW (float64), by the official formula
    for k, path in loras.items():
        for m, dw in official_delta(path).items():
            deltas[m] = deltas.get(m, 0) + STRENGTHS[k] * dw
    args = [a for k, p in loras.items() for a in ("--lora", f"{p}:{STRENGTHS[k]}")]
    out = str(d / "merged_int8")
    p = cli("merge", base, out, *args)
    return {"d": d, "sd": sd, "base": base, "loras": loras, "deltas": deltas, "out": out, "stdout": p.stdout,
            "args": args}


def dequantized(sd, m) -> torch.Tensor:
    """weight_int8 * weight_scale, exact in float64 (8 x 24 bits)."""
    return sd[m + ".weight_int8"].double() * sd[m + ".weight_scale"].double()[:, None]


def exact_merged(sd, deltas, m) -> torch.Tensor:
    """The exact dequantized weight + the official dW, in float64."""
    return dequantized(sd, m) + deltas[m]


def merged_f32(setup, m) -> torch.Tensor:
    """The merged weight correctly rounded to float32 (the independent reference)."""
    loras = [(setup["loras"][k], s) for k, s in STRENGTHS.items()]
    return merge_reference(dequantized(setup["sd"], m), loras, m, torch.float32)


def test_fixture_layout_is_the_official_one(setup):
    """Guards the fixture: safetensors wrote scales first; one pair split each way across shards."""
    h = setup["base"]
    with safe_open(os.path.join(h, SHARD.format(1)), "pt") as f:
        keys = list(f.keys())
    idx = json.load(open(os.path.join(h, INDEX)))["weight_map"]
    assert idx[SCALE_FIRST + ".weight_scale"] == SHARD.format(1) and idx[SCALE_FIRST + ".weight_int8"] == SHARD.format(3)
    assert idx[INT8_FIRST + ".weight_int8"] == SHARD.format(1) and idx[INT8_FIRST + ".weight_scale"] == SHARD.format(3)
    raw = open(os.path.join(h, SHARD.format(2)), "rb").read()
    hdr = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    order = sorted((v["data_offsets"][0], k) for k, v in hdr.items() if k != "__metadata__")
    first_i8 = next(i for i, (_, k) in enumerate(order) if k.endswith("weight_int8"))
    assert any(k.endswith("weight_scale") for _, k in order[:first_i8]), "scales should precede int8 weights"
    assert keys


def test_requantized_checkpoint_has_the_input_layout(setup):
    base, out = setup["base"], setup["out"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(base))
    assert headers(out) == headers(base)  # keys, dtypes, shapes, per shard
    assert json.load(open(os.path.join(out, INDEX))) == json.load(open(os.path.join(base, INDEX)))
    for side in ("config.json", "quantization_config.json"):
        assert open(os.path.join(out, side), "rb").read() == open(os.path.join(base, side), "rb").read()
    merged = load_dir(out)
    model = int8_model()
    model.load_state_dict(merged, strict=True)  # the official loader's strict load
    # untouched tensors byte-identical: biases, norms, embedders, layers no LoRA targets
    sd, deltas = setup["sd"], setup["deltas"]
    touched = {m + s for m in deltas for s in (".weight_int8", ".weight_scale", ".weight")}
    untouched = [k for k in sd if k not in touched]
    assert "blocks.3.cross_attn.proj.weight_int8" in untouched and "t_embedder.mlp.0.weight_scale" in untouched
    for k in untouched:
        assert torch.equal(bits(merged[k]), bits(sd[k])), k
    changed = [m for m in deltas if m + ".weight_int8" in sd and not torch.equal(merged[m + ".weight_int8"], sd[m + ".weight_int8"])]
    assert len(changed) == sum(1 for m in deltas if m + ".weight_int8" in sd) == 48 * 8 + 1  # 8 per block + final adaLN
    # final_layer.linear is not quantized: an ordinary bf16 merge, correctly rounded
    want = merge_reference(sd["final_layer.linear.weight"], [(setup["loras"][k], s) for k, s in STRENGTHS.items()],
                           "final_layer.linear", torch.bfloat16)
    assert same_bits(merged["final_layer.linear.weight"], want)


def test_requantized_values_match_an_independent_requantization(setup):
    """weight_int8 / weight_scale == quantize(W'), W' the exact merged weight correctly rounded to float32
    (the reference: float64 with a bound, Fractions where it cannot decide), bit for bit."""
    sd, deltas, merged = setup["sd"], setup["deltas"], load_dir(setup["out"])
    total = 0
    for m in deltas:
        if m + ".weight_int8" not in sd:
            continue
        q_ref, s_ref = quantize(merged_f32(setup, m))
        q, s = merged[m + ".weight_int8"], merged[m + ".weight_scale"]
        assert q.dtype == torch.int8 and s.dtype == torch.float32
        assert same_bits(s, s_ref) and same_bits(q, q_ref), m
        total += q.numel()
    assert total > 1_000_000


def test_reported_requantization_errors_are_the_true_ones(setup, tmp_path, monkeypatch):
    sd, deltas = setup["sd"], setup["deltas"]
    loras = setup["loras"]
    computed = []  # layers in the order their merged weight was computed
    real = Int8Merge._requantized
    monkeypatch.setattr(Int8Merge, "_requantized", lambda self, layer: computed.append(layer) or real(self, layer))
    report = L.merge_checkpoint(setup["base"], str(tmp_path / "o"), [(loras[k], s) for k, s in STRENGTHS.items()])
    # each layer computed once (a scale waits for its int8 weight in a shard), except the one whose scale's
    # shard is written before its int8 weight's shard: computed for the scale, again for the weight
    assert sorted(computed) == sorted([*report.requantized, SCALE_FIRST])
    lib = load_dir(str(tmp_path / "o"))
    cli_out = load_dir(setup["out"])
    assert all(torch.equal(bits(lib[k]), bits(cli_out[k])) for k in lib)  # same result both ways
    int8_mods = {m for m in deltas if m + ".weight_int8" in sd}
    assert set(report.requantized) == int8_mods
    truth = {}
    for m in int8_mods:
        exact = exact_merged(sd, deltas, m)
        q, s = lib[m + ".weight_int8"].double(), lib[m + ".weight_scale"].double()[:, None]
        err = q * s - exact
        truth[m] = (float(err.norm() / exact.norm()), float((err.abs() / s).max()))
        r = report.requantized[m]
        assert r.rel == pytest.approx(truth[m][0], rel=1e-4), m
        assert r.steps == pytest.approx(truth[m][1], abs=1e-4), m
        assert r.steps <= 0.5 + 1e-5
    worst = max(truth, key=lambda m: truth[m][0])
    far = max(truth, key=lambda m: truth[m][1])
    line = setup["stdout"]
    got = re.search(r"requantized (\d+) INT8 weights; worst relative error (\S+) at (\S+) "
                    r"\(worst element (\S+) steps, at (\S+)\)", line)
    assert got, line
    assert int(got.group(1)) == len(int8_mods)
    assert float(got.group(2)) == pytest.approx(truth[worst][0], rel=0.06) and got.group(3) == worst
    assert float(got.group(4)) == pytest.approx(truth[far][1], abs=0.006)
    assert report.summary in line


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_dequantized_output_is_the_plain_model(setup, tmp_path, dtype):
    sd, deltas = setup["sd"], setup["deltas"]
    out = str(tmp_path / f"plain_{dtype}")
    p = cli("merge", setup["base"], out, *setup["args"], "--dtype", dtype)
    assert "quantization_config.json not copied" in p.stdout
    tdt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    assert sorted(os.listdir(out)) == sorted(["config.json", "diffusion_pytorch_model.safetensors.index.json"]
                                             + [f"diffusion_pytorch_model-{k:05d}-of-00003.safetensors" for k in (1, 2, 3)])
    assert open(os.path.join(out, "config.json"), "rb").read() == open(os.path.join(setup["base"], "config.json"), "rb").read()
    merged = load_dir(out)
    plain = LongCatDiT(TINY)
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged, strict=True)
    assert all(v.dtype == tdt for v in merged.values())
    idx = json.load(open(os.path.join(out, "diffusion_pytorch_model.safetensors.index.json")))
    assert set(idx["weight_map"]) == set(merged)
    for shard in set(idx["weight_map"].values()):
        with safe_open(os.path.join(out, shard), "pt") as f:
            assert {k for k, v in idx["weight_map"].items() if v == shard} == set(f.keys())
    assert idx["weight_map"][SCALE_FIRST + ".weight"] == "diffusion_pytorch_model-00003-of-00003.safetensors"
    assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in merged.values())
    loras = [(setup["loras"][k], s) for k, s in STRENGTHS.items()]
    for m in quantized_linears():
        got = merged[m + ".weight"]
        if m not in deltas:  # the exact dequantized value, rounded once
            want = torch.from_numpy(round_exact_f64(dequantized(sd, m).numpy(), tdt)).to(tdt)
        else:
            want = merge_reference(dequantized(sd, m), loras, m, tdt)
        assert same_bits(got, want), m
    for k, v in sd.items():
        if not k.endswith((".weight_int8", ".weight_scale")) and k != "final_layer.linear.weight":
            assert torch.equal(merged[k], v.to(tdt)), k


# ----------------------------------------------------------------------------- bad input

def _edit_shard(base: str, key: str, fn) -> str:
    """Apply fn(shard state dict) to the shard holding `key`; keep the index in step."""
    ipath = os.path.join(base, INDEX)
    idx = json.load(open(ipath))
    shard = idx["weight_map"][key]
    path = os.path.join(base, shard)
    sd = load_file(path)
    fn(sd)
    save_file(sd, path)
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != shard or k in sd}
    idx["weight_map"].update({k: shard for k in sd})
    json.dump(idx, open(ipath, "w"))
    return shard


def _bad_cases():
    P, S = "blocks.2.attn.proj.weight_int8", "blocks.2.attn.proj.weight_scale"

    def setv(key, value):
        def f(sd):
            sd[key] = sd[key].clone()
            sd[key][5] = value
        return f

    # case -> (tensor whose shard is edited, edit, tensor whose file the message must name, words)
    return {
        "missing_scale": (S, lambda sd: sd.pop(S), P, [P, S]),
        "scale_too_long": (S, lambda sd: sd.update({S: torch.ones(65)}), S, [S]),
        "scale_2d": (S, lambda sd: sd.update({S: torch.ones(64, 1)}), S, [S]),
        "scale_bf16": (S, lambda sd: sd.update({S: sd[S].to(torch.bfloat16)}), S, [S]),
        "int8_is_int16": (P, lambda sd: sd.update({P: sd[P].to(torch.int16)}), P, [P]),
        "int8_is_float": (P, lambda sd: sd.update({P: sd[P].float()}), P, [P]),
        "int8_is_3d": (P, lambda sd: sd.update({P: sd[P][:, :, None]}), P, [P]),
        "scale_zero": (S, setv(S, 0.0), S, [S, "row 5"]),
        "scale_negative": (S, setv(S, -1e-3), S, [S, "row 5"]),
        "scale_nan": (S, setv(S, float("nan")), S, [S, "row 5"]),
        "scale_inf": (S, setv(S, float("inf")), S, [S, "row 5"]),
        "lora_does_not_fit": (P, lambda sd: sd.update({P: torch.zeros(64, 63, dtype=torch.int8)}), P,
                              [P, "[64, 63]", "[64, 64]"]),
        "scale_without_int8": (P, lambda sd: sd.pop(P), S, [S, P]),
    }


# one case of each kind through the real CLI (a subprocess costs seconds); the rest in-process
THROUGH_CLI = {"missing_scale", "scale_2d", "int8_is_float", "scale_nan", "lora_does_not_fit", "scale_without_int8"}


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_int8_input_fails_cleanly(setup, tmp_path, case):
    key, fn, named, words = _bad_cases()[case]
    base = shutil.copytree(setup["base"], tmp_path / "base")
    shard = json.load(open(os.path.join(base, INDEX)))["weight_map"][named]
    _edit_shard(base, key, fn)
    out = tmp_path / "out"
    before = sorted(os.listdir(tmp_path))
    if case in THROUGH_CLI:
        p = cli("merge", base, out, "--lora", setup["loras"]["ref"], check=2)
        err = p.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    else:  # the same check in-process (the CLI prints this message as its one line)
        with pytest.raises(LoraError) as e:
            L.merge_checkpoint(base, str(out), [(setup["loras"]["ref"], 1.0)])
        err = str(e.value)
    assert os.path.join(str(base), shard) in err, err  # names the file ...
    for w in words:  # ... and the tensor
        assert w in err, (w, err)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == before


def test_layer_with_both_weight_and_weight_int8_is_refused(setup, tmp_path):
    base = shutil.copytree(setup["base"], tmp_path / "base")
    _edit_shard(base, "blocks.2.attn.proj.weight_int8",
                lambda sd: sd.update({"blocks.2.attn.proj.weight": torch.zeros(64, 64, dtype=torch.bfloat16)}))
    with pytest.raises(LoraError, match="both 'blocks.2.attn.proj.weight' and 'blocks.2.attn.proj.weight_int8'"):
        L.merge_checkpoint(base, str(tmp_path / "out"), [(setup["loras"]["ref"], 1.0)])
    assert not (tmp_path / "out").exists()


def test_cuda_device_agrees_or_is_refused(setup, tmp_path):
    loras = [(setup["loras"][k], s) for k, s in STRENGTHS.items()]
    if not torch.cuda.is_available():
        with pytest.raises(LoraError, match="no CUDA device"):
            L.merge_checkpoint(setup["base"], str(tmp_path / "gpu"), loras, device="cuda")
        assert not (tmp_path / "gpu").exists()
        return
    # on a GPU machine: the same requantization up to fp32 summation order (one step at a tie, rarely)
    L.merge_checkpoint(setup["base"], str(tmp_path / "gpu"), loras, device="cuda")
    cpu, gpu = load_dir(setup["out"]), load_dir(str(tmp_path / "gpu"))
    assert cpu.keys() == gpu.keys()
    for k in cpu:
        if k.endswith(".weight_scale"):
            assert torch.allclose(gpu[k], cpu[k], rtol=1e-6, atol=0), k
        elif k.endswith(".weight_int8"):
            d = (gpu[k].int() - cpu[k].int()).abs()
            assert int(d.max()) <= 1 and int((d > 0).sum()) <= max(2, d.numel() // 1000), k


@pytest.mark.parametrize("dtype", ["keep", "bf16"])
def test_row_chunks_give_the_bytes_of_one_chunk(setup, tmp_path, monkeypatch, dtype):
    """The INT8 path computes each layer by row chunks (CHUNK_ELEMENTS): with chunks of one row and of a few
    rows, every layer spans many chunks, and the bytes equal the one-chunk result (the default here: every
    test layer fits one chunk). Taking a chunk's row scales from the wrong rows, say, fails this."""
    import longcat_lora.apply.merge_int8 as mi

    loras = [(setup["loras"][k], s) for k, s in STRENGTHS.items()]
    ref = tmp_path / "one"
    L.merge_checkpoint(setup["base"], str(ref), loras, dtype=dtype)
    assert max(a * b for a, b in (v.shape for k, v in setup["sd"].items() if k.endswith(".weight_int8"))) <= mi.CHUNK_ELEMENTS
    for elements in (1, 3 * TINY.dims.hidden + 5):
        monkeypatch.setattr(mi, "CHUNK_ELEMENTS", elements)
        out = tmp_path / f"c{elements}"
        L.merge_checkpoint(setup["base"], str(out), loras, dtype=dtype)
        for name in sorted(os.listdir(ref)):
            assert open(out / name, "rb").read() == open(ref / name, "rb").read(), (elements, name)
