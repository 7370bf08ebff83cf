"""ExactMerge's double-double level (issue 19): merges whose exact sums sit on, or within 1e-19 of, a
float32 midpoint are common with real LoRAs (bf16 factors; strength x alpha_scale 1 x 0.5 or 0.8 x 0.5):
they must still round correctly (independent reference: rounding_reference, Fractions where its bound
cannot decide) and without the per-element Python fallback, which made float32 outputs (--dtype fp32,
the INT8 requantization) hundreds of times slower. `compare` (fp8 ties) against Fractions likewise."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

import longcat_lora.apply.exact as ex
from longcat_lora.apply.exact import ExactMerge, Scratch, Term

from rounding_reference import _exact, merged, same_bits


def _case(strength: float, seed: int = 1, rows: int = 48, cols: int = 256, r: int = 16):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    up = (torch.randn(rows, r, generator=g) * 0.02).to(torch.bfloat16).double()
    down = (torch.randn(r, cols, generator=g) / 8).to(torch.bfloat16).double()
    terms = [Term((0, rows), up, down, strength, 0.5)]
    ref_terms = [(0, rows, up, down, strength, 0.5)]
    return w, terms, ref_terms


@pytest.mark.parametrize("strength", [1.0, 0.8, 0.7, -1.25])
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_structured_sums_round_exactly_without_the_python_fallback(monkeypatch, strength, dtype):
    w, terms, ref_terms = _case(strength)
    calls = []
    real = ex.exact_sum
    monkeypatch.setattr(ex, "exact_sum", lambda *a: calls.append(1) or real(*a))
    rows, cols = w.shape
    tdt = {"F32": torch.float32, "BF16": torch.bfloat16}[dtype]
    out = torch.empty(rows, cols, dtype=tdt)
    m = ExactMerge(terms, rows, cols, dtype)
    base = lambda r, c: w[torch.from_numpy(r), torch.from_numpy(c)].double().numpy()  # noqa: E731
    m.chunk(w.double().clone(), 0, rows, out, base, Scratch())
    assert same_bits(out, merged(w.double(), ref_terms, tdt))
    assert calls == []  # every flagged element decided by the bound or the double-double level
    if dtype == "F32" and strength in (1.0, 0.8):  # the case this level exists for: many exact f32 ties
        exact = np.array([[float(_exact(float(w[i, j]), ref_terms, i, j)) for j in range(40)] for i in range(8)])
        lo = np.abs(exact).astype(np.float32).astype(np.float64)
        assert (np.abs(exact) != lo).any()


def test_compare_is_the_sign_of_the_exact_difference():
    w, terms, ref_terms = _case(1.0, seed=3, rows=16, cols=64)
    rows, cols = w.shape
    m = ExactMerge(terms, rows, cols, "F32")
    base = lambda r, c: w[torch.from_numpy(r), torch.from_numpy(c)].double().numpy()  # noqa: E731
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    rr, cc = rr.reshape(-1), cc.reshape(-1)
    exact = [_exact(float(w[i, j]), ref_terms, i, j) for i, j in zip(rr, cc)]
    x = np.array([float(f) for f in exact])
    f32 = x.astype(np.float32).astype(np.float64)
    g = np.random.default_rng(0)
    for t in (x, f32, np.nextafter(x, np.inf), np.nextafter(x, -np.inf), -x, f32 * (1 + 2.0 ** -30),
              x + g.normal(0, 1e-3, x.size)):
        got = m.compare(rr, cc, base, t)
        want = np.array([(f > Fraction(float(v))) - (f < Fraction(float(v))) for f, v in zip(exact, t)])
        assert np.array_equal(got, want)


def test_the_exactness_certificate_is_sound_and_takes_the_common_ties(monkeypatch):
    """`_exact_sums` claims a float64 sum is exact only when it is: checked against Fractions on sums built
    to lose bits (factors spread over 2**-40 .. 2**12, alphas that are and are not powers of two, sums in
    two orders), and it takes the common case (bf16 factors, 1 x 0.5) so that the double-double level
    is not needed there."""
    g = torch.Generator().manual_seed(7)
    rows, cols, r = 12, 40, 8
    claimed = wrong = 0
    cases = [(0.5, 0), (0.3, 0), (0.375, 30), (4.0, 45)] + [(a, s) for a in (0.5, 4.0) for s in range(1, 12)]
    for alpha_scale, spread in cases:
        e = lambda *s: torch.randint(-spread, 13, s, generator=g).double() if spread else torch.zeros(s)  # noqa: E731
        up = ((torch.randn(rows, r, generator=g) * 2.0 ** e(rows, r)).to(torch.bfloat16)).double()
        down = ((torch.randn(r, cols, generator=g) * 2.0 ** e(r, cols)).to(torch.bfloat16)).double()
        w = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16).double()
        m = ExactMerge([Term((0, rows), up, down, 1.0, alpha_scale)], rows, cols, "F32")
        for order in (torch.arange(r), torch.arange(r - 1, -1, -1)):  # two summation orders
            v = (w + alpha_scale * (up[:, order] @ down[order])).numpy()
            rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
            ok = m._exact_sums(v.reshape(-1), rr.reshape(-1), cc.reshape(-1), w.numpy().reshape(-1))
            terms = [(0, rows, up, down, 1.0, alpha_scale)]
            for k in np.flatnonzero(ok):
                i, j = divmod(int(k), cols)
                claimed += 1
                wrong += Fraction(float(v[i, j])) != _exact(float(w[i, j]), terms, i, j)
            if (alpha_scale, spread) == (0.5, 0):
                assert ok.all()  # the common case: every sum certified
            if spread >= 45:
                assert not ok.all()  # sums that lose bits are not
    assert claimed > 5000 and wrong == 0
    # at the edge: 2**53 + 1 needs 54 bits, and the certificate's magnitude bound is within 3x of it
    up, down = torch.tensor([[1.0, 1.0]], dtype=torch.float64), torch.tensor([[2.0 ** 53], [1.0]], dtype=torch.float64)
    m = ExactMerge([Term((0, 1), up, down, 1.0, 1.0)], 1, 1, "F32")
    assert not m._exact_sums(np.array([2.0 ** 53]), np.array([0]), np.array([0]), np.array([0.0]))[0]
    up = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    down = torch.tensor([[2.0 ** 51], [1.0]], dtype=torch.float64)  # 2**51 + 1: 52 bits, exact
    m = ExactMerge([Term((0, 1), up, down, 1.0, 1.0)], 1, 1, "F32")
    assert m._exact_sums(np.array([2.0 ** 51 + 1]), np.array([0]), np.array([0]), np.array([0.0]))[0]
    # and with the certificate, the common case needs neither the double-double level nor the fallback
    w, terms, ref_terms = _case(1.0)
    calls = []
    real = ExactMerge._dd
    monkeypatch.setattr(ExactMerge, "_dd", lambda self, *a: calls.append(1) or real(self, *a))
    out = torch.empty(w.shape, dtype=torch.float32)
    m = ExactMerge(terms, *w.shape, "F32")
    m.chunk(w.double().clone(), 0, w.shape[0], out,
            lambda r, c: w[torch.from_numpy(r), torch.from_numpy(c)].double().numpy(), Scratch())
    assert same_bits(out, merged(w.double(), ref_terms, torch.float32)) and calls == []
