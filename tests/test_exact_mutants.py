"""apply/exact.py on tiny hand-built inputs, one path each: the tests that kill the mutants tools/mutation.py
found surviving there (`--only apply/exact.py`). Every expectation is a number from Fractions
(tests/rounding_reference.py), never the code's own output.

round_dyadic / round_f64 / _round_dd at ties, carries, subnormals and the overflow edge; `compare`'s and
`decide`'s Python fallback (a term that starts below row 0); float64 outputs in chunks that start below
row 0; `decide` given a float64 sum as far off as the documented bound allows; the bound's size; the
certificate for rows outside a term; the double-double level deciding an exact tie by itself; and the
bulk's flags, on the CPU (numpy) and on the device code path (torch), the latter reached on the CPU
through a tensor that reports another device.
"""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
import torch

import longcat_lora.apply.exact as ex
from longcat_lora.apply.exact import ExactMerge, Scratch, Term, round_dyadic, round_f64

from rounding_reference import merged_fractions, round_exact_f64, round_fraction, same_bits

TD = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
INT = {"F32": torch.int32, "BF16": torch.int16, "F16": torch.int16, "F64": torch.int64}
IEEE = {"BF16": (8, -126, 127), "F16": (11, -14, 15), "F32": (24, -126, 127), "F64": (53, -1022, 1023)}
MASK = {"BF16": 0xFFFF, "F16": 0xFFFF, "F32": 0xFFFFFFFF, "F64": 0xFFFFFFFFFFFFFFFF}


def ref_bits(F: Fraction, dtype: str) -> int:
    """The bits of F correctly rounded to dtype (the reference's value, stored exactly in dtype)."""
    v = torch.tensor([round_fraction(F, TD[dtype])], dtype=torch.float64).to(TD[dtype])
    return int(v.view(INT[dtype])[0]) & MASK[dtype]


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def run(w: torch.Tensor, terms, dtype: str, chunks=None, defer: bool = False) -> torch.Tensor:
    """ExactMerge of w (float64) and terms (r0, r1, up, down, strength, scale) to dtype, row chunk by chunk."""
    rows, cols = w.shape
    m = ExactMerge([Term((r0, r1), u, d, s, c) for r0, r1, u, d, s, c in terms], rows, cols, dtype)
    out = torch.empty(rows, cols, dtype=TD[dtype])
    base = lambda r, c: w[torch.from_numpy(r), torch.from_numpy(c)].numpy()  # noqa: E731
    pending = [] if defer else None
    for r0, r1 in chunks or [(0, rows)]:
        m.chunk(w[r0:r1].clone(), r0, r1, out[r0:r1], base, Scratch(), defer=pending)
    if defer:
        m.resolve(out, pending, base)
    return out


def check(w, terms, dtypes=("BF16", "F16", "F32", "F64"), chunks=None):
    for dt in dtypes:
        for defer in (False, True) if dt != "F64" else (False,):
            assert same_bits(run(w, terms, dt, chunks, defer), merged_fractions(w, terms, TD[dt])), (dt, defer)


def count_calls(monkeypatch, name: str) -> list:
    calls: list = []
    real = getattr(ex, name)
    monkeypatch.setattr(ex, name, lambda *a: calls.append(1) or real(*a))
    return calls


