"""resize and combine (issue 11, part A), checked against independent float64 references.

Expected values come from `reference.official_delta` (the official forward read with the real safetensors
library) and `torch.linalg.svdvals` of the materialised changes, never from longcat_lora's algebra code.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longcat_lora import convert
from longcat_lora.algebra import combine_loras, resize_lora
from longcat_lora.model.naming import DitDims

from conftest import DIMS, cli
from reference import SEP, official_delta, rel_err

RANK = 6


def up_blocks(path: str) -> dict[str, int]:
    """module -> number of up blocks of a native file (read with the real safetensors)."""
    out: dict[str, int] = {}
    with safe_open(path, "pt") as f:
        for k in f.keys():
            enc, _, leaf = k.removeprefix("lora" + SEP).partition(".")
            if leaf.startswith("lora_up"):
                out[enc.replace(SEP, ".")] = out.get(enc.replace(SEP, "."), 0) + 1
    return out


def block_svals(dW: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Singular values of each up block's change (row chunk), independently in float64."""
    return [torch.linalg.svdvals(c) for c in torch.chunk(dW, n, 0)]


def optimum(dW: torch.Tensor, ranks: list[int]) -> float:
    """Eckart-Young: the least relative Frobenius error with block i truncated at ranks[i]."""
    tail = sum(float((s[k:] ** 2).sum()) for s, k in zip(block_svals(dW, len(ranks)), ranks))
    return (tail / float(dW.norm() ** 2)) ** 0.5


def true_errors(ref: dict[str, torch.Tensor], out_path: str) -> dict[str, float]:
    got = official_delta(out_path)
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))[:5]
    return {m: float((ref[m] - got[m]).norm() / ref[m].norm()) for m in ref}


def report_errors(report) -> dict[str, float]:
    return {m.module: m.rel_error for m in report.modules}


@pytest.fixture
def src(native):
    return native("refinement", rank=RANK, dtype=torch.float32, alpha_scale=0.3, name="src.safetensors")


# ---------------------------------------------------------------- resize


def test_full_rank_resize_reproduces_the_weight_change(src, tmp_path):
    out = str(tmp_path / "full.safetensors")
    report = resize_lora(src, out, rank=RANK)
    ref = official_delta(src)
    errs = true_errors(ref, out)
    assert max(errs.values()) <= 1e-6
    assert max(report_errors(report).values()) <= 1e-6
    assert len(report.modules) == len(ref) == 386
    assert report.params_after == report.params_before  # same ranks, same fused layout
    assert all(m.rank_before == m.rank_after == RANK and m.retained > 1 - 1e-12 for m in report.modules)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_k_is_the_eckart_young_optimum_of_each_up_block_and_the_report_is_true(native, tmp_path, dtype):
    src = native("refinement", rank=RANK, dtype=dtype, alpha_scale=0.3, name="src.safetensors")
    ref, nblocks = official_delta(src), up_blocks(src)
    out = str(tmp_path / "r2.safetensors")
    report = resize_lora(src, out, rank=2)
    errs, rep = true_errors(ref, out), report_errors(report)
    with safe_open(out, "pt") as f:
        for m, n in nblocks.items():
            down = f.get_slice(f"lora{SEP}{m.replace('.', SEP)}.lora_down.weight").get_shape()
            assert down[0] == 2 * n, m  # fused layout kept: rank 2 for each of the n up blocks
    for m, dW in ref.items():
        opt = optimum(dW, [2] * nblocks[m])
        # bf16: the stored factors' rounding (~1e-3 of the kept part) adds to the truncation error
        assert errs[m] == pytest.approx(opt, rel=1e-4 if dtype == torch.float32 else 2e-3), m
        assert rep[m] == pytest.approx(errs[m], rel=1e-4, abs=1e-9), m
        tail = sum(float((s[2:] ** 2).sum()) for s in block_svals(dW, nblocks[m]))
        kept = next(x.retained for x in report.modules if x.module == m)
        assert kept == pytest.approx(1 - tail / float(dW.norm() ** 2), rel=1e-6), m
    assert report.worst_error == pytest.approx(max(errs.values()), rel=1e-4)
    assert report.mean_error == pytest.approx(sum(errs.values()) / len(errs), rel=1e-4)
    assert report.bytes_after == os.path.getsize(out) and report.bytes_before == os.path.getsize(src)


