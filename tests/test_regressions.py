"""Regression tests for plausible one-line bugs that the rest of the suite let through (issue 8).

Each test names the mutant it kills. Expected values come from tests/reference.py (float64, written from
the spec, no longcat_lora code) or are computed here from the stored tensors, never from the code under
test.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import longcat_lora as L
from longcat_lora.testing.dit import DiTConfig
from longcat_lora.testing.fixtures import write_base_checkpoint, write_native_lora
from longcat_lora.model.naming import DitDims

from conftest import cli
from linear_bag import LinearBag
from reference import fastvideo_delta, half_ulp, load, lora_delta, official_delta, rel_err, worst

SEP = "___lorahyphen___"
DIMS = DitDims(hidden=16, ffn=48, adaln=8, final_out=8, depth=2)


def enc(module: str) -> str:
    return "lora" + SEP + module.replace(".", SEP)


# --------------------------------------------------------------- folding a scale into lora_B (FastVideo)

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fold_is_computed_in_float64_and_rounded_once(tmp_path, dtype):
    """Mutant: `folded()` multiplying in float32 instead of float64. alpha_scale 0.3 (a float64 scalar,
    so not a float32 number) at rank 6: 0.3 * 6 is not a whole number, so the scale is folded into
    lora_B. Expected bit for bit: (B.double() * 0.3) rounded once to float64 (F64 input) or float32."""
    src = write_native_lora(str(tmp_path / "n.safetensors"), "refinement", dims=DIMS, rank=6, dtype=dtype,
                            alpha_scale=0.3, scale_dtype=torch.float64, seed=5)
    out = str(tmp_path / "fv.safetensors")
    L.convert(src, out, "fastvideo")
    nat, fv = load(src), load(out)
    stored = torch.float64 if dtype == torch.float64 else torch.float32
    s = float(nat[f"{enc('blocks.1.attn.qkv')}.alpha_scale"])
    assert s == 0.3
    for j, name in enumerate(("to_q", "to_k", "to_v")):
        B = fv[f"blocks.1.self_attn.{name}.lora_B"]
        want = (nat[f"{enc('blocks.1.attn.qkv')}.lora_up.blocks.{j}.weight"].double() * 0.3).to(stored)
        assert B.dtype == stored and torch.equal(B, want), name
        assert fv[f"blocks.1.self_attn.{name}.lora_alpha"].item() == 6.0  # alpha = rank after folding
        assert torch.equal(fv[f"blocks.1.self_attn.{name}.lora_A"],
                           nat[f"{enc('blocks.1.attn.qkv')}.lora_down.weight"][6 * j:6 * j + 6])
    # a 6-way adaLN layer: alpha 0.3 * 36 = 10.8, folded into the block-diagonal B
    ups = [nat[f"{enc('blocks.0.adaLN_modulation.1')}.lora_up.blocks.{i}.weight"] for i in range(6)]
    want = (torch.block_diag(*ups).double() * 0.3).to(stored)
    assert torch.equal(fv["blocks.0.adaln_linear_1.lora_B"], want)
    assert fv["blocks.0.adaln_linear_1.lora_alpha"].item() == 36.0
    assert worst(official_delta(src), fastvideo_delta(out)) < (1e-15 if dtype == torch.float64 else 1e-7)


# --------------------------------------------------------------- FastVideo lora_alpha below 1

def _fv_file(path, alpha, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(rank, 16, generator=g), torch.randn(16, rank, generator=g)
    sd = {"blocks.0.ffn.w2.lora_A": torch.randn(rank, 48, generator=g),
          "blocks.0.ffn.w2.lora_B": torch.randn(16, rank, generator=g),
          "blocks.0.self_attn.to_k.lora_A": A, "blocks.0.self_attn.to_k.lora_B": B}
    if alpha is not None:
        sd["blocks.0.ffn.w2.lora_alpha"] = torch.tensor(float(alpha))
        sd["blocks.0.self_attn.to_k.lora_alpha"] = torch.tensor(float(alpha))
    save_file(sd, path)
    return sd


@pytest.mark.parametrize("alpha,scale", [(0.5, 1.0), (0.0, 1.0), (-0.75, 1.0), (0.999, 1.0), (1.9, 0.25),
                                         (3.0, 0.75), (None, 1.0)])
def test_fastvideo_alpha_below_one_means_scale_one(tmp_path, alpha, scale):
    """Mutant: reading lora_alpha without FastVideo's `int()` / `0 -> scale 1` rule. FastVideo applies
    int(alpha) / rank, and scale 1 when int(alpha) is 0 (0.5, 0, -0.75, 0.999) or alpha is absent."""
    path = str(tmp_path / "fv.safetensors")
    sd = _fv_file(path, alpha)
    native = str(tmp_path / "n.safetensors")
    L.convert(path, native, "longcat")
    got = official_delta(native)
    A, B = sd["blocks.0.self_attn.to_k.lora_A"].double(), sd["blocks.0.self_attn.to_k.lora_B"].double()
    qkv = got["blocks.0.attn.qkv"]
    assert qkv.shape == (48, 16)
    assert rel_err(qkv[16:32], scale * (B @ A)) < 1e-15 and qkv[:16].abs().max() == 0 == qkv[32:].abs().max()
    A2, B2 = sd["blocks.0.ffn.w2.lora_A"].double(), sd["blocks.0.ffn.w2.lora_B"].double()
    assert rel_err(got["blocks.0.ffn.w2"], scale * (B2 @ A2)) < 1e-15
    # and through the other formats too (a second reader of the same semantics)
    L.convert(path, str(tmp_path / "k.safetensors"), "kohya")
    from reference import kohya_delta
    kd = kohya_delta(str(tmp_path / "k.safetensors"))
    assert rel_err(kd["blocks.0.ffn.w2"], scale * (B2 @ A2)) < 1e-15
    # qkv has only its to_k rows: written as one LoRA whose up matrix starts at row 16, not 0
    assert rel_err(kd["blocks.0.attn.qkv"][16:32], scale * (B @ A)) < 1e-15
    assert kd["blocks.0.attn.qkv"][:16].abs().max() == 0 == kd["blocks.0.attn.qkv"][32:].abs().max()


@pytest.mark.parametrize("alpha_scale,rank", [(0.25, 2), (0.1, 3), (0.0, 4)])
def test_fastvideo_writer_folds_when_alpha_is_below_one(tmp_path, alpha_scale, rank):
    """Mutant: writing lora_alpha = alpha_scale * rank when it is < 1 (0.5, 0.3, 0): FastVideo would
    read int() = 0 and apply scale 1. The scale must be folded into lora_B and lora_alpha = rank."""
    src = write_native_lora(str(tmp_path / "n.safetensors"), "cfg_step", dims=DIMS, rank=rank, dtype=torch.float32,
                            alpha_scale=alpha_scale, scale_dtype=torch.float64, seed=3)
    out = str(tmp_path / "fv.safetensors")
    L.convert(src, out, "fastvideo")
    fv, nat = load(out), load(src)
    assert fv["blocks.0.ffn.w1.lora_alpha"].item() == float(rank)
    want = (nat[f"{enc('blocks.0.ffn.w1')}.lora_up.weight"].double() * alpha_scale).float()
    assert torch.equal(fv["blocks.0.ffn.w1.lora_B"], want)
    ref, got = official_delta(src), fastvideo_delta(out)
    if alpha_scale == 0.0:
        assert all(v.abs().max() == 0 for v in got.values())
    else:
        assert worst(ref, got) < 1e-7


# --------------------------------------------------------------- merge: --dtype keep / fp16 on bf16, fp16 bases

CFG = DiTConfig(in_channels=4, out_channels=4, hidden_size=32, depth=2, num_heads=2, caption_channels=16,
                adaln_tembed_dim=16, frequency_embedding_size=16, ffn_multiple_of=16)


@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("mergedt")
    bases = {dt: write_base_checkpoint(str(d / f"base_{dt}"), CFG, "longcat", shards=2, dtype=getattr(torch, dt), seed=4)
             for dt in ("bfloat16", "float16")}
    lora = write_native_lora(str(d / "lora.safetensors"), "refinement", dims=CFG.dims, rank=4,
                             dtype=torch.float32, alpha_scale=0.3, seed=8)
    return d, bases, lora


def _shards(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load(os.path.join(path, f)))
    return out


@pytest.mark.parametrize("base_dtype,option,want_dtype", [("bfloat16", "keep", torch.bfloat16),
                                                          ("float16", "keep", torch.float16),
                                                          ("bfloat16", "fp16", torch.float16),
                                                          ("float16", "bf16", torch.bfloat16)])
def test_merge_output_dtypes_and_values(merge_inputs, base_dtype, option, want_dtype):
    """Mutants: `--dtype keep` writing touched weights as F32; `--dtype fp16` mapped to bf16. Every output
    tensor has the expected dtype, and each merged weight is W + 0.7 * dW (float64 reference) rounded once
    to that dtype: within half an ulp of it (plus float32 arithmetic)."""
    d, bases, lora = merge_inputs
    out = str(d / f"out_{base_dtype}_{option}")
    cli("merge", bases[base_dtype], out, "--lora", f"{lora}:0.7", "--dtype", option)
    base, merged = _shards(bases[base_dtype]), _shards(out)
    assert base.keys() == merged.keys()
    ref = official_delta(lora)
    assert all(v.dtype == want_dtype for v in merged.values())
    touched = 0
    for module, dW in ref.items():
        W = base[module + ".weight"]
        want = W.double() + 0.7 * dW
        got = merged[module + ".weight"].double()
        bound = half_ulp(want, want_dtype) * (1 + 2 ** -10) + 2e-7 * (W.double().abs() + dW.abs())
        assert ((got - want).abs() <= bound).all(), (module, ((got - want).abs() / half_ulp(want, want_dtype)).max())
        touched += 1
    assert touched == len(ref) > 0
    for k, v in base.items():  # untouched tensors: bit-identical (keep) or one cast (fp16/bf16)
        if k.removesuffix(".weight") not in ref:
            assert torch.equal(merged[k], v.to(want_dtype)), k


# --------------------------------------------------------------- runtime: the mixed-dtype branch

class Float64Out(nn.Module):
    """A Linear-like layer with a float32 weight whose output is float64 (so the LoRA's dtype, float32,
    differs from the output's and the hook takes its mixed-dtype branch)."""

    def __init__(self, inp, out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, inp, generator=torch.Generator().manual_seed(1)) * 0.1)

    def forward(self, x):
        return x.double() @ self.weight.double().T