# ----------------------------------------------------------------------------- rounding primitives


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
def test_round_dyadic_at_ties_carries_subnormals_and_overflow(dtype):
    p, emin, emax = IEEE[dtype]
    sub = emin - p + 1  # the exponent of the smallest subnormal
    cases = [
        (1, 0), (3, -1), (5, 7),  # fewer bits than p: shifted left
        (2**p + 1, -p), (2**p + 3, -p),  # one bit too many (a shift of 1): ties to even, down and up
        (2**(p + 2) + 2, -p - 2), (2**(p + 2) + 6, -p - 2),  # ties two bits down
        (2**(p + 1) + 1, -p - 1), (2**(p + 1) + 5, -p - 1),  # below / above the tie, with an odd and an even result
        (2**(p + 1) - 1, -p),  # all ones: carried into the next binade (2.0)
        (2**(p + 1) - 1, emax - p),  # the midpoint between the largest value and 2**(emax + 1): infinity
        (2**(p + 2) - 3, emax - p - 1),  # just below it: the largest value
        (3, emax), (1, emax + 1), (1, emax), (2**p - 1, emax - p + 1),
        (1, sub), (1, sub - 1), (3, sub - 1), (5, sub - 2), (1, sub - 5), (2**(p - 1) - 1, sub),  # subnormals
        (2**p - 1, sub - 1),  # the largest subnormal's neighbourhood, carried into the normal range
        (0, 0), (0, -5)]
    rng = random.Random(p)
    for _ in range(300):
        bits = rng.randint(1, p + 70)
        n = rng.getrandbits(bits) | 1 << (bits - 1)
        lead = rng.randint(sub - 3, emax + 1)
        cases.append((n, lead - bits + 1))
    for n, e in cases:
        for s in (1, -1):
            F = Fraction(s * n) * Fraction(2) ** e
            assert round_dyadic(s * n, e, dtype) == ref_bits(F, dtype), (s * n, e)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_round_f64_is_the_direct_rounding(dtype):
    p, emin, emax = IEEE[dtype]
    one = [1.0, 1 + 2.0**-p, 1 + 3 * 2.0**-p, 1 + 2.0**-p + 2.0**-40, 1 + 2.0**-p - 2.0**-40,
           1 + 2.0**-p + 2.0**-52, 1 + 2.0**-p - 2.0**-53, 1 - 2.0**-p - 2.0**-60, 1 - 2.0**-(p + 1)]
    edge = [math_ldexp(1, emin - p), math_ldexp(1, emin - p) * (1 + 2.0**-52), math_ldexp(3, emin - p - 1),
            math_ldexp(1, emin), math_ldexp(2.0 - 2.0**(1 - p), emax), math_ldexp(2.0 - 2.0**-p, emax),
            math_ldexp(2.0 - 2.0**-p, emax) * (1 - 2.0**-53), math_ldexp(1, emax + 1), 0.0, 1e-300, 1e300]
    x = np.array(one + edge + [2.0**k * v for k in (-60, 30) for v in one])
    x = np.concatenate([x, -x, np.array([np.inf, -np.inf])])
    x = x[x != 0]  # (round_f64 keeps a float64 zero's sign; exact sums' zeros are made +0 by its callers)
    view = np.int32 if dtype == "F32" else np.int16
    with np.errstate(over="ignore", invalid="ignore"):
        got = torch.from_numpy(round_f64(x, dtype).view(view)).view(TD[dtype])
        assert same_bits(got, torch.from_numpy(round_exact_f64(x, TD[dtype])).to(TD[dtype]))
        nan = torch.from_numpy(round_f64(np.array([np.nan, -np.nan]), dtype).view(view)).view(TD[dtype])
    assert torch.isnan(nan).all()


def math_ldexp(m: float, e: int) -> float:
    return float(Fraction(m) * Fraction(2) ** e)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_round_dd_exact_zero_ties_lo_sign_and_overflow(dtype):
    p, emin, emax = IEEE[dtype]
    mid = 1 + 2.0**-p  # a midpoint of the grid: the low part decides
    big_mid = math_ldexp(2.0 - 2.0**-p, emax)  # between the largest value and 2**(emax + 1)
    sub_mid = math_ldexp(1, emin - p)  # half the smallest subnormal
    pairs = [(0.0, 0.0), (-0.0, 0.0), (1.0, 0.0), (-1.0, 0.0), (3.0, 0.0), (mid, 0.0), (1 + 3 * 2.0**-p, 0.0),
             (mid, 2.0**-70), (mid, -2.0**-70), (-mid, 2.0**-70), (-mid, -2.0**-70),
             (1 + 3 * 2.0**-p, -2.0**-70), (1 + 2.0**-p + 2.0**-40, -2.0**-93),
             (big_mid, -big_mid * 2.0**-60), (big_mid, big_mid * 2.0**-60), (-big_mid, big_mid * 2.0**-60),
             (sub_mid, sub_mid * 2.0**-60), (sub_mid, -sub_mid * 2.0**-60), (3 * sub_mid, -sub_mid * 2.0**-60)]
    hi = np.array([a for a, _ in pairs])
    lo = np.array([b for _, b in pairs])
    with np.errstate(over="ignore"):
        got = ex._round_dd(hi, lo, dtype)
    for k, (a, b) in enumerate(pairs):
        assert int(got[k]) == ref_bits(Fraction(a) + Fraction(b), dtype), (a, b)


