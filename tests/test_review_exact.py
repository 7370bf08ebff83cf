"""Findings of the adversarial review of issues 18, 19 and 21 (each failed before its fix).

ExactMerge against Fractions (tests/rounding_reference.py) on the inputs that broke it; merge's handling
of rows that do not split, of untouched tensors cast with --dtype, and of float64 fp8 scales, through the
real CLI.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from longcat_lora.apply.exact import ExactMerge, Scratch, Term

from conftest import cli
from rounding_reference import merged_fractions, same_bits

TD = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _run(w: torch.Tensor, terms, dtype: str, defer: bool = False) -> torch.Tensor:
    rows, cols = w.shape
    m = ExactMerge([Term((r0, r1), up, down, s, c) for r0, r1, up, down, s, c in terms], rows, cols, dtype)
    out = torch.empty(rows, cols, dtype=TD[dtype])
    base = lambda r, c: w[torch.from_numpy(r), torch.from_numpy(c)].double().numpy()  # noqa: E731
    pending = [] if defer else None
    m.chunk(w.clone(), 0, rows, out, base, Scratch(), defer=pending)
    if defer:
        m.resolve(out, pending, base)
    return out


def _check(w, terms, dtypes=("BF16", "F16", "F32", "F64")):
    for dt in dtypes:
        for defer in (False, True):
            assert same_bits(_run(w, terms, dt, defer), merged_fractions(w, terms, TD[dt])), (dt, defer)


def test_strength_times_scale_that_rounds_in_float64_is_not_certified_exact():
    """fl(0.8) x 1.25 rounds to exactly 1.0 in float64: the sums are made with the rounded product, so the
    exactness certificate must not claim them (the tie 1 + 2**-8 went to even: 1.0 instead of 1.0078125)."""
    w = torch.tensor([[1.0, 1.0, 0.5]], dtype=torch.float64)
    up = torch.tensor([[2.0 ** -8]], dtype=torch.float64)
    down = torch.tensor([[1.0, 3.0, 1.0]], dtype=torch.float64)
    _check(w, [(0, 1, up, down, 0.8, 1.25)])
    g = torch.Generator().manual_seed(4)  # and a whole bf16 LoRA at 0.7 x 1.25 (16 elements in 1000 were off)
    w = (torch.randn(24, 40, generator=g) * 0.02).to(torch.bfloat16).double()
    up = (torch.randn(24, 16, generator=g) * 0.02).to(torch.bfloat16).double()
    down = (torch.randn(16, 40, generator=g) / 8).to(torch.bfloat16).double()
    _check(w, [(0, 24, up, down, 0.7, 1.25)], ("F32", "BF16"))


def test_an_exact_zero_is_plus_zero_whatever_the_summation_order():
    w = torch.tensor([[-0.0, -0.0]], dtype=torch.float64)
    up = torch.tensor([[-1.0, 0.0]], dtype=torch.float64)
    down = torch.tensor([[0.0, 0.0], [-1.0, -1.0]], dtype=torch.float64)
    _check(w, [(0, 1, up, down, 1.0, 1.0)])
    assert _run(w, [(0, 1, up, down, 1.0, 1.0)], "BF16").view(torch.int16).tolist() == [[0, 0]]


def test_float64_factors_too_small_for_their_squares_or_products():
    """Norms of 2**-600 rows underflowed to 0 ("no term changes this element"); products that underflow
    were taken as exact by the double-double level; a float64 sum of low parts that cancels to 0 was taken
    as proof that they do. Each made a bf16 midpoint 1 + 2**-8 round to even instead of up."""
    mid = torch.tensor([[1.0 + 2.0 ** -8]], dtype=torch.float64)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    _check(mid, [(0, 1, t([[2.0 ** -600]]), t([[2.0 ** -500]]), 1.0, 1.0)])
    _check(mid, [(0, 1, t([[3 * 2.0 ** -531, 2.0 ** -530]]), t([[2.0 ** -490], [2.0 ** -490]]), 1.0, 1.0)], ("BF16",))
    _check(mid, [(0, 1, t([[(1 + 2.0 ** -52) * 2.0 ** -600, 1.0]]), t([[2.0 ** -480], [0.0]]), 1.0, 1.0)], ("BF16",))
    a27, a52 = 2.0 ** -27, 2.0 ** -52
    u = [[-2 * (1 + a27)] * 4 + [-0.25 * (1 + a52)] + [4 * (1 + a27)] * 2]
    d = [[1 - a27]] * 4 + [[1 - a52]] + [[1 - a27]] * 2
    _check(t([[1.25 + 2.0 ** -8]]), [(0, 1, t(u), t(d), 1.0, 1.0)], ("BF16",))
    # huge factors whose squares overflow: merged, not refused as non-finite
    _check(t([[1.0]]), [(0, 1, t([[2.0 ** 600]]), t([[2.0 ** -600]]), 1.0, 1.0)], ("BF16", "F32"))


def test_just_below_the_overflow_threshold_rounds_to_the_largest_value():
    """2**128 - 2**119 - 2**60 is below bf16's overflow threshold (the midpoint between its largest value and
    2**128): the largest bf16, not a refusal."""
    w = torch.tensor([[2.0 ** 128 - 2.0 ** 119]], dtype=torch.float64)
    _check(w, [(0, 1, torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[-(2.0 ** 60)]], dtype=torch.float64),
                1.0, 1.0)], ("BF16",))


def test_merge_refuses_rows_that_do_not_split_over_split_layers(tmp_path):
    """A qkv LoRA of 50 rows into a base with split q/k/v of 16 rows each: refused (its last rows went
    nowhere), as a fused [48, 16] base refuses it."""
    H = 16
    base = str(tmp_path / "base.safetensors")
    save_file({f"blocks.0.self_attn.{x}.weight": torch.zeros(H, H) for x in "qkv"}, base)
    lora = str(tmp_path / "l.safetensors")
    save_file({"diffusion_model.blocks.0.attn.qkv.lora_down.weight": torch.ones(4, H),
               "diffusion_model.blocks.0.attn.qkv.lora_up.weight": torch.ones(3 * H + 2, 4)}, lora)
    p = cli("merge", base, tmp_path / "o.safetensors", "--lora", lora, check=2)
    assert "has 50 rows, which do not split into 3 equal layers" in p.stderr and not (tmp_path / "o.safetensors").exists()


def test_merge_dtype_rounds_untouched_tensors_once_and_refuses_their_overflow(tmp_path):
    base = str(tmp_path / "base.safetensors")
    x = 1 + 2.0 ** -8 + 2.0 ** -30  # float32 would round it onto the bf16 midpoint, then to even
    save_file({"blocks.0.ffn.w1.weight": torch.zeros(4, 4, dtype=torch.bfloat16),
               "blocks.0.attn.q_norm.weight": torch.tensor([1e5, 1.0], dtype=torch.bfloat16),
               "blocks.0.ffn.w1.bias": torch.tensor([x] * 4, dtype=torch.float64)}, base)
    lora = str(tmp_path / "l.safetensors")
    save_file({"lora_unet_blocks_0_ffn_w1.lora_down.weight": torch.ones(2, 4, dtype=torch.bfloat16),
               "lora_unet_blocks_0_ffn_w1.lora_up.weight": torch.ones(4, 2, dtype=torch.bfloat16)}, lora)
    p = cli("merge", base, tmp_path / "h.safetensors", "--lora", lora, "--dtype", "fp16", check=2)
    assert "blocks.0.attn.q_norm.weight" in p.stderr and "cannot hold" in p.stderr
    assert not (tmp_path / "h.safetensors").exists()
    cli("merge", base, tmp_path / "b.safetensors", "--lora", lora, "--dtype", "bf16")
    assert load_file(str(tmp_path / "b.safetensors"))["blocks.0.ffn.w1.bias"].tolist() == [1.0078125] * 4


def test_a_float64_fp8_scale_whose_products_are_not_exact_is_refused(tmp_path):
    base = str(tmp_path / "base.safetensors")
    save_file({"blocks.0.ffn.w1.weight": torch.ones(4, 4).to(torch.float8_e4m3fn),
               "blocks.0.ffn.w1.scale_weight": torch.tensor(2.0 / 3.0, dtype=torch.float64),
               "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, base)
    lora = str(tmp_path / "l.safetensors")
    save_file({"lora_unet_blocks_0_ffn_w1.lora_down.weight": torch.ones(2, 4),
               "lora_unet_blocks_0_ffn_w1.lora_up.weight": torch.ones(4, 2)}, lora)
    p = cli("merge", base, tmp_path / "o.safetensors", "--lora", lora, "--dtype", "fp32", check=2)
    assert "more than 49 significant bits" in p.stderr and not (tmp_path / "o.safetensors").exists()