def test_reported_error_includes_the_output_dtype_rounding(native, tmp_path):
    """At full rank the only error is rounding the new factors to bf16 (~1e-3): the report must show it."""
    src = native("cfg_step", rank=RANK, dtype=torch.bfloat16, name="src.safetensors")
    ref = official_delta(src)
    out = str(tmp_path / "bf16.safetensors")
    report = resize_lora(src, out, rank=RANK)
    errs, rep = true_errors(ref, out), report_errors(report)
    assert min(errs.values()) > 1e-4  # rounding really happened
    for m in ref:
        assert rep[m] == pytest.approx(errs[m], rel=1e-4), m
    with safe_open(out, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith(".weight")} == {"BF16"}


def _spiky(native, tmp_path) -> str:
    """A LoRA whose up blocks have different spectra: qkv block 0 of every layer is nearly rank 1."""
    src = native("refinement", rank=RANK, dtype=torch.float32, alpha_scale=0.3, name="spiky0.safetensors")
    sd = load_file(src)
    for i in range(DIMS.depth):
        k = f"lora{SEP}blocks{SEP}{i}{SEP}attn{SEP}qkv.lora_up.blocks.0.weight"
        sd[k][:, 0] *= 30.0
    path = str(tmp_path / "spiky.safetensors")
    save_file(sd, path)
    return path


def _nonzero_cols(t: torch.Tensor) -> int:
    nz = (t != 0).any(0).nonzero()
    return int(nz.max()) + 1 if len(nz) else 0


@pytest.mark.parametrize("flag,value", [("energy", 0.8), ("max_error", 0.35)])
def test_energy_and_max_error_pick_the_smallest_qualifying_rank_per_up_block(native, tmp_path, flag, value):
    src = _spiky(native, tmp_path)
    ref, nblocks = official_delta(src), up_blocks(src)
    out = str(tmp_path / "rule.safetensors")
    report = resize_lora(src, out, **{flag: value})
    sd = load_file(out)
    errs, rep = true_errors(ref, out), report_errors(report)

    def qualifies(s: torch.Tensor, k: int) -> bool:
        total = float((s ** 2).sum())
        if flag == "energy":
            return float((s[:k] ** 2).sum()) >= value * total
        return (float((s[k:] ** 2).sum()) / total) ** 0.5 <= value

    padded = 0
    for m, dW in ref.items():
        n = nblocks[m]
        enc = f"lora{SEP}{m.replace('.', SEP)}"
        ups = [sd[f"{enc}.lora_up.weight"]] if n == 1 else [sd[f"{enc}.lora_up.blocks.{i}.weight"] for i in range(n)]
        chosen = [_nonzero_cols(u) for u in ups]
        for s, k in zip(block_svals(dW, n), chosen):
            assert qualifies(s, k) and not qualifies(s, k - 1), (m, k)
        stored = ups[0].shape[1]
        assert stored == max(chosen) and sd[f"{enc}.lora_down.weight"].shape[0] == n * stored  # fused, padded
        padded += len(set(chosen)) > 1
        assert errs[m] == pytest.approx(optimum(dW, chosen), rel=1e-4), m
        assert rep[m] == pytest.approx(errs[m], rel=1e-4, abs=1e-9), m
        if flag == "max_error":
            assert errs[m] <= value * (1 + 1e-6)
    assert padded >= DIMS.depth  # the spiky qkv modules really chose different ranks per block


def _real_peft(out_dir: str, ref: dict[str, torch.Tensor]) -> None:
    from test_formats import _check_layers, load_in_real_peft

    pm, base = load_in_real_peft(out_dir, DIMS)
    _check_layers(pm.base_model.model, ref, base)