# ----------------------------------------------------------------------------- the levels


def test_compare_falls_back_to_the_exact_difference_of_one_unit(monkeypatch):
    """x * y with x = y = 1 + 2**-52 is 1 + 2**-51 + 2**-104: compared with 1 + 2**-51, the exact difference
    is one unit of the sum's lowest bit (2**-104), below the float64 and double-double bounds."""
    x = 1 + 2.0**-52
    m = ExactMerge([Term((1, 2), t64([[x]]), t64([[x, x]]), 1.0, 1.0)], 2, 2, "F32")
    base = lambda r, c: np.zeros(len(r))  # noqa: E731
    calls = count_calls(monkeypatch, "exact_sum")
    t = np.array([1 + 2.0**-51, 1 + 2.0**-51 + 2.0**-52, 1 + 2.0**-51])
    got = m.compare(np.array([1, 1, 0]), np.array([0, 1, 0]), base, t)
    exact = [Fraction(x) * Fraction(x)] * 2 + [Fraction(0)]
    assert got.tolist() == [(e > Fraction(v)) - (e < Fraction(v)) for e, v in zip(exact, t)] == [1, -1, -1]
    assert calls  # (the exact level decided)


def test_the_exact_level_for_a_term_that_starts_below_row_0(monkeypatch):
    """(1 + 2**-52)(1 + 2**-52) - (1 + 2**-52) 2**-52 + 2**-24 - 2**-52 is exactly the midpoint 1 + 2**-24 of
    float32's grid: the double-double level cannot tell (a product's low part), so the exact one decides,
    in row 1 of a term over rows 1:2."""
    x = 1 + 2.0**-52
    w = t64([[0.5, 0.25], [2.0**-24 - 2.0**-52, 2.0**-24 - 2.0**-52]])
    terms = [(1, 2, t64([[x, x]]), t64([[x, x], [-(2.0**-52), 2.0**-40 - 2.0**-52]]), 1.0, 1.0)]
    calls = count_calls(monkeypatch, "exact_sum")
    check(w, terms, ("F32", "BF16"))
    assert calls


def test_float64_outputs_in_chunks_that_start_below_row_0():
    """Terms over rows 0:2 and 1:4 of a 4-row weight, merged in chunks 0:1, 1:3, 3:4 (each chunk's rows of
    each term); one element's exact sum is a float64 midpoint plus 2**-160 (the exact level)."""
    g = np.random.default_rng(3)
    w = torch.from_numpy(g.standard_normal((4, 3)))
    w[1, 0] = 1.0
    u1, d1 = torch.from_numpy(g.standard_normal((2, 2))), torch.from_numpy(g.standard_normal((2, 3)))
    u2, d2 = torch.from_numpy(g.standard_normal((3, 3))), torch.from_numpy(g.standard_normal((3, 3)))
    u1[1], d1[:, 0] = t64([2.0**-27, 2.0**-80]), t64([2.0**-26, 2.0**-80])  # row 1, column 0: 1 + 2**-53 + 2**-160
    u2[0], d2[:, 0] = 0.0, t64([1.0, 2.0, 3.0])
    terms = [(0, 2, u1, d1, 1.0, 1.0), (1, 4, u2, d2, 0.7, 1.25)]
    check(w, terms, ("F64",), chunks=[(0, 1), (1, 3), (3, 4)])
    check(w, terms, ("BF16", "F32"), chunks=[(0, 1), (1, 3), (3, 4)])