def _one_layer_model(layer):
    m = nn.Module()
    m.blocks = nn.ModuleList([nn.Module()])
    m.blocks[0].ffn = nn.Module()
    m.blocks[0].ffn.w1 = layer
    return m


def _w1_lora(path, inp, out, rank=3, scale=0.75, big=1.0, poison=None):
    """A native LoRA of blocks.0.ffn.w1 only; `poison` (row, col, value) overwrites one lora_down element."""
    g = torch.Generator().manual_seed(6)
    down, up = torch.randn(rank, inp, generator=g) * big, torch.randn(out, rank, generator=g) * big
    if poison is not None:
        down[poison[0], poison[1]] = poison[2]
    save_file({f"{enc('blocks.0.ffn.w1')}.lora_down.weight": down, f"{enc('blocks.0.ffn.w1')}.lora_up.weight": up,
               f"{enc('blocks.0.ffn.w1')}.alpha_scale": torch.tensor(scale)}, path)
    return scale * (up.double() @ down.double())


@pytest.mark.parametrize("strength", [0.5, -1.25])
def test_runtime_mixed_dtype_branch_applies_strength(tmp_path, strength):
    """Mutant: the hook's mixed-dtype branch (output dtype != LoRA dtype, as under autocast) dropping
    the strength or the scale. Output = W x + strength * dW x."""
    layer = Float64Out(12, 20)
    model = _one_layer_model(layer)
    dW = _w1_lora(str(tmp_path / "l.safetensors"), 12, 20)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    L.apply_lora(model, str(tmp_path / "l.safetensors"), strength=strength)
    with torch.no_grad():
        got = layer(x)
    want = x.double() @ (layer.weight.double() + strength * dW).T
    assert got.dtype == torch.float64 and rel_err(want, got) < 1e-6
    L.remove_lora(model)


