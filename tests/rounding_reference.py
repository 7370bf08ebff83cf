"""An independent reference for correctly rounded merges, written from IEEE 754, sharing no code with
longcat_lora.

- `round_fraction(F, dtype)`: an exact rational rounded to nearest, ties to even (the value as a float;
  inf past the largest finite value; an exact zero is +0).
- `round_exact_f64(x, dtype)`: float64 values, taken as exact, rounded the same way (vectorized by
  scaling to the target's unit in the last place and comparing the remainder with one half).
- `merged(base, terms, dtype)`: `base + sum strength * scale * up @ down` correctly rounded, for any
  size: a float64 sum with a rigorous bound (from |up| @ |down|), rounded at both ends of the interval,
  and Fractions wherever the two ends differ. `merged_fractions` does every element with Fractions
  (small tensors only), to check `merged` itself.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np
import torch

# (precision in bits with the implicit one, smallest normal exponent, largest exponent)
IEEE = {torch.bfloat16: (8, -126, 127), torch.float16: (11, -14, 15), torch.float32: (24, -126, 127),
        torch.float64: (53, -1022, 1023)}


def round_fraction(F: Fraction, dtype: torch.dtype) -> float:
    p, emin, emax = IEEE[dtype]
    if F == 0:
        return 0.0
    neg = F < 0
    a = -F if neg else F
    e = a.numerator.bit_length() - a.denominator.bit_length()  # 2**e <= a < 2**(e+2)
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    while Fraction(2) ** e > a:
        e -= 1
    ulp = Fraction(2) ** (max(e, emin) - p + 1)
    y = a / ulp
    fl = y.numerator // y.denominator
    frac = y - fl
    if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and fl % 2 == 1):
        fl += 1
    r = fl * ulp
    largest = (2 - Fraction(2) ** (1 - p)) * Fraction(2) ** emax
    if r > largest:
        return -math.inf if neg else math.inf
    v = float(r)  # exact: r has at most p significant bits in range
    return -v if neg else v


def round_exact_f64(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Float64 values (exact) rounded to `dtype`, returned as float64 (inf on overflow; 0 -> +0)."""
    p, emin, emax = IEEE[dtype]
    x = np.asarray(x, dtype=np.float64)
    _, e = np.frexp(x)  # |x| = m * 2**e, 0.5 <= m < 1, so the leading bit is 2**(e-1)
    q = np.maximum(e - 1, emin) - (p - 1)
    y = np.ldexp(np.abs(x), -q)  # exact: a power-of-two scaling of a value with <= 53 bits
    fl = np.floor(y)
    frac = y - fl
    up = (frac > 0.5) | ((frac == 0.5) & (np.fmod(fl, 2) == 1))
    r = np.ldexp(fl + up, q)
    largest = math.ldexp(2 - 2.0 ** (1 - p), emax)
    r = np.where(r > largest, np.inf, r)
    r = np.where(x < 0, -r, r)  # a negative value too small for the format rounds to -0
    return np.where(x == 0, 0.0, r)  # an exact zero is +0


def _exact(base: float, terms, i: int, j: int) -> Fraction:
    F = Fraction(base)
    for r0, r1, up, down, strength, scale in terms:
        if r0 <= i < r1:
            s = sum(Fraction(float(u)) * Fraction(float(d)) for u, d in zip(up[i - r0].tolist(), down[:, j].tolist()))
            F += Fraction(strength) * Fraction(scale) * s
    return F


def merged(base: torch.Tensor, terms, dtype: torch.dtype) -> torch.Tensor:
    """`base` (float64, the exact base values) plus the terms (r0, r1, up, down, strength, scale; factors as
    float64 tensors holding the stored values exactly), each element correctly rounded to `dtype`."""
    v = base.double().clone()
    bound = base.double().abs().clone()
    n = 2
    for r0, r1, up, down, strength, scale in terms:
        a = strength * scale
        v[r0:r1] += a * (up.double() @ down.double())
        bound[r0:r1] += abs(a) * (up.double().abs() @ down.double().abs())
        n += up.shape[1] + 4
    err = (n * 2.0 ** -52) * bound + 2.0 ** -1060  # |v - exact| <= err (any summation order, generously)
    lo = round_exact_f64(np.nextafter((v - err).numpy(), -np.inf), dtype)
    hi = round_exact_f64(np.nextafter((v + err).numpy(), np.inf), dtype)
    out = lo.copy()
    undecided = np.argwhere((lo != hi) | (np.signbit(lo) != np.signbit(hi)))
    b = base.double().numpy()
    for i, j in undecided.tolist():
        out[i, j] = round_fraction(_exact(float(b[i, j]), terms, i, j), dtype)
    return torch.from_numpy(out).to(dtype)


def merged_fractions(base: torch.Tensor, terms, dtype: torch.dtype) -> torch.Tensor:
    """The same, every element with Fractions (small tensors)."""
    b = base.double().numpy()
    out = np.empty(b.shape)
    for i in range(b.shape[0]):
        for j in range(b.shape[1]):
            out[i, j] = round_fraction(_exact(float(b[i, j]), terms, i, j), dtype)
    return torch.from_numpy(out).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as stored bytes (so -0.0 != +0.0, and NaN patterns compare)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@functools.lru_cache(maxsize=32)
def native_terms(path: str) -> dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor, float]]]:
    """module -> [(r0, r1, up, down, alpha_scale)] of a native LongCat LoRA file, one per up block (the
    official forward: chunk i of the down output through up block i), factors as float64."""
    from collections import defaultdict

    from safetensors import safe_open

    sep = "___lorahyphen___"
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            enc, _, name = k.removeprefix("lora" + sep).partition(".")
            groups[enc.replace(sep, ".")][name] = f.get_tensor(k)
    out = {}
    for module, t in groups.items():
        down = t["lora_down.weight"].double()
        ups = ([t["lora_up.weight"].double()] if "lora_up.weight" in t else
               [t[f"lora_up.blocks.{i}.weight"].double() for i in range(sum(k.startswith("lora_up.blocks.") for k in t))])
        scale = float(t["alpha_scale"].double().reshape(())) if "alpha_scale" in t else 1.0
        r = down.shape[0] // len(ups)
        h = ups[0].shape[0]
        out[module] = [(i * h, (i + 1) * h, u, down[i * r:(i + 1) * r], scale) for i, u in enumerate(ups)]
    return out


def merge_reference(base: torch.Tensor, loras: list[tuple[str, float]], module: str, dtype: torch.dtype) -> torch.Tensor:
    """`merged` for one weight of a base checkpoint and native LoRA files with strengths."""
    terms = [(r0, r1, up, down, s, scale) for path, s in loras
             for r0, r1, up, down, scale in native_terms(path).get(module, [])]
    return merged(base.double(), terms, dtype)