def test_decide_with_a_float64_sum_as_far_off_as_the_bound_allows():
    """W = 1 + 2**-24 + 2**-40 plus 2**20 - 2**20: an order that adds the products one by one loses W's last
    bits; `decide` is given a sum 2**-33 off (within g (|v| + 2 A), A = 2**21) and must still round up."""
    w = t64([[1 + 2.0**-24 + 2.0**-40]])
    up, down = t64([[2.0**10, 2.0**10]]), t64([[2.0**10], [-(2.0**10)]])
    m = ExactMerge([Term((0, 1), up, down, 1.0, 1.0)], 1, 1, "F32")
    v = np.array([1 + 2.0**-24 - 2.0**-33])
    bits = m.decide(v, np.array([0]), np.array([0]), lambda r, c: w.numpy().reshape(-1)[:len(r)])
    assert int(bits[0]) == ref_bits(Fraction(float(w[0, 0])), "F32")


def test_the_bulk_bound_is_of_the_documented_size():
    """g (|v| + 2 A) with g = 2 N 2**-53, N the rank plus a few roundings: for one rank-1 part with A = 1
    and |v| <= 1, below 64 * 2**-53 (and at least the float64 sum's real error, 0 here)."""
    m = ExactMerge([Term((0, 1), t64([[1.0]]), t64([[1.0]]), 1.0, 1.0)], 1, 1, "F32")
    b = m.bound(np.array([1.0]), np.array([0]), np.array([0]))[0]
    assert 2.0**-53 < b < 64 * 2.0**-53
    assert 2.0**-53 < m.max_bound(1.0) < 64 * 2.0**-53
    assert m.max_bound(1.0) >= b


def test_the_certificate_takes_rows_outside_another_term():
    """Row 1 is changed only by a term whose values are multiples of 2**31 (base 2**62: the sum 2**63 is
    exact whatever the order); the term over row 0 (down column 2**40) has no value in row 1 to lose bits."""
    terms = [Term((0, 1), t64([[1.0]]), t64([[2.0**40]]), 1.0, 1.0),
             Term((1, 2), t64([[2.0**31]]), t64([[2.0**31]]), 1.0, 1.0)]
    m = ExactMerge(terms, 2, 1, "F32")
    assert m._exact_sums(np.array([2.0**63]), np.array([1]), np.array([0]), np.array([2.0**62])).tolist() == [True]


def test_the_double_double_level_decides_an_exact_tie_itself(monkeypatch):
    """1 + 2**-24 (1 + 2**-52): float64 sums it to the float32 midpoint 1 + 2**-24, the certificate cannot
    take it (76 bits), the double-double sum is exact (hi + lo = 1 + 2**-24 + 2**-76): rounded up, with no
    Python fallback."""
    w = t64([[1.0, 1.0]])
    terms = [(0, 1, t64([[2.0**-24]]), t64([[1 + 2.0**-52, -(1 + 2.0**-52)]]), 1.0, 1.0)]
    calls = count_calls(monkeypatch, "exact_sum")
    check(w, terms, ("F32",))
    assert calls == []


def test_products_with_strength_in_the_subnormal_range_are_not_taken_as_exact():
    """Two terms at strength 2**-100 add (1 + 2**-50) 2**-1060 and -2**-1060 to the float32 midpoint
    1 + 2**-24: float64 keeps 2**-1060 of the first (its last bits are below 2**-1074), so the tails seem to
    cancel; exactly they leave +2**-1110, and the sum rounds up."""
    w = t64([[1 + 2.0**-24]])
    a = 2.0**-480
    check(w, [(0, 1, t64([[a]]), t64([[(1 + 2.0**-50) * a]]), 2.0**-100, 1.0),
              (0, 1, t64([[a]]), t64([[-a]]), 2.0**-100, 1.0)], ("F32",))


