"""`extract`: a LoRA from a base and a fine-tuned checkpoint, checked against planted low-rank changes.

Expected values come from the planted changes (float64), from the two checkpoint files read with the
real safetensors library (`tuned - base` in float64), and from independent float64 SVDs; the output is
read back with reference.official_delta (the official forward), never with the code under test.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_lora import LoraError
from longcat_lora.algebra.extract import extract_lora
from longcat_lora.testing.dit import TINY, convert_state_dict
from longcat_lora.testing.fixtures import write_base_checkpoint
from longcat_lora.model.naming import TABLE

from conftest import cli
from reference import SEP, load, official_delta, rel_err

# module -> singular values of each up block's planted change ([] = that block unchanged)
PLANT = {
    "blocks.1.attn.qkv": [[0.5, 0.3, 0.2], [0.4], []],
    "blocks.2.adaLN_modulation.1": [[0.3, 0.2], [0.3], [0.2, 0.1, 0.05], [0.1], [0.3, 0.3], [0.2]],
    "blocks.0.ffn.w2": [[0.6, 0.2, 0.1]],
    "blocks.3.cross_attn.kv_linear": [[0.2, 0.1], [0.3, 0.2, 0.1]],
    "final_layer.adaLN_modulation.1": [[0.2], [0.1, 0.05]],
    "final_layer.linear": [[0.3, 0.1]],
}
RANK = 3
OTHER_CHANGES = ["blocks.0.attn.q_norm.weight", "blocks.1.attn.qkv.bias"]
CHUNKS = {"attn.qkv": 3, "cross_attn.kv_linear": 2, "adaLN_modulation.1": 6, "final_layer.adaLN_modulation.1": 2}


def _low_rank(h: int, w: int, s: list[float], seed: int) -> torch.Tensor:
    """A float64 [h, w] matrix with exactly the singular values s (random singular vectors)."""
    if not s:
        return torch.zeros(h, w, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(h, len(s), generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(w, len(s), generator=g, dtype=torch.float64))[0]
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


def _planted(shape: tuple[int, int], blocks: list[list[float]], seed: int) -> torch.Tensor:
    h = shape[0] // len(blocks)
    return torch.cat([_low_rank(h, shape[1], s, seed * 10 + i) for i, s in enumerate(blocks)], 0)


def _read_dir(path: str) -> dict[str, torch.Tensor]:
    if os.path.isfile(path):
        return load_file(path)
    sd = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(path, f)))
    return sd


def _tuned_like(base_dir: str, out_dir: str, plant: dict, noise: dict | None = None) -> dict[str, torch.Tensor]:
    """Copy a sharded base, adding the planted changes (and small other changes); returns the planted
    float64 changes per module."""
    shutil.copytree(base_dir, out_dir)
    deltas = {}
    for f in os.listdir(out_dir):
        if not f.endswith(".safetensors"):
            continue
        sd = load_file(os.path.join(out_dir, f))
        for k in list(sd):
            module = k.removesuffix(".weight")
            if module in plant:
                d = _planted(tuple(sd[k].shape), plant[module], seed=len(deltas) + 1)
                if noise and module in noise:
                    g = torch.Generator().manual_seed(99)
                    d = d + noise[module] * torch.randn(d.shape, generator=g, dtype=torch.float64)
                deltas[module] = d
                sd[k] = (sd[k].double() + d).to(sd[k].dtype)
            if k == "blocks.0.attn.q_norm.weight":
                sd[k] = sd[k] * 1.1
            if k == "blocks.1.attn.qkv.bias":
                sd[k] = sd[k] + 0.01
        save_file(sd, os.path.join(out_dir, f), {"format": "pt"})
    assert set(deltas) == set(plant)
    return deltas


def _true_change(base: str, tuned: str, names) -> dict[str, torch.Tensor]:
    """tuned - base in float64, per LongCat module, read with the real safetensors library."""
    b = convert_state_dict(_read_dir(base), "longcat")
    t = convert_state_dict(_read_dir(tuned), "longcat")
    return {m: t[m + ".weight"].double() - b[m + ".weight"].double() for m in names}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("extract")
    base = write_base_checkpoint(str(d / "base"), TINY, "longcat", shards=2, dtype=torch.float32)
    planted = _tuned_like(base, str(d / "tuned"), PLANT)
    true = _true_change(base, str(d / "tuned"), PLANT)
    return d, base, str(d / "tuned"), planted, true


def _all_modules() -> set[str]:
    return {k.longcat.format(i=i) for k in TABLE if not k.avatar
            for i in (range(TINY.depth) if k.per_block else [None])}


def test_extract_recovers_planted_change_at_its_rank(ckpts):
    d, base, tuned, planted, true = ckpts
    out = str(d / "out.safetensors")
    p = cli("extract", base, tuned, out, "--rank", RANK, "--json")
    rep = json.loads(p.stdout)
    got = official_delta(out)
    assert set(got) == set(PLANT)
    for m in PLANT:
        assert rel_err(got[m], true[m]) <= 1e-5, m
        assert rel_err(got[m], planted[m]) <= 1e-5, m
    # the fused native layout: every up block at rank R, one alpha_scale
    sd = load(out)
    for m, blocks in PLANT.items():
        enc = "lora" + SEP + m.replace(".", SEP)
        n = len(blocks)
        assert sd[f"{enc}.lora_down.weight"].shape[0] == n * RANK, m
        if n == 1:
            assert sd[f"{enc}.lora_up.weight"].shape[1] == RANK
        else:
            assert sorted(k for k in sd if k.startswith(enc + ".lora_up.blocks.")) == \
                sorted(f"{enc}.lora_up.blocks.{i}.weight" for i in range(n))
            assert all(sd[f"{enc}.lora_up.blocks.{i}.weight"].shape[1] == RANK for i in range(n))
        assert n == CHUNKS.get(m.split(".", 2)[-1] if m.startswith("blocks.") else m, 1)
    # the report: the true error of what was written, ranks, identical weights, other changes
    mods = {r["module"]: r for r in rep["modules"]}
    assert set(mods) == set(PLANT)
    for m, blocks in PLANT.items():
        err = (got[m] - true[m]).norm().item() / true[m].norm().item()
        assert abs(mods[m]["rel_error"] - err) <= 1e-6 * err + 1e-12, (m, mods[m]["rel_error"], err)
        assert mods[m]["rank_after"] == RANK
        assert mods[m]["part_ranks"] == [RANK if s else 0 for s in blocks]
        assert mods[m]["retained"] >= 1 - 1e-10
    assert sorted(rep["skipped"]) == sorted(_all_modules() - set(PLANT))
    assert sorted(rep["not_representable"]) == OTHER_CHANGES


def test_reported_error_is_the_eckart_young_optimum_and_the_true_error(ckpts, tmp_path):
    """Below the planted rank, with noise: each up block's error is the optimum of an independent SVD."""
    d, base, _, _, _ = ckpts
    plant = {"blocks.0.attn.proj": [[0.5, 0.4, 0.3, 0.2]], "blocks.4.attn.qkv": [[0.5, 0.3, 0.2], [0.4, 0.3], [0.1]]}
    tuned = str(tmp_path / "tuned")
    _tuned_like(base, tuned, plant, noise={"blocks.0.attn.proj": 1e-3, "blocks.4.attn.qkv": 1e-3})
    true = _true_change(base, tuned, plant)
    out = str(tmp_path / "out.safetensors")
    rep = extract_lora(base, tuned, out, rank=2)
    got = official_delta(out)
    mods = {r.module: r for r in rep.modules}
    for m, blocks in plant.items():
        h = true[m].shape[0] // len(blocks)
        tails = []
        for i in range(len(blocks)):
            s = torch.linalg.svdvals(true[m][i * h:(i + 1) * h])
            tails.append(float((s[2:] ** 2).sum()))
        optimum = (sum(tails) / float((true[m] ** 2).sum())) ** 0.5
        err = (got[m] - true[m]).norm().item() / true[m].norm().item()
        assert optimum > 1e-3
        assert abs(err - optimum) <= 1e-6 * optimum, (m, err, optimum)
        assert abs(mods[m].rel_error - err) <= 1e-9 * err, (m, mods[m].rel_error, err)
        assert abs(mods[m].retained - (1 - optimum ** 2)) <= 1e-9