def _real_diffusers(path: str, ref: dict[str, torch.Tensor]) -> None:
    from test_formats import _check_layers, load_in_real_diffusers

    model, base = load_in_real_diffusers(path, DIMS)
    _check_layers(model, ref, base)


def test_resized_outputs_load_in_real_peft_and_diffusers(native, tmp_path):
    """PEFT/diffusers outputs (mixed ranks per block: block-diagonal B) apply exactly the native result."""
    src = _spiky(native, tmp_path)
    native_out = str(tmp_path / "native.safetensors")
    resize_lora(src, native_out, energy=0.8)
    ref = official_delta(native_out)
    peft_out = str(tmp_path / "adapter")
    resize_lora(src, peft_out, energy=0.8, format="peft")
    _real_peft(peft_out, ref)
    diff_out = str(tmp_path / "diffusers.safetensors")
    resize_lora(src, diff_out, energy=0.8, format="diffusers")
    _real_diffusers(diff_out, ref)


def test_resize_cli_json_and_format(src, tmp_path):
    out = tmp_path / "fv.safetensors"
    p = cli("resize", src, out, "--rank", "3", "--to", "fastvideo", "--json")
    data = json.loads(p.stdout)
    back = tmp_path / "back.safetensors"
    convert(str(out), str(back), "longcat")
    ref = official_delta(src)
    errs = true_errors(ref, str(back))
    assert data["format_out"] == "fastvideo" and len(data["modules"]) == len(ref)
    for row in data["modules"]:
        assert row["rel_error"] == pytest.approx(errs[row["module"]], rel=1e-4), row["module"]
    assert data["worst_error"] == pytest.approx(max(errs.values()), rel=1e-4)
    text = cli("resize", src, tmp_path / "t.safetensors", "--max-error", "0.5").stdout
    assert "relative Frobenius error: worst" in text and "blocks.47.ffn.w2" in text


# ---------------------------------------------------------------- combine


@pytest.fixture
def three(native, tmp_path):
    """Three inputs in three formats, different ranks, dtypes and scales; B and C lack the adaLN modules."""
    a = native("refinement", rank=4, dtype=torch.float32, alpha_scale=0.3, name="a.safetensors")
    b = native("cfg_step", rank=3, dtype=torch.bfloat16, alpha_scale=0.5, seed=1, name="b.safetensors")
    c = native("cfg_step", rank=2, dtype=torch.float16, alpha_scale=1.25, seed=2, name="c.safetensors")
    b_peft, c_comfy = str(tmp_path / "b_peft"), str(tmp_path / "c.comfy.safetensors")
    convert(b, b_peft, "peft")
    convert(c, c_comfy, "kohya")
    da, db, dc = official_delta(a), official_delta(b), official_delta(c)
    s = (0.7, -1.5, 2.0)
    ref = {m: s[0] * da[m] + s[1] * db.get(m, 0) + s[2] * dc.get(m, 0) for m in da}
    assert set(da) > set(db) == set(dc)  # adaLN / final layer: in A only
    return [(a, s[0]), (b_peft, s[1]), (c_comfy, s[2])], ref


def test_exact_combine_is_the_sum_of_weight_changes(three, tmp_path):
    loras, ref = three
    out = tmp_path / "sum.safetensors"
    p = cli("combine", out, *[x for path, st in loras for x in ("--lora", f"{path}:{st}")], "--json")
    data = json.loads(p.stdout)
    errs = true_errors(ref, str(out))
    assert max(errs.values()) <= 1e-6
    sd = load_file(str(out))
    qkv = f"lora{SEP}blocks{SEP}5{SEP}attn{SEP}qkv"
    assert sd[f"{qkv}.lora_up.blocks.0.weight"].shape == (DIMS.hidden, 4 + 3 + 2)  # ranks concatenated
    assert sd[f"{qkv}.lora_down.weight"].shape == (3 * 9, DIMS.hidden)
    ada = f"lora{SEP}blocks{SEP}5{SEP}adaLN_modulation{SEP}1"
    assert sd[f"{ada}.lora_down.weight"].shape == (6 * 4, DIMS.adaln)  # from A only, kept
    assert data["rule"] == "exact" and len(data["modules"]) == len(ref)


