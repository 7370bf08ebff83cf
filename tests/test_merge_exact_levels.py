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