def test_randomized_svd_on_a_large_block(tmp_path):
    """A block too large for the exact path (float32, randomized): near-optimal, and the error reported
    is the true error of the written factors."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2048, 2560, generator=g) * 0.02
    s = [0.8 ** i for i in range(8)]
    plant = _low_rank(2048, 2560, s, 5) + 2e-5 * torch.randn(2048, 2560, generator=g, dtype=torch.float64)
    save_file({"blocks.0.ffn.w1.weight": w}, str(tmp_path / "base.safetensors"))
    save_file({"blocks.0.ffn.w1.weight": (w.double() + plant).float()}, str(tmp_path / "tuned.safetensors"))
    true = load_file(str(tmp_path / "tuned.safetensors"))["blocks.0.ffn.w1.weight"].double() - w.double()
    rep = extract_lora(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                       str(tmp_path / "out.safetensors"), rank=8)
    got = official_delta(str(tmp_path / "out.safetensors"))["blocks.0.ffn.w1"]
    sv = torch.linalg.svdvals(true)
    optimum = float((sv[8:] ** 2).sum() / (sv ** 2).sum()) ** 0.5
    err = (got - true).norm().item() / true.norm().item()
    assert optimum * (1 - 1e-6) <= err <= optimum * 1.01, (err, optimum)
    assert abs(rep.modules[0].rel_error - err) <= 1e-3 * err, (rep.modules[0].rel_error, err)


@pytest.mark.parametrize("layout", ["fastvideo", "mixed"])
def test_fastvideo_named_checkpoints_give_the_fused_native_layout(ckpts, tmp_path, layout):
    """A FastVideo-named base (split to_q/to_k/to_v, adaln_linear_1, ...) and tuned, or an official base
    with a FastVideo fine-tune: the output is native, fused, with the same change."""
    d, base, tuned, planted, true = ckpts
    fv_base, fv_tuned = str(tmp_path / "base_fv.safetensors"), str(tmp_path / "tuned_fv.safetensors")
    save_file(convert_state_dict(_read_dir(base), "fastvideo"), fv_base)
    save_file(convert_state_dict(_read_dir(tuned), "fastvideo"), fv_tuned)
    assert "blocks.1.self_attn.to_q.weight" in load_file(fv_tuned)
    out = str(tmp_path / "out.safetensors")
    rep = extract_lora(fv_base if layout == "fastvideo" else base, fv_tuned, out, rank=RANK)
    got = official_delta(out)
    assert set(got) == set(PLANT)
    for m in PLANT:
        assert rel_err(got[m], planted[m]) <= 1e-5, m
    enc = "lora" + SEP + "blocks.1.attn.qkv".replace(".", SEP)
    assert sum(k.startswith(enc + ".lora_up.blocks.") for k in load(out)) == 3
    assert sorted(rep.not_representable) == OTHER_CHANGES


SPECTRUM = {"blocks.1.attn.qkv": [[1.0, 0.5, 0.25, 0.125, 0.0625], [1.0, 0.1], [0.3, 0.2, 0.1]]}


@pytest.fixture(scope="module")
def spectrum_ckpts(ckpts):
    d, base, _, _, _ = ckpts
    tuned = str(d / "tuned_spectrum")
    _tuned_like(base, tuned, SPECTRUM)
    return d, base, tuned, _true_change(base, tuned, SPECTRUM)["blocks.1.attn.qkv"]


def _smallest(true_block: torch.Tensor, ok) -> int:
    s2 = torch.linalg.svdvals(true_block) ** 2
    total = float(s2.sum())
    for k in range(1, len(s2) + 1):
        if ok(float(s2[:k].sum()), float(s2[k:].sum()), total):
            return k
    raise AssertionError


@pytest.mark.parametrize("flag,value", [("--energy", 0.9), ("--energy", 0.99), ("--energy", 0.999),
                                        ("--max-error", 0.3), ("--max-error", 0.05)])
def test_energy_and_max_error_pick_the_smallest_qualifying_rank(spectrum_ckpts, tmp_path, flag, value):
    d, base, tuned, true = spectrum_ckpts
    if flag == "--energy":
        def ok(kept, tail, total):
            return kept >= value * total
    else:
        def ok(kept, tail, total):
            return tail <= value ** 2 * total
    want = [_smallest(true[i * 64:(i + 1) * 64], ok) for i in range(3)]
    assert len(set(want)) > 1  # blocks need different ranks
    out = str(tmp_path / "out.safetensors")
    rep = json.loads(cli("extract", base, tuned, out, flag, value, "--json").stdout)
    (m,) = rep["modules"]
    assert m["part_ranks"] == want
    assert m["rank_after"] == max(want)  # native: one rank per module, blocks zero-padded
    sd = load(out)
    enc = "lora" + SEP + "blocks.1.attn.qkv".replace(".", SEP)
    for i, k in enumerate(want):  # each block's change really has the chosen rank
        up = sd[f"{enc}.lora_up.blocks.{i}.weight"].double()
        assert int((up.abs().sum(0) > 0).sum()) == k
    got = official_delta(out)["blocks.1.attn.qkv"]
    for i in range(3):
        blk_true, blk_got = true[i * 64:(i + 1) * 64], got[i * 64:(i + 1) * 64]
        e2 = float(((blk_got - blk_true) ** 2).sum())
        kept = float((blk_true ** 2).sum()) - e2
        assert ok(kept, e2, float((blk_true ** 2).sum()))


def _write_single(sd: dict, path: str) -> str:
    save_file(sd, path, {"format": "pt"})
    return path


@pytest.fixture(scope="module")
def single(ckpts):
    """The base and tuned checkpoints as single files (so tests can edit a tensor)."""
    d, base, tuned, _, _ = ckpts
    return _read_dir(base), _read_dir(tuned)


def _bad_tuned(kind: str, sd: dict) -> dict:
    sd = dict(sd)
    if kind == "shape":
        sd["blocks.5.attn.proj.weight"] = sd["blocks.5.attn.proj.weight"][:, :63].contiguous()
    elif kind == "missing":
        del sd["blocks.6.ffn.w3.weight"]
    elif kind == "extra":
        sd["blocks.0.extra.weight"] = torch.zeros(2, 2)
    elif kind == "int":
        sd["blocks.7.cross_attn.proj.weight"] = sd["blocks.7.cross_attn.proj.weight"].to(torch.int32)
    elif kind == "both-namings":
        sd["blocks.1.self_attn.to_q.weight"] = sd["blocks.1.attn.qkv.weight"][:64].clone()
    elif kind == "nan":
        w = sd["blocks.2.ffn.w1.weight"].clone()
        w[3, 4] = float("nan")
        sd["blocks.2.ffn.w1.weight"] = w
    return sd


@pytest.mark.parametrize("kind,needle", [("shape", "blocks.5.attn.proj.weight"), ("missing", "blocks.6.ffn.w3.weight"),
                                         ("extra", "blocks.0.extra.weight"), ("int", "blocks.7.cross_attn.proj.weight"),
                                         ("both-namings", "blocks.1.self_attn.to_q.weight"),
                                         ("nan", "blocks.2.ffn.w1")])
def test_mismatched_checkpoints_exit_2_with_one_line_and_write_nothing(single, tmp_path, kind, needle):
    b, t = single
    base = _write_single(b, str(tmp_path / "base.safetensors"))
    tuned = _write_single(_bad_tuned(kind, t), str(tmp_path / "tuned.safetensors"))
    before = sorted(os.listdir(tmp_path))
    p = cli("extract", base, tuned, tmp_path / "out.safetensors", "--rank", 2, check=2)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("longcat-lora: error: "), p.stderr
    assert needle in lines[0] and "tuned.safetensors" in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temp file


@pytest.mark.parametrize("args,needle", [([], "--rank"), (["--rank", "0"], "--rank"), (["--energy", "1.5"], "--energy"),
                                         (["--energy", "0"], "--energy"), (["--max-error", "1"], "--max-error"),
                                         (["--rank", "2", "--energy", "0.9"], "--energy"),
                                         (["--rank", "2", "--device", "cuda"], "--device"),
                                         (["--rank", "2", "--device", "foo"], "--device foo: must be")])
def test_bad_options_exit_2_with_one_line(ckpts, tmp_path, args, needle):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    d, base, tuned, _, _ = ckpts
    p = cli("extract", base, tuned, tmp_path / "out.safetensors", *args, check=2)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert not os.listdir(tmp_path)


def test_library_errors_name_parameters(ckpts, tmp_path):
    d, base, tuned, _, _ = ckpts
    with pytest.raises(LoraError, match="rank"):
        extract_lora(base, tuned, str(tmp_path / "o.safetensors"), rank=0)
    with pytest.raises(LoraError, match="exactly one"):
        extract_lora(base, tuned, str(tmp_path / "o.safetensors"))
    with pytest.raises(LoraError, match="format"):
        extract_lora(base, tuned, str(tmp_path / "o.safetensors"), rank=2, format="lycoris")
    with pytest.raises(LoraError, match="nothing to extract|no change"):
        extract_lora(base, base, str(tmp_path / "o.safetensors"), rank=2)
    assert not os.listdir(tmp_path)


def test_existing_output_is_refused_then_replaced_with_overwrite(ckpts, tmp_path):
    d, base, tuned, _, true = ckpts
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    p = cli("extract", base, tuned, out, "--rank", 3, check=2)
    assert "already exists" in p.stderr and out.read_bytes() == b"keep me"
    cli("extract", base, tuned, out, "--rank", 3, "--overwrite")
    assert rel_err(official_delta(str(out))["blocks.0.ffn.w2"], true["blocks.0.ffn.w2"]) <= 1e-5


def test_extract_to_peft_loads_in_real_peft(ckpts, tmp_path):
    """extract --to peft: real PEFT loads it without key warnings, and each adapted layer computes
    W x + dW x with dW the change between the checkpoints (<= 1e-5 relative)."""
    from test_formats import _check_layers, load_in_real_peft

    d, base, tuned, _, true = ckpts
    out = tmp_path / "adapter"
    cli("extract", base, tuned, out, "--rank", RANK, "--to", "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(PLANT)
    pm, base_sd = load_in_real_peft(out, TINY.dims)
    _check_layers(pm.base_model.model, true, base_sd)


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official per-row symmetric INT8 scheme, spelled out from the spec (section 5)."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.round(w.float() / scale[:, None]).clamp(-128, 127).to(torch.int8), scale


def test_int8_base_is_read_as_int8_times_scale(single, tmp_path):
    """An INT8 base (weight_int8 + weight_scale per Linear, final_layer.linear left float, as the
    official quantizer does) against a float fine-tune of it: the change is tuned - int8 * scale."""
    b, _ = single
    q_sd, deq = {}, {}
    for k, v in b.items():
        module = k.removesuffix(".weight")
        if k.endswith(".weight") and v.dim() == 2 and "final_layer.linear" not in k and \
                any(module == t.longcat.format(i=i) for t in TABLE for i in range(TINY.depth)):
            q, s = _quantize(v)
            q_sd[module + ".weight_int8"], q_sd[module + ".weight_scale"] = q, s
            deq[k] = q.double() * s.double()[:, None]
        else:
            q_sd[k] = v
    assert "blocks.1.attn.qkv.weight_int8" in q_sd and "final_layer.linear.weight" in q_sd
    plant = {m: _planted(tuple(b[m + ".weight"].shape), s, i + 1) for i, (m, s) in enumerate(PLANT.items())}
    # float64, so an unchanged weight is exactly int8 * scale (in float32 that product would round)
    tuned = {k: deq.get(k, v.double()) + plant.get(k.removesuffix(".weight"), 0) for k, v in b.items()}
    base_path = _write_single(q_sd, str(tmp_path / "base_int8.safetensors"))
    tuned_path = _write_single(tuned, str(tmp_path / "tuned.safetensors"))
    out = str(tmp_path / "out.safetensors")
    rep = extract_lora(base_path, tuned_path, out, rank=RANK)
    got = official_delta(out)
    assert set(got) == set(PLANT)
    for m in PLANT:
        true = tuned[m + ".weight"].double() - deq.get(m + ".weight", b[m + ".weight"].double())
        assert rel_err(got[m], true) <= 1e-5, m
        assert rel_err(got[m], plant[m]) <= 1e-5, m
    assert rep.not_representable == []