def test_compressed_combine_is_the_optimum_of_the_sum(three, tmp_path):
    loras, ref = three
    out = str(tmp_path / "c3.safetensors")
    report = combine_loras(out, loras, rank=3, dtype="fp32")
    errs, rep = true_errors(ref, out), report_errors(report)
    with safe_open(out, "pt") as f:
        nblocks = up_blocks(out)
    for m, dW in ref.items():
        assert errs[m] == pytest.approx(optimum(dW, [3] * nblocks[m]), rel=1e-4), m
        assert rep[m] == pytest.approx(errs[m], rel=1e-4), m
    # the adaLN modules (rank 4 in A only) lost something; block 5's qkv (rank 9 of the sum) too
    assert rep["blocks.5.adaLN_modulation.1"] > 0.01 and rep["blocks.5.attn.qkv"] > 0.01
    # exact rank of the sum: energy 1 keeps everything, to float rounding
    full = str(tmp_path / "full.safetensors")
    combine_loras(full, loras, energy=1.0, dtype="fp64")
    assert max(true_errors(ref, full).values()) <= 1e-9


def test_combine_refuses_inputs_whose_module_shapes_disagree(native, tmp_path):
    a = native("cfg_step", rank=2, name="a.safetensors")
    other = DitDims(hidden=32, ffn=96, adaln=32, final_out=16, depth=48)
    b = native("cfg_step", rank=2, dims=other, name="b.safetensors")
    out = tmp_path / "o.safetensors"
    p = cli("combine", out, "--lora", a, "--lora", b, check=2)
    line = p.stderr.strip()
    assert "\n" not in line and str(a) in line and str(b) in line and "blocks.0.attn.qkv" in line
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors"]


# ---------------------------------------------------------------- bad input through the CLI


@pytest.mark.parametrize("args,flag", [
    ([], "--rank"),
    (["--rank", "0"], "--rank"),
    (["--rank", "2", "--energy", "0.5"], "--energy"),
    (["--energy", "0"], "--energy"),
    (["--energy", "1.5"], "--energy"),
    (["--max-error", "-0.1"], "--max-error"),
    (["--max-error", "1"], "--max-error"),
    (["--rank", "2", "--to", "nonsense"], "--to"),
])
def test_resize_bad_options_exit_2_with_one_line_and_write_nothing(native, tmp_path, args, flag):
    src = native("cfg_step", rank=2, name="in.safetensors")
    out = tmp_path / "out.safetensors"
    p = cli("resize", src, out, *args, check=2)
    lines = p.stderr.strip().splitlines()
    assert flag in lines[-1] and "Traceback" not in p.stderr
    if flag != "--to":  # argparse's own choices error prints its usage line first
        assert len(lines) == 1, p.stderr
    assert not out.exists() and os.listdir(tmp_path) == ["in.safetensors"]


def test_combine_bad_options_exit_2(native, tmp_path):
    src = native("cfg_step", rank=2, name="in.safetensors")
    out = tmp_path / "out.safetensors"
    for args, flag in ((["--rank", "-1"], "--rank"), (["--dtype", "bf16"], "--dtype"),
                       (["--energy", "2"], "--energy")):
        p = cli("combine", out, "--lora", src, *args, check=2)
        assert len(p.stderr.strip().splitlines()) == 1 and flag in p.stderr, p.stderr
    p = cli("combine", out, "--lora", src, "--lora", str(tmp_path / "missing.safetensors"), check=2)
    assert "missing.safetensors" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == ["in.safetensors"]


# ---------------------------------------------------------------- the shared core


