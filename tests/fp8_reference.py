"""An independent fp8 reference, written from the formats' definitions, sharing no code with longcat_lora.

float8_e4m3fn: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; exponent field 0 is subnormal
(m/8 * 2**-6); no infinities; exponent 15 with mantissa 7 is NaN; largest finite 448.
float8_e5m2: 1 sign bit, 5 exponent bits (bias 15), 2 mantissa bits; exponent 0 subnormal (m/4 * 2**-14);
exponent 31 is infinity (mantissa 0) or NaN; largest finite 57344.

- `decode(codes, fmt)`: every code's value by those rules (float64, exact).
- `quantize(y, fmt)`: float64 values (taken as exact) rounded to the nearest finite code, ties to the even
  code, by search in the sorted table of values (not by bit manipulation); past the largest finite value
  is an error here. The sign is kept (a negative value that rounds to zero is -0).
- `quantize_fraction(F, fmt)`: the same for an exact rational.
- `pow2_scale(amax, fmax)`: the smallest power of two 2**k with amax <= fmax * 2**k (1 for 0), exactly.
- `requantized(base64, terms, scale_blocks, fmt)`: the merged weight `base + sum strength*scale*up@down`
  correctly rounded to float32 (rounding_reference.merged), new power-of-two scales per block from it,
  and the codes of the exact merged value divided by them (Fractions where the float32 value is exactly
  a midpoint of the fp8 grid).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

from rounding_reference import _exact, merged

FORMATS = {"e4m3fn": (4, 3, 7), "e5m2": (5, 2, 15)}  # exponent bits, mantissa bits, bias


def decode_one(code: int, fmt: str) -> float:
    ebits, mbits, bias = FORMATS[fmt]
    sign = -1.0 if code & 0x80 else 1.0
    e = (code >> mbits) & ((1 << ebits) - 1)
    m = code & ((1 << mbits) - 1)
    if fmt == "e4m3fn" and e == 15 and m == 7:
        return math.nan
    if fmt == "e5m2" and e == 31:
        return math.nan if m else sign * math.inf
    if e == 0:
        return sign * m / (1 << mbits) * 2.0 ** (1 - bias)
    return sign * (1 + m / (1 << mbits)) * 2.0 ** (e - bias)


def decode(codes: np.ndarray, fmt: str) -> np.ndarray:
    table = np.array([decode_one(c, fmt) for c in range(256)])
    return table[np.asarray(codes, dtype=np.int64)]


def _grid(fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Positive finite values (ascending, zero included) and their codes."""
    vals = [(decode_one(c, fmt), c) for c in range(128)]
    vals = [(v, c) for v, c in vals if math.isfinite(v)]
    vals.sort()
    return np.array([v for v, _ in vals]), np.array([c for _, c in vals])


def fmax(fmt: str) -> float:
    return float(_grid(fmt)[0][-1])


def quantize(y: np.ndarray, fmt: str) -> np.ndarray:
    """Codes (uint8) of float64 values rounded to nearest, ties to even (see the module docstring)."""
    grid, codes = _grid(fmt)
    y = np.asarray(y, dtype=np.float64)
    a = np.abs(y)
    if (a > grid[-1]).any():
        raise OverflowError("value past the largest finite fp8 value")
    hi = np.searchsorted(grid, a, side="left")  # grid[hi-1] < a <= grid[hi]
    lo = np.maximum(hi - 1, 0)
    exact = grid[hi] == a
    # compare 2a with lo + hi (both exact in float64): which neighbour is nearer, or a tie
    s = grid[lo] + grid[hi]
    pick_hi = (2 * a > s) | ((2 * a == s) & (codes[hi] % 2 == 0))
    idx = np.where(exact | pick_hi, hi, lo)
    out = codes[idx].astype(np.uint8)
    return out | (np.signbit(y).astype(np.uint8) << 7)


def quantize_fraction(F: Fraction, fmt: str) -> int:
    grid, codes = _grid(fmt)
    a = abs(F)
    best = None
    for k in range(len(grid) - 1):
        lo, hi = Fraction(grid[k]), Fraction(grid[k + 1])
        if lo <= a <= hi:
            if a - lo < hi - a or (a - lo == hi - a and codes[k] % 2 == 0):
                best = int(codes[k])
            else:
                best = int(codes[k + 1])
            break
    if best is None:
        raise OverflowError("value past the largest finite fp8 value")
    return best | (0x80 if F < 0 else 0)


def is_midpoint(y: np.ndarray, fmt: str) -> np.ndarray:
    """Whether each |y| lies exactly halfway between two adjacent grid values."""
    grid, _ = _grid(fmt)
    mids = (grid[:-1] + grid[1:]) / 2  # exact
    return np.isin(np.abs(y), mids)


def pow2_scale(amax: float, fm: float) -> float:
    if amax == 0:
        return 1.0
    k = math.ceil(math.log2(amax / fm))
    while Fraction(amax) > Fraction(fm) * Fraction(2) ** k:
        k += 1
    while Fraction(amax) <= Fraction(fm) * Fraction(2) ** (k - 1):
        k -= 1
    return math.ldexp(1.0, k)


def requantized(base: torch.Tensor, terms, blocks: tuple[int, int], fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [rows, cols], scales float64 [rows/bo, cols/bi]) of the merged weight requantized with
    blocks of `blocks` = (bo, bi) rows by columns. `terms` as rounding_reference.merged takes them."""
    w32 = merged(base.double(), terms, torch.float32).double().numpy()
    rows, cols = w32.shape
    bo, bi = blocks
    fm = fmax(fmt)
    amax = np.abs(w32).reshape(rows // bo, bo, cols // bi, bi).max(axis=(1, 3))
    scales = np.vectorize(lambda a: pow2_scale(float(a), fm))(amax)
    full = np.repeat(np.repeat(scales, bo, 0), bi, 1)
    y = w32 / full  # exact: powers of two
    codes = quantize(y, fmt)
    b = base.double().numpy()
    for i, j in np.argwhere(is_midpoint(y, fmt) & (w32 != 0)).tolist():
        x = _exact(float(b[i, j]), terms, i, j) / Fraction(full[i, j])
        codes[i, j] = quantize_fraction(x, fmt)
    return codes, scales