def test_runtime_under_autocast_applies_strength(tmp_path):
    """The same branch as reached in practice: a float32 nn.Linear under CPU bf16 autocast (the layer's
    output is bf16, the LoRA weights float32). The LoRA term must be strength * dW x (bf16 accuracy)."""
    layer = nn.Linear(32, 24, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(24, 32, generator=torch.Generator().manual_seed(3)) * 0.01)
    model = _one_layer_model(layer)
    dW = _w1_lora(str(tmp_path / "l.safetensors"), 32, 24, big=0.5)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = layer(x)
    L.apply_lora(model, str(tmp_path / "l.safetensors"), strength=0.4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    L.remove_lora(model)
    assert got.dtype == torch.bfloat16
    lora_term = got.double() - plain.double()
    assert rel_err(0.4 * (x.double() @ dW.T), lora_term) < 2e-2


# --------------------------------------------------------------- runtime: merge twice, unmerge

def test_merge_lora_twice_then_unmerge_restores_bit_for_bit(tmp_path):
    """Mutant: a second merge_lora overwriting the saved originals, so unmerge_lora restores the
    once-merged weights. Two merges (same layers, bf16 and fp32 weights), then unmerge: every parameter
    equal to the original, bit for bit."""
    from longcat_lora.testing.dit import LongCatDiT

    torch.manual_seed(0)
    model = LongCatDiT(CFG).cast(torch.bfloat16)
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    lora = write_native_lora(str(tmp_path / "l.safetensors"), "refinement", dims=CFG.dims, rank=4,
                             dtype=torch.float32, alpha_scale=0.5, seed=2)
    L.merge_lora(model, lora, strength=1.0)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    L.merge_lora(model, lora, strength=-0.5)
    assert any(not torch.equal(once[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(orig[k], once[k]) for k in orig)
    L.unmerge_lora(model)
    assert all(torch.equal(orig[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------- outputs: temp file, never OUT directly

def _last_module(path):
    """The module whose lora_down lies last in the file (so its up matrix is among the last written)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    downs = [(v["data_offsets"][0], k) for k, v in header.items() if k.endswith(".lora_down.weight")]
    return max(downs)[1].removesuffix(".lora_down.weight")


@pytest.mark.parametrize("to", ["fastvideo", "longcat", "kohya", "peft"])
def test_failed_convert_leaves_existing_out_byte_identical(tmp_path, to):
    """Mutant: writing the output straight to OUT instead of a temp file beside it. A convert that fails
    on the last module (a NaN) with --overwrite leaves an existing OUT byte-identical and no temp file."""
    src = write_native_lora(str(tmp_path / "good.safetensors"), "refinement", dims=DIMS, rank=2,
                            dtype=torch.float32, alpha_scale=0.5, seed=1)
    sd = load_file(src)
    last = _last_module(src)
    up = next(k for k in sd if k.startswith(last + ".lora_up"))
    sd[up][-1, -1] = float("nan")
    bad = str(tmp_path / "bad.safetensors")
    save_file(sd, bad)
    assert _last_module(bad) == last
    out = tmp_path / "out"
    cli("convert", src, out, "--to", to)
    before = {p: open(p, "rb").read() for p in _files(out)}
    p = cli("convert", bad, out, "--to", to, "--overwrite", check=2)
    assert "non-finite" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert {p: open(p, "rb").read() for p in _files(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors", "good.safetensors", "out"]


def _files(path):
    path = str(path)
    if os.path.isdir(path):
        return sorted(os.path.join(path, f) for f in os.listdir(path))
    return [path]


# --------------------------------------------------------------- OUT == input, by resolved path

def test_out_equal_to_input_is_refused_by_resolved_path(tmp_path):
    """Mutant: comparing OUT and the inputs as strings. `dir/./in`, a relative path against an absolute
    one, and a symlink to the input all name the input: refused (exit 2), the input byte-identical."""
    src = write_native_lora(str(tmp_path / "in.safetensors"), "cfg_step", dims=DIMS, rank=2, dtype=torch.float32,
                            alpha_scale=0.5, seed=1)
    raw = open(src, "rb").read()
    os.symlink(src, tmp_path / "link.safetensors")
    (tmp_path / "sub").mkdir()
    cases = [  # (cwd, input, output)
        (None, src, os.path.join(str(tmp_path), ".", "in.safetensors")),
        (None, os.path.join(str(tmp_path), "sub", "..", "in.safetensors"), src),
        (str(tmp_path), src, "in.safetensors"),
        (str(tmp_path / "sub"), "../in.safetensors", src),
        (None, src, str(tmp_path / "link.safetensors")),
        (None, str(tmp_path / "link.safetensors"), src),
    ]
    for cwd, inp, out in cases:
        p = subprocess.run([sys.executable, "-m", "longcat_lora", "convert", inp, out, "--to", "fastvideo",
                            "--overwrite"], capture_output=True, text=True, cwd=cwd,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert p.returncode == 2, (inp, out, p.stdout, p.stderr)
        assert "same path" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert open(src, "rb").read() == raw, (inp, out)
        assert os.path.islink(tmp_path / "link.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "link.safetensors", "sub"]


# --------------------------------------------------------------- safetensors header: overlapping offsets

def _hand_built(path, entries, data: bytes):
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("offsets", [((0, 32), (16, 48)), ((0, 32), (0, 32)), ((16, 48), (0, 32))])
def test_overlapping_data_offsets_are_refused(tmp_path, offsets):
    """Mutant: the header parser accepting overlapping data_offsets (checking only for gaps). Two tensors
    share bytes, yet every size and the file length add up: refused with exit 2 by inspect and convert."""
    (a0, a1), (b0, b1) = offsets
    entries = {"blocks.0.ffn.w1.lora_A": {"dtype": "F32", "shape": [2, 4], "data_offsets": [a0, a1]},
               "blocks.0.ffn.w1.lora_B": {"dtype": "F32", "shape": [4, 2], "data_offsets": [b0, b1]}}
    path = str(tmp_path / "overlap.safetensors")
    _hand_built(path, entries, bytes(range(max(a1, b1))))
    with pytest.raises(Exception):  # the safetensors library refuses it too
        with safe_open(path, "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    for args in (["inspect", path], ["convert", path, str(tmp_path / "o.safetensors"), "--to", "longcat"]):
        p = cli(*args, check=2)
        assert "overlap" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not os.path.exists(tmp_path / "o.safetensors")
    # the same two tensors laid out properly are accepted (so the refusal is about the overlap)
    entries["blocks.0.ffn.w1.lora_A"]["data_offsets"] = [0, 32]
    entries["blocks.0.ffn.w1.lora_B"]["data_offsets"] = [32, 64]
    _hand_built(path, entries, struct.pack("<16f", *range(1, 17)))
    cli("inspect", path)


# --------------------------------------------------------------- PEFT alpha_pattern at the default rank

def test_peft_alpha_pattern_for_a_default_rank_module(tmp_path):
    """Mutant: alpha_pattern written only for modules whose rank differs from the default. Here
    blocks.1.ffn.w1 has the default rank (4) but alpha_scale 1.25 instead of 0.3: real PEFT must load
    it with alpha 5, matching the native reference layer by layer."""
    from peft import PeftModel

    src = write_native_lora(str(tmp_path / "n.safetensors"), "refinement", dims=DIMS, rank=4, dtype=torch.float32,
                            alpha_scale=0.3, seed=2)
    sd = load_file(src)
    sd[f"{enc('blocks.1.ffn.w1')}.alpha_scale"] = torch.tensor(1.25)
    save_file(sd, src)
    out = tmp_path / "adapter"
    cli("convert", src, out, "--to", "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and "blocks.1.ffn.w1" not in cfg["rank_pattern"]
    assert cfg["alpha_pattern"]["blocks.1.ffn.w1"] == 5
    torch.manual_seed(0)
    model = LinearBag(DIMS)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    pm = PeftModel.from_pretrained(model, str(out))
    ref = official_delta(src)
    g = torch.Generator().manual_seed(0)
    for name, dW in ref.items():
        layer = pm.base_model.model.get_submodule(name)
        x = torch.randn(3, dW.shape[1], generator=g)
        with torch.no_grad():
            got = layer(x).double()
        W, b = base[name + ".weight"].double(), base.get(name + ".bias")
        plain = x.double() @ W.T + (b.double() if b is not None else 0)
        assert rel_err(x.double() @ dW.T, got - plain) < 1e-4, name
    assert pm.base_model.model.blocks[1].ffn.w1.scaling["default"] == 1.25


# --------------------------------------------------------------- verify: the numbers it reports

@pytest.mark.parametrize("dense_limit", [1 << 22, 0])
def test_verify_reports_the_reference_relative_error(tmp_path, monkeypatch, dense_limit):
    """`verify.compare` against the float64 reference: per-module relative Frobenius errors, the worst
    module, one-sided modules, through both its dense and its low-rank-factor paths (DENSE_LIMIT 0)."""
    from longcat_lora.commands import verify

    monkeypatch.setattr(verify, "DENSE_LIMIT", dense_limit)
    src = write_native_lora(str(tmp_path / "a.safetensors"), "refinement", dims=DIMS, rank=3, dtype=torch.float32,
                            alpha_scale=0.5, seed=4)
    sd = load_file(src)
    sd[f"{enc('blocks.1.attn.qkv')}.lora_up.blocks.2.weight"][1, 2] += 0.01  # one block of one module
    sd[f"{enc('blocks.0.ffn.w2')}.alpha_scale"] = torch.tensor(0.55)  # a scale only
    for k in [k for k in sd if k.startswith(enc("blocks.1.ffn.w3") + ".")]:
        del sd[k]  # only on one side
    other = str(tmp_path / "b.safetensors")
    save_file(sd, other)
    L.convert(other, str(tmp_path / "b_peft"), "peft")
    ra, rb = official_delta(src), official_delta(other)
    with L.load_lora(src) as a, L.load_lora(str(tmp_path / "b_peft")) as b:
        c = verify.compare(a, b)
    assert c.only_a == ["blocks.1.ffn.w3"] and c.only_b == []
    assert c.errors["blocks.1.ffn.w3"] == 1.0
    for m in rb:
        want = rel_err(ra[m], rb[m])
        assert abs(c.errors[m] - want) <= 1e-9 * max(want, 1e-300) or (want == 0 and c.errors[m] == 0), m
    assert abs(c.errors["blocks.0.ffn.w2"] - 0.05 / 0.55) < 1e-7
    assert 0 < c.errors["blocks.1.attn.qkv"] < 1e-1
    assert sum(1 for e in c.errors.values() if e != 0) == 3
    assert c.worst_module == "blocks.1.ffn.w3" and c.worst == 1.0
    assert not c.equivalent(0.5) and c.equivalent(1.0)
    # the CLI: exit 1 with the module named; exit 0 for two spellings of the same LoRA
    p = cli("verify", src, str(tmp_path / "b_peft"), check=1)
    assert "blocks.1.ffn.w3" in p.stdout and "NOT equivalent" in p.stdout
    L.convert(src, str(tmp_path / "a_fv.safetensors"), "fastvideo")
    p = cli("verify", src, str(tmp_path / "a_fv.safetensors"), "--rtol", "0")
    assert "worst relative error 0.000e+00" in p.stdout


@pytest.mark.parametrize("dense_limit", [1 << 22, 0])
def test_verify_when_the_two_sides_split_rows_differently(tmp_path, monkeypatch, dense_limit):
    """One side keeps qkv as 3 up blocks, the other as one standard LoRA whose up matrix is no longer
    block-diagonal (one off-diagonal entry): compare() must slice each side's parts per row segment
    correctly; its error equals the reference's."""
    from longcat_lora.commands import verify
    from reference import kohya_delta

    monkeypatch.setattr(verify, "DENSE_LIMIT", dense_limit)
    src = write_native_lora(str(tmp_path / "a.safetensors"), "cfg_step", dims=DIMS, rank=3, dtype=torch.float32,
                            alpha_scale=0.5, seed=6)
    k = str(tmp_path / "k.safetensors")
    L.convert(src, k, "kohya")
    sd = load_file(k)
    up = sd["diffusion_model.blocks.0.attn.qkv.lora_up.weight"]
    assert up[0, 3] == 0 and up.shape == (48, 9)
    up[0, 3] = 0.02  # row 0 (block 0) reads column 3 (block 1's rank)
    up[40, 1] = -0.01  # row 40 (block 2) reads column 1 (block 0's rank)
    save_file(sd, k)
    ra, rk = official_delta(src), kohya_delta(k)
    with L.load_lora(src) as a, L.load_lora(k) as b:
        assert len(b.modules["blocks.0.attn.qkv"].parts) == 1 and len(a.modules["blocks.0.attn.qkv"].parts) == 3
        c = verify.compare(a, b)
    want = rel_err(ra["blocks.0.attn.qkv"], rk["blocks.0.attn.qkv"])
    assert want > 1e-3 and abs(c.errors["blocks.0.attn.qkv"] - want) <= 1e-9 * want
    assert c.worst_module == "blocks.0.attn.qkv"
    assert all(e == 0.0 for m, e in c.errors.items() if m != "blocks.0.attn.qkv")


# --------------------------------------------------------------- every bad-input class, in process (fast)

@pytest.mark.parametrize("to", ["fastvideo", "longcat", "peft"])
def test_bad_input_classes_in_process(tmp_path, capsys, to):
    """The bad-input corpus of test_bad_input.py through `cli.main` in this process (seconds, not a
    subprocess per case, so mutation runs can afford it), into three writers: exit 2, one line naming
    the file, no output, nothing left behind."""
    from longcat_lora.commands.cli import main
    from test_bad_input import _cases

    cases = _cases(tmp_path)
    capsys.readouterr()
    for name, path in cases.items():
        out = tmp_path / f"out-{name}"
        before = set(os.listdir(tmp_path))
        code = main(["convert", path, str(out), "--to", to])
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, code, err)
        assert len(err.splitlines()) == 1 and err.startswith("longcat-lora: error: "), (name, err)
        assert "internal error" not in err and os.path.basename(path) in err, (name, err)
        assert not out.exists() and set(os.listdir(tmp_path)) == before, name


def test_runtime_default_strength_is_one(tmp_path):
    """apply_lora and merge_lora without a strength apply the LoRA at multiplier 1 (the official
    default): W x + dW x, and W + dW."""
    layer = nn.Linear(12, 20, bias=False)
    model = _one_layer_model(layer)
    dW = _w1_lora(str(tmp_path / "l.safetensors"), 12, 20)
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(9))
    W = layer.weight.detach().double().clone()
    name = L.apply_lora(model, str(tmp_path / "l.safetensors"))
    assert L.active_loras(model) == {name: 1.0}
    with torch.no_grad():
        assert rel_err(x.double() @ (W + dW).T, layer(x).double()) < 1e-6
    L.remove_lora(model)
    L.merge_lora(model, str(tmp_path / "l.safetensors"))
    assert rel_err(W + dW, layer.weight.detach().double()) < 1e-6
    L.unmerge_lora(model)
    assert torch.equal(layer.weight.detach().double(), W)


# --------------------------------------------------------------- PEFT: the weights file itself; r = 0

def _peft_dir(tmp_path):
    src = write_native_lora(str(tmp_path / "n.safetensors"), "cfg_step", dims=DIMS, rank=2, dtype=torch.float32,
                            alpha_scale=0.75, seed=7)
    L.convert(src, str(tmp_path / "adapter"), "peft")
    return src, tmp_path / "adapter"


def test_peft_weights_file_reads_like_its_directory(tmp_path):
    """README: "a PEFT directory or the weights file inside it". The weights file given directly reads
    with the config beside it (scale 0.75, not 1); alone, it is refused (exit 2, one line)."""
    src, d = _peft_dir(tmp_path)
    native = str(tmp_path / "back.safetensors")
    L.convert(str(d / "adapter_model.safetensors"), native, "longcat")
    assert worst(official_delta(src), official_delta(native)) < 1e-15
    (tmp_path / "lone").mkdir()
    os.replace(d / "adapter_model.safetensors", tmp_path / "lone" / "adapter_model.safetensors")
    p = cli("inspect", tmp_path / "lone" / "adapter_model.safetensors", check=2)
    assert "adapter_config.json" in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("field", ["r", "rank_pattern"])
def test_peft_rank_zero_is_refused_as_not_positive(tmp_path, field):
    """The boundary of "r must be a positive integer": 0 (r, or a rank_pattern value) is refused and
    the message says why, whether or not a module uses it."""
    src, d = _peft_dir(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    if field == "r":
        cfg["r"] = 0
    else:
        cfg["rank_pattern"] = {"blocks.7.ffn.w1": 0}  # a module the file does not have
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    p = cli("inspect", d, check=2)
    assert "positive integer" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


# --------------------------------------------------------------- every reader reads back what its writer wrote

@pytest.mark.parametrize("fmt", ["fastvideo", "peft", "diffusers", "kohya"])
def test_every_format_reads_back_bit_exact(tmp_path, fmt):
    """native -> fmt -> native through this package's own reader of fmt: the same tensors, bit for bit
    (alpha 0.5 * rank is integral, so nothing is folded). The other tests read most outputs with the
    independent reference readers; this one keeps each of our readers under test."""
    src = write_native_lora(str(tmp_path / "n.safetensors"), "refinement", dims=DIMS, rank=2, dtype=torch.bfloat16,
                            alpha_scale=0.5, scale_dtype=torch.float32, seed=11)
    out, back = str(tmp_path / f"x.{fmt}"), str(tmp_path / "back.safetensors")
    L.convert(src, out, fmt)
    L.convert(out, back, "longcat")
    a, b = load(src), load(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_short_reads_are_resumed_at_the_right_offset(tmp_path, monkeypatch):
    """os.preadv may return fewer bytes than asked (signals, network filesystems): the read loop must
    continue where it stopped. With reads cut to 7 bytes a conversion gives the same bytes."""
    src = write_native_lora(str(tmp_path / "n.safetensors"), "cfg_step", dims=DIMS, rank=2, dtype=torch.float32,
                            alpha_scale=0.3, seed=12)
    L.convert(src, str(tmp_path / "a.safetensors"), "fastvideo")
    real = os.preadv

    def short(fd, buffers, offset, *a):
        return real(fd, [memoryview(buffers[0])[:7]], offset, *a)

    monkeypatch.setattr(os, "preadv", short)
    L.convert(src, str(tmp_path / "b.safetensors"), "fastvideo")
    L.convert(src, str(tmp_path / "c.safetensors"), "kohya")
    monkeypatch.undo()
    assert open(tmp_path / "a.safetensors", "rb").read() == open(tmp_path / "b.safetensors", "rb").read()
    from reference import kohya_delta
    assert worst(official_delta(src), kohya_delta(str(tmp_path / "c.safetensors"))) < 1e-15


# --------------------------------------------------------------- mutation survivors (second round)

def test_layer_whose_first_rows_have_no_part_writes_the_zero_band(tmp_path):
    """A FastVideo LoRA on `to_v` alone lands on rows 2h:3h of attn.qkv; the standard formats write one
    [3h, r] up matrix whose first band (rows 0:2h) is zeros. Kills `placed()` starting its band cuts at 1."""
    g = torch.Generator().manual_seed(4)
    h = 8
    A, B = torch.randn(3, h, generator=g), torch.randn(h, 3, generator=g)
    src = str(tmp_path / "v.safetensors")
    save_file({"blocks.0.self_attn.to_v.lora_A": A, "blocks.0.self_attn.to_v.lora_B": B,
               "blocks.0.self_attn.to_v.lora_alpha": torch.tensor(3.0)}, src)
    want = torch.zeros(3 * h, h, dtype=torch.float64)
    want[2 * h:] = B.double() @ A.double()
    for fmt in ("peft", "kohya", "diffusers"):
        out = str(tmp_path / f"v.{fmt}")
        L.convert(src, out, fmt)
        got = lora_delta(out)
        assert list(got) == ["blocks.0.attn.qkv"] and torch.equal(got["blocks.0.attn.qkv"], want), fmt


def test_zero_size_dimension_in_a_header_entry_the_fast_path_leaves(tmp_path):
    """A [0, 4] tensor is valid safetensors; an unknown field sends the entry down the slow validating
    path (`_entry`). Kills its shape bound `0 <= s` turned into `0 < s` or `1 <= s`."""
    from longcat_lora.io.reader import SafeFile

    header = {"empty": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0], "note": "x"},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "z.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + struct.pack("<2f", 1.0, 2.0))
    with safe_open(str(path), "pt") as f:  # the library accepts it
        assert list(f.get_tensor("empty").shape) == [0, 4]
    with SafeFile(str(path)) as sf:
        assert sf.info("empty").shape == (0, 4) and sf.info("empty").nbytes == 0
        assert sf.info("b").shape == (2,)


def test_input_swapped_for_a_fifo_after_the_type_check_never_hangs(tmp_path, monkeypatch):
    """The type is checked before opening; a path swapped for a FIFO between that check and the open
    must not block (the open is non-blocking, then the descriptor is checked). Kills O_NONBLOCK lost
    (`|` -> `&` in open_regular's flags)."""
    import threading

    from longcat_lora.io import reader as st
    from longcat_lora.errors import LoraError

    fifo = str(tmp_path / "swapped")
    os.mkfifo(fifo)
    regular = os.stat(__file__)
    real_stat = os.stat
    monkeypatch.setattr(st.os, "stat", lambda p, *a, **k: regular if str(p) == fifo else real_stat(p, *a, **k))
    result: list[object] = []

    def attempt() -> None:
        try:
            st.open_regular(fifo)
            result.append("opened")
        except LoraError as e:
            result.append(str(e))

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # blocked in open(): release it with a writer, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("open_regular blocked on a FIFO")
    assert result and "not a regular file (a FIFO)" in str(result[0]), result


def test_two_formats_in_one_file_are_named_as_such(tmp_path):
    """Native and FastVideo keys in one file: refused as mixed formats, naming one key of each (not as a
    stray tensor of whichever reader came first). Kills `len(kinds) > 1` turned into `> 2`."""
    P = enc("blocks.0.ffn.w1")
    path = str(tmp_path / "mixed.safetensors")
    save_file({f"{P}.lora_down.weight": torch.randn(2, 8), f"{P}.lora_up.weight": torch.randn(4, 2),
               "blocks.0.self_attn.to_q.lora_A": torch.zeros(2, 8),
               "blocks.0.self_attn.to_q.lora_B": torch.zeros(4, 2)}, path)
    with pytest.raises(L.LoraError, match=r"mixed formats in one file: (longcat|fastvideo) .* and "
                                          r"(longcat|fastvideo) "):
        L.load_lora(path)


def test_zero_size_dimension_on_the_header_fast_path(tmp_path):
    """A plain [0, 4] tensor, written by the safetensors library itself, takes the parser's fast path.
    Kills that path's shape bound `0 <= s` turned into `0 < s`."""
    from longcat_lora.io.reader import SafeFile

    path = str(tmp_path / "z.safetensors")
    save_file({"empty": torch.zeros(0, 4), "b": torch.ones(2)}, path)
    with SafeFile(path) as sf:
        assert sf.info("empty").shape == (0, 4) and sf.info("empty").nbytes == 0 and sf.info("b").shape == (2,)


def test_a_two_byte_pickle_is_named_a_pickle(tmp_path):
    """The smallest pickle header (protocol byte after 0x80) is recognised, never unpickled. Kills the
    length guard `len(head) > 1` turned into `> 2`."""
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"\x80\x04")
    with pytest.raises(L.LoraError, match="a Python pickle"):
        L.load_lora(str(path))


def test_nonfinite_scan_of_an_empty_tensor_at_the_end_of_a_page_aligned_file(tmp_path):
    """A zero-size float tensor whose offset is the file's page-aligned end: nothing to scan (no map of
    zero bytes past the end). Kills `dtype not in _NONFINITE or nbytes == 0` turned into `and`."""
    import mmap as _mmap

    from longcat_lora.io.reader import FileRange, SafeFile

    gran = _mmap.ALLOCATIONGRANULARITY
    data = gran - 8 - 256  # header length (8) + a 256-byte header + data = one page
    header = {"a": {"dtype": "U8", "shape": [data], "data_offsets": [0, data]},
              "e": {"dtype": "F32", "shape": [0], "data_offsets": [data, data]}}
    raw = json.dumps(header).encode()
    raw += b" " * (256 - len(raw))
    path = tmp_path / "aligned.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    assert path.stat().st_size == gran
    with SafeFile(str(path)) as sf:
        info = sf.info("e")
        assert info.start == gran and info.nbytes == 0
        assert sf.scan_nonfinite(FileRange(sf.fd, info.start, 0), "F32") is False


def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    """A header of 0x380 bytes makes the file start with b"\\x80\\x03", a pickle's first two bytes; the file
    is plausibly safetensors (its 9th byte opens the JSON header), so it is read, not refused as a pickle.
    Kills the plausibility check reading byte 9 instead of byte 8."""
    P = enc("blocks.0.ffn.w1")
    header = {f"{P}.lora_down.weight": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
              f"{P}.lora_up.weight": {"dtype": "F32", "shape": [2, 1], "data_offsets": [8, 16]}}
    raw = json.dumps(header).encode()
    raw += b" " * (0x380 - len(raw))
    path = tmp_path / "p.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + struct.pack("<4f", 1.0, 2.0, 3.0, 4.0))
    assert path.read_bytes()[:2] == b"\x80\x03"
    with L.load_lora(str(path)) as a:
        assert a.modules["blocks.0.ffn.w1"].in_features == 2


# ------------------------------------------------------------------ header rules found by tests/test_reader_property.py


def _header_file(tmp_path, header: str, nbytes: int) -> str:
    raw = header.encode("utf-8", "surrogatepass")
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * nbytes)
    return str(path)


@pytest.mark.parametrize("extra, needle", [
    ('"\\ud800"', "not valid Unicode"),  # a lone surrogate in an unknown field, not only in a name
    ('{"\\udc00":1}', "not valid Unicode"),
    ("[" * 126 + "]" * 126, "nested deeper than 127"),  # the header is level 1, the entry level 2
    ("9" * 309, "out of range"),  # an integer past the largest double, as serde_json reads it
    ("-" + "9" * 309, "out of range"),  # and its negative (the library refuses both)
    (str(int(1.7976931348623157e308)), "out of range"),  # the largest double itself, as 309 digits
    ("1.7976931348623158e308", "out of range"),  # finite for Python, infinite for serde_json
])
def test_an_unknown_field_serde_json_refuses_is_refused(tmp_path, extra, needle):
    """The library refuses these headers while Python's json read them: we accepted them."""
    from longcat_lora.errors import LoraError
    from longcat_lora.io.reader import SafeFile

    path = _header_file(tmp_path, '{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + extra + "}}", 8)
    with pytest.raises(LoraError, match=needle):
        SafeFile(path)


def test_an_unknown_field_serde_json_reads_is_read(tmp_path):
    """The neighbours of those edges stay readable: 125 levels, 308 digits, two equal unknown fields."""
    from longcat_lora.io.reader import SafeFile

    for extra in ("[" * 125 + "]" * 125, "9" * 308, '"\\ud83d\\ude00"', "1.7976931348623157e308"):
        path = _header_file(tmp_path, '{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + extra
                            + ',"x":-0}}', 8)
        with SafeFile(path) as f:
            assert f.info("t").shape == (2,) and f.read_raw("t").tobytes() == b"\0" * 8


@pytest.mark.parametrize("shape, offsets, nbytes", [("[-0,2]", "[0,0]", 0), ("[2]", "[-0,8]", 8)])
def test_negative_zero_is_not_an_integer(tmp_path, shape, offsets, nbytes):
    """serde_json reads `-0` as a float, so the library refuses it as a dimension or offset; we read 0."""
    from longcat_lora.errors import LoraError
    from longcat_lora.io.reader import SafeFile

    path = _header_file(tmp_path, f'{{"t":{{"dtype":"F32","shape":{shape},"data_offsets":{offsets}}}}}', nbytes)
    with pytest.raises(LoraError, match="shape|data_offsets"):
        SafeFile(path)


@pytest.mark.parametrize("shape", ["[0,4611686018427387904]", "[4611686018427387904,0]"])
def test_an_empty_tensor_numpy_cannot_hold_is_refused(tmp_path, shape):
    """[0, 2**62] F32 made `read_raw` fail with numpy's ValueError (not a LoraError); [2**62, 0] was read
    though numpy (the library's "np") refuses it. Both are refused at the header now."""
    from longcat_lora.errors import LoraError
    from longcat_lora.io.reader import SafeFile

    path = _header_file(tmp_path, f'{{"t":{{"dtype":"F32","shape":{shape},"data_offsets":[0,0]}}}}', 0)
    with pytest.raises(LoraError, match="2\\*\\*63 bytes"):
        SafeFile(path)


# --------------------------------------------------------------- review of the restructuring (issue 9)

def test_set_adapters_refusal_changes_no_strength(tmp_path):
    """set_adapters that refuses (another adapter is merged) must leave every strength as it was."""
    model = _one_layer_model(nn.Linear(8, 6, bias=False))
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    _w1_lora(a, 8, 6), _w1_lora(b, 8, 6, scale=0.25)
    L.apply_lora(model, a, name="a")
    L.apply_lora(model, b, name="b")
    L.merge_lora(model, names="b")
    with pytest.raises(L.LoraError, match="merged"):
        L.set_adapters(model, "a", weights=0.3)
    assert {n: i.strength for n, i in L.list_loras(model).items()} == {"a": 1.0, "b": 1.0}


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e39])
def test_runtime_refuses_strengths_and_merges_beyond_float32(tmp_path, bad):
    model = _one_layer_model(nn.Linear(8, 6, bias=False))
    before = model.blocks[0].ffn.w1.weight.detach().clone()
    path = str(tmp_path / "a.safetensors")
    _w1_lora(path, 8, 6)
    if bad != 1e39:  # a finite 1e39 is a valid Python float: refused only where it overflows float32
        with pytest.raises(L.LoraError, match="strength: must be a finite number"):
            L.apply_lora(model, path, strength=bad)
        assert L.list_loras(model) == {}
    name = L.apply_lora(model, path)
    if bad != 1e39:
        with pytest.raises(L.LoraError, match="strength: must be a finite number"):
            L.set_lora_strength(model, name, bad)
    else:
        L.set_lora_strength(model, name, bad)
        with pytest.raises(L.LoraError, match="non-finite values"):
            L.merge_lora(model, names=name)
    with pytest.raises(L.LoraError, match="non-finite|finite number"):
        L.merge_lora(model, path, strength=bad)
    assert torch.equal(model.blocks[0].ffn.w1.weight, before)  # nothing merged


def test_runtime_refuses_a_lora_with_nan(tmp_path):
    model = _one_layer_model(nn.Linear(8, 6, bias=False))
    path = str(tmp_path / "nan.safetensors")
    _w1_lora(path, 8, 6, poison=(1, 2, float("nan")))
    with pytest.raises(L.LoraError, match="NaN/Inf"):
        L.apply_lora(model, path)
    assert L.list_loras(model) == {}
    with pytest.raises(L.LoraError, match="non-finite"):
        L.merge_lora(model, path)


def test_fastvideo_alpha_not_representable_in_float32_is_folded_exactly(tmp_path):
    """alpha = scale * rank = 2**24 + 1 is an integer, but FastVideo's lora_alpha is stored as F32, where it
    rounds to 2**24: the scale must be folded into lora_B instead (a wrong scale otherwise)."""
    src, out = str(tmp_path / "a.safetensors"), str(tmp_path / "fv.safetensors")
    want = _w1_lora(src, 8, 6, rank=4, scale=(2 ** 24 + 1) / 4)
    assert cli("convert", src, out, "--to", "fastvideo").returncode == 0
    got = fastvideo_delta(out)["blocks.0.ffn.w1"]
    assert rel_err(got, want) < 1e-6


def test_fastvideo_alpha_beyond_float32_is_refused_not_written_as_inf(tmp_path):
    src, out = str(tmp_path / "a.safetensors"), tmp_path / "fv.safetensors"
    _w1_lora(src, 8, 6, rank=4, scale=3e38)
    p = cli("convert", src, out, "--to", "fastvideo", check=2)
    assert p.stderr.count("\n") == 1 and "non-finite values (NaN/Inf)" in p.stderr, p.stderr
    assert not out.exists()


def test_combine_nonfinite_refusal_offers_no_flag_combine_lacks(tmp_path):
    bad, ok, out = str(tmp_path / "bad.safetensors"), str(tmp_path / "ok.safetensors"), tmp_path / "c.safetensors"
    _w1_lora(bad, 8, 6, poison=(0, 0, float("inf")))
    _w1_lora(ok, 8, 6)
    p = cli("combine", out, "--lora", bad, "--lora", ok, check=2)
    assert p.stderr.count("\n") == 1 and "non-finite" in p.stderr and "allow" not in p.stderr, p.stderr
    assert not out.exists()


def test_merge_strength_that_overflows_is_a_clean_refusal(tmp_path, merge_inputs):
    """Strengths whose result the output dtype cannot hold (or that are not finite) are one-line refusals;
    a strength beyond float32 whose merged values still fit is merged (the sums are float64)."""
    d, bases, lora = merge_inputs
    for strength in ("inf", "-1e300", "1e308"):
        out = tmp_path / f"out{strength}"
        p = cli("merge", bases["bfloat16"], out, "--lora", f"{lora}:{strength}", "--device", "cpu", check=2)
        assert p.stderr.count("\n") == 1 and "finite" in p.stderr, p.stderr
        assert not out.exists()
    cli("merge", bases["bfloat16"], tmp_path / "big", "--lora", f"{lora}:1e36", "--dtype", "fp32", "--device", "cpu")


def test_single_threaded_overlapping_callers_restore_torch_threads():
    """resize's helper threads enter and leave single_threaded in any order: torch's process-wide thread
    count must come back once the last one leaves (an A-in, B-in, A-out, B-out overlap left it at 1)."""
    from longcat_lora.algebra.cells import single_threaded

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, b = single_threaded(), single_threaded()
        a.__enter__()
        b.__enter__()
        assert torch.get_num_threads() == 1
        a.__exit__(None, None, None)
        assert torch.get_num_threads() == 1  # b is still inside
        b.__exit__(None, None, None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_output_into_a_closed_pipe_stops_quietly(tmp_path):
    """`longcat-lora inspect F | head`: when the reader has gone, exit 141 (SIGPIPE's status) with nothing on
    stderr (it printed 'error: : Broken pipe', with an empty file name)."""
    src = write_native_lora(str(tmp_path / "a.safetensors"), "refinement", dims=CFG.dims, rank=2)
    p = subprocess.Popen([sys.executable, "-m", "longcat_lora", "inspect", src], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first write
    err = p.stderr.read()
    assert p.wait() == 141 and err == b""


def test_one_entry_above_the_diagonal_keeps_a_standard_layer_whole(tmp_path):
    """Issue 21's surviving mutant: the block-diagonal check must look at every column right of a block
    (from (j+1)*r), not from (j+1)*h: with 4 rows and 2 columns per block, an entry in row 0, column 2
    lies above the diagonal and must keep the up matrix whole (split, it would be dropped)."""
    up = torch.zeros(8, 4)
    up[:4, :2] = torch.arange(1, 9, dtype=torch.float32).view(4, 2)
    up[4:, 2:] = torch.arange(9, 17, dtype=torch.float32).view(4, 2)
    up[0, 2] = 0.5
    down = torch.arange(24, dtype=torch.float32).view(4, 6) / 8
    path = str(tmp_path / "k.safetensors")
    save_file({"diffusion_model.blocks.0.ffn.w1.lora_down.weight": down,
               "diffusion_model.blocks.0.ffn.w1.lora_up.weight": up,
               "diffusion_model.blocks.0.ffn.w1.alpha": torch.tensor(4.0)}, path)
    m = L.load_lora(path).modules["blocks.0.ffn.w1"]
    assert len(m.parts) == 1
    assert torch.equal(m.delta(), up.double() @ down.double())
    up[0, 2] = 0.0  # without it the layer is block-diagonal and splits in two, with the same change
    save_file({"diffusion_model.blocks.0.ffn.w1.lora_down.weight": down,
               "diffusion_model.blocks.0.ffn.w1.lora_up.weight": up,
               "diffusion_model.blocks.0.ffn.w1.alpha": torch.tensor(4.0)}, path)
    m = L.load_lora(path).modules["blocks.0.ffn.w1"]
    assert len(m.parts) == 2 and torch.equal(m.delta(), up.double() @ down.double())