def test_factored_svd_is_the_svd_of_the_product_for_any_shape():
    from longcat_lora.algebra import factored_svd

    g = torch.Generator().manual_seed(0)
    for m, r, n in ((50, 6, 40), (5, 8, 40), (50, 8, 3), (30, 10, 30)):
        up, down = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)
        up[:, -1] = up[:, 0]  # rank-deficient factor: the QR path
        u, s, vh = factored_svd(up, down)
        want = torch.linalg.svdvals(up @ down)
        q = min(m, r, n)
        assert u.shape == (m, q) and s.shape == (q,) and vh.shape == (q, n)
        assert torch.allclose(s, want[:q], rtol=0, atol=1e-12 * float(want[0]))
        assert rel_err((u * s) @ vh, up @ down) < 1e-13
        assert torch.allclose(u.T @ u, torch.eye(q, dtype=torch.float64), atol=1e-12)


def test_dense_svd_randomized_recovers_a_planted_low_rank_matrix():
    from longcat_lora.algebra import dense_svd

    g = torch.Generator().manual_seed(1)
    m, n, k = 1500, 1300, 24
    x = torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g)
    noise = 1e-4 * torch.randn(m, n, generator=g)
    u, s, vh = dense_svd(x + noise, k, exact_below=256, generator=g)  # the randomized branch
    want = torch.linalg.svdvals((x + noise).double())[:k]
    assert u.shape == (m, k) and vh.shape == (k, n)
    assert float(((s - want).abs() / want).max()) < 1e-4
    assert rel_err((u * s) @ vh, x.double()) < 1e-4


def test_rank_rules_on_known_singular_values():
    from longcat_lora.algebra import RankRule
    from longcat_lora.errors import LoraError

    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)  # s^2: 9, 4, 1, 0.25 (total 14.25)
    assert [RankRule(rank=r).choose(s) for r in (1, 3, 9)] == [1, 3, 4]
    assert [RankRule(energy=f).choose(s) for f in (0.5, 0.63, 0.64, 0.9, 0.95, 1.0)] == [1, 1, 2, 2, 3, 4]
    assert [RankRule(max_error=e).choose(s) for e in (0.99, 0.5, 0.3, 0.1, 0.0)] == [1, 2, 2, 4, 4]
    assert RankRule(energy=0.5).choose(torch.zeros(3, dtype=torch.float64)) == 0
    for kw, name in ((dict(), "rank"), (dict(rank=0), "rank"), (dict(energy=0.0), "energy"),
                     (dict(energy=1.01), "energy"), (dict(max_error=-0.1), "max_error"),
                     (dict(max_error=1.0), "max_error"), (dict(rank=2, energy=0.5), "energy")):
        with pytest.raises(LoraError, match=name):
            RankRule.parse(**kw)


def test_wide_and_rank_deficient_blocks_take_the_qr_path(native, tmp_path):
    """Rank 20 > final_layer.linear's 16 rows, and a rank-deficient qkv up block: same guarantees."""
    src0 = native("refinement", rank=20, dtype=torch.float32, alpha_scale=0.3, name="wide0.safetensors")
    sd = load_file(src0)
    k = f"lora{SEP}blocks{SEP}3{SEP}attn{SEP}qkv.lora_up.blocks.1.weight"
    sd[k][:, 5:] = sd[k][:, :1]  # this block's change has rank 5
    src = str(tmp_path / "wide.safetensors")
    save_file(sd, src)
    ref, nblocks = official_delta(src), up_blocks(src)
    for rank in (20, 4):
        out = str(tmp_path / f"w{rank}.safetensors")
        report = resize_lora(src, out, rank=rank)
        errs, rep = true_errors(ref, out), report_errors(report)
        for m in ("final_layer.linear", "blocks.3.attn.qkv", "blocks.3.attn.proj"):
            assert errs[m] == pytest.approx(optimum(ref[m], [rank] * nblocks[m]), rel=1e-4, abs=1e-6), (m, rank)
            assert rep[m] == pytest.approx(errs[m], rel=1e-4, abs=1e-7), (m, rank)
        if rank == 20:
            assert max(errs.values()) <= 1e-6