def test_a_term_whose_product_with_strength_underflows_is_not_exact():
    """2**-480 x 2**-480 x 2**-200 = 2**-1160 is below float64's range but not zero: W = 1 + 2**-24 (a float32
    midpoint) and 1 + 2**-8 (a bf16 one) plus it round up, not to even. (The double-double level took a
    product that underflowed to 0 for an exact 0.)"""
    w = t64([[1 + 2.0**-24, 1 + 2.0**-8]])
    check(w, [(0, 1, t64([[2.0**-480]]), t64([[2.0**-480, 2.0**-480]]), 2.0**-200, 1.0)], ("F32", "BF16"))


# ----------------------------------------------------------------------------- the bulk's flags


class OffCpu(torch.Tensor):
    """A CPU tensor that reports another device, so that `_bulk` takes its torch (device) code path."""

    @property
    def device(self):
        return torch.device("meta")


class CpuScratch(Scratch):
    def get(self, name, n, dtype, device):
        return super().get(name, n, dtype, "cpu")


@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_bulk_flags_exactly_the_midpoints_and_rounds_the_rest(dtype, device_path):
    """Base values on, near and far from the output grid's midpoints, a term that changes every element by
    2**-70 (so the float64 sums are the base values): flagged are the elements whose float32 value (bf16,
    fp16) is a midpoint, or whose float64 value (fp32) is within 2**19 float64 ulps of one; every output
    element is the exact sum rounded."""
    p = IEEE[dtype][0]
    h = 2.0**-p  # half an ulp at 1
    vals = [1 + h, 1 + 3 * h, 2 * (1 + h), 1 + h + 2.0**-60, 1 + h - 2.0**-60,  # midpoints (to float32, fp32: window)
            1.0, 1 + 2 * h, 1 + h / 2, 1 + 1.5 * h, 1.25, 3.0]  # far from any
    flagged = {0, 1, 2, 3, 4}  # (1 + h +- 2**-60 is exactly the midpoint in float32; within the window in float64)
    w = t64([vals])
    cols = len(vals)
    m = ExactMerge([Term((0, 1), t64([[2.0**-35]]), t64([[2.0**-35] * cols]), 1.0, 1.0)], 1, cols, dtype)
    w64 = w.clone()
    m.sums(w64, 0, 1)
    out = torch.empty(1, cols, dtype=torch.float32)
    if device_path:
        flat = m._bulk(w64.as_subclass(OffCpu), 0, 1, out, CpuScratch())
    else:
        flat = m._bulk(w64, 0, 1, out, Scratch())
    assert set(torch.as_tensor(flat).tolist()) == flagged
    # and the whole chunk, through that code path, is correctly rounded
    res = torch.empty(1, cols, dtype=TD[dtype])
    w64 = w.clone()
    m.chunk(w64.as_subclass(OffCpu) if device_path else w64, 0, 1, res,
            lambda r, c: w.numpy()[r, c], CpuScratch())
    want = merged_fractions(w, [(0, 1, t64([[2.0**-35]]), t64([[2.0**-35] * cols]), 1.0, 1.0)], TD[dtype])
    assert same_bits(torch.as_tensor(res).as_subclass(torch.Tensor), want)


def test_products_that_underflow_before_a_huge_strength_x_scale_are_bounded():
    """up x down = 1.5 * 2**-1074 rounds to 2**-1073 in float64 (a subnormal product loses bits), and
    BLAS kernels may scale the sum by strength x scale = 2**1000 after it: the float64 sum is then off by
    2**-75, far more than a bound relative to the values (2**-118 here). W sits between the computed sum
    and the exact one around a float32 midpoint M, so only a bound that counts the underflow gets it
    right, in the bulk and in the double-double level."""
    mid = 1.5 * 2.0**-70 + 2.0**-94  # a float32 midpoint
    w = t64([[mid - 0.875 * 2.0**-73, 1.0]])
    up, down = t64([[2.0**-537]]), t64([[1.5 * 2.0**-537, 2.0**-537]])
    check(w, [(0, 1, up, down, 1.0, 2.0**1000)], ("F32", "BF16", "F64"))
