"""Conversions against the independent float64 references (tests/reference.py)."""

import pytest
import torch
from safetensors.torch import load_file

from longcat_lora import convert, load_lora

from reference import fastvideo_delta, fastvideo_layer_deltas, lora_delta, official_delta, worst

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.mark.parametrize("layout", ["cfg_step", "refinement"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank,alpha_scale", [(4, 0.5), (6, 0.3), (3, 1.0 / 3), (8, 2.0), (5, 0.125)])
def test_fastvideo_matches_official_under_fastvideo_loader(native, tmp_path, layout, dtype, rank, alpha_scale):
    src = native(layout, rank=rank, dtype=dtype, alpha_scale=alpha_scale, scale_dtype=torch.float32)
    out = str(tmp_path / "fv.safetensors")
    convert(src, out, "fastvideo")
    ref = official_delta(src)
    got = fastvideo_delta(out)
    err = worst(ref, got)
    integral = float(torch.tensor(alpha_scale, dtype=torch.float32)) * rank
    if integral == int(integral):
        assert err == 0.0  # only slicing and renaming: bit-exact
    else:
        assert err < 1e-6  # scale folded into lora_B in float32
    assert len(got) == (386 if layout == "refinement" else 336)


def test_fastvideo_tensors_are_the_native_slices(native, tmp_path):
    src = native("refinement", dtype=torch.bfloat16, rank=4)
    out = str(tmp_path / "fv.safetensors")
    convert(src, out, "fastvideo")
    a, b = load_file(src), load_file(out)
    p = "lora___lorahyphen___blocks___lorahyphen___5___lorahyphen___attn___lorahyphen___qkv"
    for j, name in enumerate(["to_q", "to_k", "to_v"]):
        assert torch.equal(b[f"blocks.5.self_attn.{name}.lora_A"], a[f"{p}.lora_down.weight"][4 * j:4 * j + 4])
        assert torch.equal(b[f"blocks.5.self_attn.{name}.lora_B"], a[f"{p}.lora_up.blocks.{j}.weight"])
        assert b[f"blocks.5.self_attn.{name}.lora_alpha"].item() == 2.0  # 0.5 * 4
        assert b[f"blocks.5.self_attn.{name}.lora_alpha"].dtype == torch.float32
    # adaLN: one layer fed by 6 up blocks -> A = down, B = blockdiag(ups), alpha = 0.5 * 6 * 4
    q = "lora___lorahyphen___blocks___lorahyphen___5___lorahyphen___adaLN_modulation___lorahyphen___1"
    A, B = b["blocks.5.adaln_linear_1.lora_A"], b["blocks.5.adaln_linear_1.lora_B"]
    assert torch.equal(A, a[f"{q}.lora_down.weight"])
    assert torch.equal(B, torch.block_diag(*[a[f"{q}.lora_up.blocks.{i}.weight"] for i in range(6)]))
    assert b["blocks.5.adaln_linear_1.lora_alpha"].item() == 12.0
    assert B.shape == (6 * 64, 24)


def test_int_alpha_truncation_is_what_fastvideo_does(native, tmp_path):
    """alpha_scale 0.3 at rank 6: writing lora_alpha = 1.8 (FastVideo's own converter) loses 44%."""
    src = native("cfg_step", rank=6, alpha_scale=0.3, dtype=torch.float32)
    naive = str(tmp_path / "naive.safetensors")
    ours = str(tmp_path / "ours.safetensors")
    convert(src, ours, "fastvideo")
    sd = load_file(ours)
    # Build the naive file: same A/B as the native slices, lora_alpha = alpha_scale * rank, unfolded
    nat = load_file(src)
    naive_sd = {}
    for k, v in sd.items():
        if k.endswith(".lora_alpha"):
            naive_sd[k] = torch.tensor(0.3 * 6, dtype=torch.float32)
        elif k.endswith(".lora_B"):
            naive_sd[k] = v / torch.tensor(0.3, dtype=torch.float32).double().float()  # undo the fold
        else:
            naive_sd[k] = v
    from safetensors.torch import save_file
    save_file(naive_sd, naive)
    ref = official_delta(src)
    assert worst(ref, fastvideo_delta(ours)) < 1e-6
    assert abs(worst(ref, fastvideo_delta(naive)) - (1 - 1 / 1.8)) < 1e-3  # int(1.8) = 1: 44% off
    assert len(nat) == 1152


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_dtype", [None, torch.float32])
def test_round_trip_native_fastvideo_native_bit_exact(native, tmp_path, dtype, scale_dtype):
    src = native("refinement", dtype=dtype, rank=4, alpha_scale=0.5, scale_dtype=scale_dtype)
    fv, back = str(tmp_path / "fv.safetensors"), str(tmp_path / "back.safetensors")
    convert(src, fv, "fastvideo")
    convert(fv, back, "longcat")
    a, b = load_file(src), load_file(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype or k.endswith("alpha_scale") and scale_dtype is None, k
        assert torch.equal(a[k].double(), b[k].double()), k


def test_round_trip_non_integer_alpha_is_weight_change_exact(native, tmp_path):
    src = native("refinement", dtype=torch.bfloat16, rank=6, alpha_scale=0.3)
    fv, back = str(tmp_path / "fv.safetensors"), str(tmp_path / "back.safetensors")
    convert(src, fv, "fastvideo")
    convert(fv, back, "longcat")
    assert worst(official_delta(src), official_delta(back)) < 1e-6


def test_up_blocks_ordered_by_integer_index(tmp_path):
    """12 up blocks: block 10 follows block 9 (not block 1), in every conversion."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    p = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
    sd = {f"{p}.lora_down.weight": torch.randn(12 * 2, 16, generator=g),
          f"{p}.alpha_scale": torch.tensor(0.5)}
    for i in range(12):
        sd[f"{p}.lora_up.blocks.{i}.weight"] = torch.randn(4, 2, generator=g) * (i + 1)
    src = str(tmp_path / "n12.safetensors")
    save_file(sd, src)
    ref = official_delta(src)
    for fmt in ("fastvideo", "peft", "kohya", "diffusers", "longcat"):
        out = str(tmp_path / f"out.{fmt}")
        convert(src, out, fmt)
        assert worst(ref, lora_delta(out)) == 0.0, fmt  # independent reader of each format
        if fmt == "fastvideo":
            assert worst(ref, fastvideo_delta(out)) == 0.0
    back = str(tmp_path / "back.safetensors")
    convert(str(tmp_path / "out.fastvideo"), back, "longcat")
    b = load_file(back)
    assert torch.equal(b[f"{p}.lora_up.blocks.10.weight"], sd[f"{p}.lora_up.blocks.10.weight"])


@pytest.mark.parametrize("shape", [(), (1,)])
@pytest.mark.parametrize("sdt", [torch.bfloat16, torch.float16, torch.float64])
def test_alpha_scale_shapes_and_dtypes(tmp_path, shape, sdt):
    from safetensors.torch import save_file

    p = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___ffn___lorahyphen___w1"
    sd = {f"{p}.lora_down.weight": torch.randn(3, 8), f"{p}.lora_up.weight": torch.randn(5, 3),
          f"{p}.alpha_scale": torch.tensor(0.25, dtype=sdt).reshape(shape)}
    src = str(tmp_path / "a.safetensors")
    save_file(sd, src)
    with load_lora(src) as a:
        assert a.modules["blocks.0.ffn.w1"].parts[0].scale == 0.25
    out = str(tmp_path / "fv.safetensors")
    convert(src, out, "fastvideo")
    assert worst(official_delta(src), fastvideo_delta(out)) < 1e-7


def test_missing_alpha_scale_means_one(tmp_path):
    from safetensors.torch import save_file

    p = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___ffn___lorahyphen___w1"
    save_file({f"{p}.lora_down.weight": torch.randn(3, 8), f"{p}.lora_up.weight": torch.randn(5, 3)},
              str(tmp_path / "a.safetensors"))
    with load_lora(str(tmp_path / "a.safetensors")) as a:
        assert a.modules["blocks.0.ffn.w1"].parts[0].scale == 1.0
        assert any("no alpha_scale" in n for n in a.notes)


def test_reads_what_fastvideo_accepts(tmp_path):
    """.lora_A or .lora_A.weight, optional diffusion_model. prefix, missing lora_alpha = rank."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g)
    variants = {
        "plain": {"blocks.0.self_attn.to_k.lora_A": A, "blocks.0.self_attn.to_k.lora_B": B,
                  "blocks.0.self_attn.to_k.lora_alpha": torch.tensor(2.0)},
        "weight": {"blocks.0.self_attn.to_k.lora_A.weight": A, "blocks.0.self_attn.to_k.lora_B.weight": B,
                   "blocks.0.self_attn.to_k.lora_alpha": torch.tensor(2.0)},
        "prefix": {"diffusion_model.blocks.0.self_attn.to_k.lora_A.weight": A,
                   "diffusion_model.blocks.0.self_attn.to_k.lora_B.weight": B,
                   "diffusion_model.blocks.0.self_attn.to_k.lora_alpha": torch.tensor([2.9])},
        "noalpha": {"blocks.0.self_attn.to_k.lora_A": A, "blocks.0.self_attn.to_k.lora_B": B},
    }
    expect = {"plain": 0.5, "weight": 0.5, "prefix": 0.5, "noalpha": 1.0}  # int(2.9) = 2
    for name, sd in variants.items():
        path = str(tmp_path / f"{name}.safetensors")
        save_file(sd, path)
        with load_lora(path) as a:
            m = a.modules["blocks.0.attn.qkv"]
            assert m.out_features == 48 and [p.rows for p in m.parts] == [(16, 32)]
            d = m.delta()
        assert torch.allclose(d[16:32], expect[name] * (B.double() @ A.double()), rtol=0, atol=1e-12)
        assert d[:16].abs().max() == 0 and d[32:].abs().max() == 0
        ref = fastvideo_layer_deltas(path)["blocks.0.self_attn.to_k"]
        assert torch.equal(d[16:32], ref)


def test_cli_other_dims_rank_dtype_alpha(native, tmp_path):
    """Through the real CLI: another DiT size, an odd rank, fp16, alpha_scale 0.7 (0.7*5 not integral)."""
    from longcat_lora.model.naming import DitDims

    from conftest import cli

    dims = DitDims(hidden=48, ffn=128, adaln=16, final_out=8, depth=48)
    src = native("refinement", dims=dims, rank=5, dtype=torch.float16, alpha_scale=0.7, name="o.safetensors")
    out, back = tmp_path / "fv.safetensors", tmp_path / "back.safetensors"
    cli("convert", src, out, "--to", "fastvideo")
    assert worst(official_delta(src), fastvideo_delta(str(out))) < 1e-6
    cli("convert", out, back, "--to", "longcat")
    assert worst(official_delta(src), official_delta(str(back))) < 1e-6
    cli("verify", src, back, "--rtol", "1e-6")