def test_nonfinite_input_and_fp16_overflow_exit_2_naming_the_module(native, tmp_path):
    src0 = native("cfg_step", rank=2, dtype=torch.float32, name="in.safetensors")
    sd = load_file(src0)
    k = f"lora{SEP}blocks{SEP}7{SEP}attn{SEP}proj.lora_up.weight"
    bad = dict(sd)
    bad[k] = sd[k].clone()
    bad[k][3, 1] = float("nan")
    nan_path = str(tmp_path / "nan.safetensors")
    save_file(bad, nan_path)
    huge = dict(sd)
    huge[k] = sd[k] * 1e12
    huge_path = str(tmp_path / "huge.safetensors")
    save_file(huge, huge_path)
    for path, args, what in ((nan_path, [], "non-finite"), (huge_path, ["--dtype", "fp16"], "overflow")):
        out = tmp_path / "out.safetensors"
        p = cli("resize", path, out, "--rank", "1", *args, check=2)
        assert len(p.stderr.strip().splitlines()) == 1 and "blocks.7.attn.proj" in p.stderr and what in p.stderr
        assert not out.exists()
    cli("resize", huge_path, tmp_path / "ok.safetensors", "--rank", "1")  # fits in its own fp32


def test_bf16_resize_is_optimal_on_both_paths_well_and_ill_conditioned(native, tmp_path):
    """A bf16 file is resized with float32 thin products; an up block whose columns span 1000x in size
    (Cholesky diagonal ratio far below 0.1) is redone in float64: both stay the optimum, truly reported."""
    src0 = native("cfg_step", rank=RANK, dtype=torch.bfloat16, name="ill0.safetensors")
    sd = load_file(src0)
    k = f"lora{SEP}blocks{SEP}2{SEP}attn{SEP}proj.lora_up.weight"
    sd[k] = (sd[k].float() * torch.logspace(0, -3, RANK)).to(torch.bfloat16)
    src = str(tmp_path / "ill.safetensors")
    save_file(sd, src)
    ref, nblocks = official_delta(src), up_blocks(src)
    out = str(tmp_path / "ill_r2.safetensors")
    report = resize_lora(src, out, rank=2)
    errs, rep = true_errors(ref, out), report_errors(report)
    for m in ("blocks.2.attn.proj", "blocks.2.attn.qkv", "blocks.1.ffn.w2"):
        # the bf16 rounding of the new factors adds ~1e-3 of the kept part to the truncation error
        assert errs[m] == pytest.approx(optimum(ref[m], [2] * nblocks[m]), rel=2e-3), m
        assert rep[m] == pytest.approx(errs[m], rel=1e-4), m
    s = block_svals(ref["blocks.2.attn.proj"], 1)[0]
    assert float(s[0] / s[RANK - 1]) > 100  # the scaled block really is ill conditioned


def test_exact_combine_refuses_a_strength_whose_fold_overflows(native, tmp_path):
    """A strength ratio of 1e30 on up values up to ~5e11 overflows float32: one line, exit 2, nothing written."""
    a = native("cfg_step", rank=2, dtype=torch.float32, name="a.safetensors")
    sd = load_file(a)
    k = f"lora{SEP}blocks{SEP}4{SEP}ffn{SEP}w2.lora_up.weight"
    sd[k] = sd[k] * 1e12
    b = str(tmp_path / "b.safetensors")
    save_file(sd, b)
    out = tmp_path / "sum.safetensors"
    p = cli("combine", out, "--lora", a, "--lora", f"{b}:1e30", check=2)
    assert len(p.stderr.strip().splitlines()) == 1 and "NaN/Inf" in p.stderr, p.stderr
    assert not out.exists()
    cli("combine", out, "--lora", a, "--lora", f"{b}:1e20")  # 1e30 at most: fits in float32
