"""Merged weights whose every element is the correctly rounded value of `W + sum strength * scale * up @ down`.

The bytes of a merge depend only on its inputs: not on the CPU (Intel or AMD, AVX2 or AVX-512 kernels),
the BLAS, the number of threads or chunk workers, the chunk size, or the device. That holds by
construction, because each output element is the one value the exact sum rounds to (round to nearest,
ties to even, directly to the output dtype), and every machine agrees on that. Levels compute it, each
deciding what it can and handing the rest on:

1. **Bulk** (every element): the sum in float64 (`addmm_`, any BLAS, any summation order). Its error is
   bounded by `g * (|v| + 2 * A_ij)` with `g = 2 * N * 2**-53` (N: the LoRA ranks summed, plus a few
   roundings per part) and `A_ij = sum_p |strength_p * scale_p| * |up_p[i]| * |down_p[:, j]|` (2-norms,
   Cauchy-Schwarz on `sum_k |up_ik * down_kj|`; the norms are computed scaled, so tiny or huge factors
   neither underflow nor overflow). The value is rounded to the output dtype; an element is *flagged*
   when that rounding could differ from the exact sum's: for bf16 / fp16 outputs, when the float32
   value of the sum is exactly a midpoint of the output's grid (then, and only then, the bound can
   cross it or rounding through float32 could round twice); for fp32 outputs, when the float64 sum lies
   within 2**19 of its units in the last place of a float32 midpoint; in both, when the value is too
   small for the bound to be relative (near zero, subnormal) or too large (overflow), or not finite.
   About 1 in 65,000 elements (bf16), 1 in 500 (fp32). Flagged elements are decided once per weight,
   after its last chunk (`resolve`), by the levels below.
2. **Interval**: `v +- E_ij` with the per-element bound, each end rounded to the output dtype; equal
   ends decide. An element no term changes is its base value, rounded.
3. **Certificate** (`_exact_sums`): where every value any evaluation order can form is a multiple of
   2**L below 2**(L + 53), the float64 sum is the exact sum, so rounding it decides, ties included.
   This is the common case of ties (bf16 factors, strength x scale a power of two such as 1 x 0.5).
4. **Double-double** (`_dd`): the sums again with error-free products and additions and a rigorous
   bound of order 2**-106; it decides sums within ~1e-15 of a midpoint, and exactly where no step lost
   a bit.
5. **Exact**: what remains, in Python integers (every input is a dyadic rational), rounded exactly.

float64 outputs are summed in double-double arithmetic in a fixed order (level 1 cannot decide them),
then levels 2 to 5 as above: exact, and slow (a float64 checkpoint of LongCat-Video is 108 GB).

The cost against a plain float32 merge is the float64 products (about twice the float32 GEMM time on
the project's machine) and a few cheap passes over each chunk; figures in docs/performance.md, the
guarantee and its edges in docs/formats.md.

One module, longer than the house's usual: the levels share one weight's norms, bound, certificate and
double-double helpers, and each level's correctness argument leans on the one before it; split, the
argument would be spread over files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LoraError


@dataclass(frozen=True)
class Fmt:
    """An IEEE binary format: precision p (bits, the implicit one included), exponent range, bias."""

    p: int
    emin: int
    emax: int
    bits: int
    np_uint: type
    torch_int: torch.dtype

    @property
    def bias(self) -> int:
        return self.emax

    @property
    def max(self) -> float:
        return math.ldexp(2.0 - 2.0 ** (1 - self.p), self.emax)


FMTS = {
    "BF16": Fmt(8, -126, 127, 16, np.uint16, torch.int16),
    "F16": Fmt(11, -14, 15, 16, np.uint16, torch.int16),
    "F32": Fmt(24, -126, 127, 32, np.uint32, torch.int32),
    "F64": Fmt(53, -1022, 1023, 64, np.uint64, torch.int64),
}


class NotFinite(ArithmeticError):
    """The exact merged value is not finite in the output dtype (or an input was NaN/Inf)."""


# ----------------------------------------------------------------------------- exact rounding


def round_dyadic(n: int, e: int, dtype: str) -> int:
    """The bits of n * 2**e rounded to nearest (ties to even) in `dtype`; an exact zero is +0.

    >>> hex(round_dyadic(3, -1, "BF16"))  # 1.5
    '0x3fc0'
    """
    f = FMTS[dtype]
    sign = 0
    if n < 0:
        sign, n = 1, -n
    if n == 0:
        return 0
    lead = n.bit_length() - 1 + e  # exponent of the leading bit
    q = max(lead, f.emin) - (f.p - 1)  # exponent of the unit in the last place there
    shift = q - e
    if shift <= 0:
        mant = n << -shift
    else:
        mant = n >> shift
        rem = n - (mant << shift)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and mant & 1):
            mant += 1
    if mant == 1 << f.p:  # carried into the next binade
        mant >>= 1
        q += 1
    ebits = f.bits - f.p
    if mant >= 1 << (f.p - 1):
        biased = q + f.p - 1 + f.bias
        if biased >= (1 << ebits) - 1:  # overflow: infinity
            return (sign << (f.bits - 1)) | (((1 << ebits) - 1) << (f.p - 1))
        return (sign << (f.bits - 1)) | (biased << (f.p - 1)) | (mant - (1 << (f.p - 1)))
    return (sign << (f.bits - 1)) | mant  # subnormal (or zero after rounding)


def dyadic(x: float) -> tuple[int, int]:
    """(n, e) with x == n * 2**e exactly (x finite)."""
    num, den = float(x).as_integer_ratio()
    return num, -(den.bit_length() - 1)


def exact_sum(base: float, terms: list[tuple[float, float, np.ndarray, np.ndarray]]) -> tuple[int, int]:
    """`base + sum strength * scale * dot(up_row, down_col)` exactly, as (n, e): n * 2**e.

    `terms`: (strength, scale, up row [r], down column [r]) float64 arrays holding exact copies of the
    stored values."""
    acc: list[tuple[int, int]] = [dyadic(base)]
    for strength, scale, u, d in terms:
        sn, se = dyadic(strength)
        cn, ce = dyadic(scale)
        an, ae = sn * cn, se + ce
        if an == 0:
            continue
        for a, b in zip(u.tolist(), d.tolist()):
            if a == 0.0 or b == 0.0:
                continue
            un, ue = dyadic(a)
            dn, de = dyadic(b)
            acc.append((an * un * dn, ae + ue + de))
    emin = min(e for _, e in acc)
    return sum(n << (e - emin) for n, e in acc), emin


def round_f64(x: np.ndarray, dtype: str) -> np.ndarray:
    """Float64 values rounded to nearest (ties to even) directly to `dtype`, as unsigned bits.

    bfloat16 and float16 go through float32 rounded to odd (truncated, the last bit set when inexact),
    which has enough extra bits that rounding again gives the direct rounding (no double rounding)."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == "F64":
        return x.view(np.uint64).copy()
    with np.errstate(over="ignore", invalid="ignore"):
        t = x.astype(np.float32)
    if dtype == "F32":
        return t.view(np.uint32).copy()
    back = t.astype(np.float64)
    bits = t.view(np.uint32).copy()
    finite = np.isfinite(x)
    inexact = (back != x) & finite
    away = inexact & (np.abs(back) > np.abs(x))  # rounded away from zero: one step back (truncation)
    bits[away] -= 1
    bits[inexact] |= 1  # round to odd
    if dtype == "F16":
        with np.errstate(over="ignore"):  # past float16's range: inf, which the callers refuse by name
            return bits.view(np.float32).astype(np.float16).view(np.uint16)
    # float32 -> bfloat16, to nearest even on the low 16 bits (NaN stays NaN)
    nan = np.isnan(x)
    out = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    out[nan] = 0x7FC0
    return out


def from_bits(bits: np.ndarray, dtype: str) -> np.ndarray:
    """The float64 values of `dtype` bits (exact)."""
    if dtype == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return bits.view({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]).astype(np.float64)


# ----------------------------------------------------------------------------- one weight


@dataclass
class Term:
    """One LoRA part on one weight: rows[0]:rows[1] += strength * scale * up @ down."""

    rows: tuple[int, int]
    up: torch.Tensor  # float64 [rows, r]: the stored values, exactly
    down: torch.Tensor  # float64 [r, cols]
    strength: float
    scale: float

    @property
    def alpha(self) -> float:
        return self.strength * self.scale


# The bulk's flag window for fp32 outputs: elements within this many float64 ulps of a float32 midpoint.
F32_WINDOW = 1 << 19


class ExactMerge:
    """Correctly rounded `W + sum strength * scale * up @ down` for one weight, row chunk by row chunk.

    `terms` hold float64 copies of the LoRA factors on the device that computes; `rows`, `cols` the
    weight's shape; `out_dtype` one of BF16, F16, F32, F64. `chunk` takes the exact base values of rows
    r0:r1 as float64 in `w64` (overwritten) and writes the rounded result into `out`.
    """

    def __init__(self, terms: list[Term], rows: int, cols: int, out_dtype: str, device: torch.device | str | None = None):
        if out_dtype not in FMTS:
            raise ValueError(f"out_dtype {out_dtype!r}")
        self.terms = [t for t in terms if t.up.shape[1] and t.rows[0] < t.rows[1]]
        # the factors where the sums run (`device`; default: where they are)
        self.gemm = [(t.up if device is None else t.up.to(device, non_blocking=True),
                      t.down if device is None else t.down.to(device, non_blocking=True), t) for t in self.terms]
        self.rows, self.cols, self.out_dtype = rows, cols, out_dtype
        n = sum(t.up.shape[1] + 3 for t in self.terms) + 2
        self.g = 2.0 * n * 2.0 ** -53
        if self.g > 2.0 ** -36:
            raise LoraError(f"{len(self.terms)} LoRA parts of total rank {n} on one weight: too many to merge exactly")
        # norms (upper bounds: computed in float64, inflated past their rounding), on the CPU as numpy
        self.nu: list[np.ndarray] = []  # per term: |up row| over the whole weight's rows (0 outside its rows)
        self.nd: list[np.ndarray] = []  # per term: |down column|
        self.nd_max: list[float] = []
        self.alphas = [abs(t.alpha) * (1 + 2.0 ** -50) for t in self.terms]
        # the absolute error that products and sums in the subnormal range may add (each at most 2**-1075),
        # times strength x scale: a BLAS may scale the sum after forming it (then 1.5 * 2**-1074 rounded to
        # 2**-1073, times 2**1000, is 2**-75 off); far below anything for ordinary scales
        self.tiny = sum(math.ldexp(max(al, 1.0) * (t.up.shape[1] + 2) * (1 + 2.0 ** -20), -1073) + 2.0 ** -1072
                        for al, t in zip(self.alphas, self.terms))
        self.up_np = [t.up.cpu().numpy() for t in self.terms]
        self.down_np = [t.down.cpu().numpy() for t in self.terms]
        for t, u, d in zip(self.terms, self.up_np, self.down_np):
            full = np.zeros(rows)
            full[t.rows[0]:t.rows[1]] = _norms(u, 1)
            cn = _norms(d, 0)
            self.nu.append(full)
            self.nd.append(cn)
            self.nd_max.append(float(cn.max()) if cn.size else 0.0)
        self._certificate: list | None = None  # what `_exact_sums` needs, made on its first use
        # per term: both factors hold float32 values (bf16, fp16, fp32 files), so that every product of
        # two of them (at most 48 significant bits) is exact in float64 (double-double level, `_dd`)
        with np.errstate(over="ignore"):  # (a factor past float32's range is simply not narrow)
            self._narrow = [bool(np.array_equal(u, u.astype(np.float32)) and np.array_equal(d, d.astype(np.float32)))
                            for u, d in zip(self.up_np, self.down_np)]
        if not all(np.isfinite(a) for a in self.alphas) or not all(
                np.isfinite(x).all() for x in self.nu + self.nd):
            self.finite_inputs = False
        else:
            self.finite_inputs = True

    # ------------------------------------------------------------------ bounds

    def _row_bound(self, r0: int, r1: int) -> float:
        """max over rows r0:r1 of A_i = sum_p |alpha_p| |up_p[i]| max_j |down_p[:, j]|."""
        if not self.terms:
            return 0.0
        a = sum(al * nm * nu[r0:r1] for al, nm, nu in zip(self.alphas, self.nd_max, self.nu))
        return float(np.max(a)) if np.size(a) else 0.0

    def _bound(self, v: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """E_ij >= |v - exact| for the bulk's float64 values v at (rows, cols)."""
        a = np.zeros(len(v))
        for al, nu, nd in zip(self.alphas, self.nu, self.nd):
            a += al * nu[rows] * nd[cols]
        # (+ g * 2**-1022: the absolute error of float64 operations whose results are subnormal)
        return (self.g * (np.abs(v) + 2.0 * a)) * (1 + 2.0 ** -30) + self.g * 2.0 ** -1022 + self.tiny

    def _change_free(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Where no term can change the element: each has a zero strength x scale, up row or down column."""
        touched = np.zeros(len(rows), dtype=bool)
        for t, nu, nd in zip(self.terms, self.nu, self.nd):
            if t.alpha != 0:
                touched |= (nu[rows] > 0) & (nd[cols] > 0)
        return ~touched

    def _low_threshold(self, r0: int, r1: int, budget: float) -> float:
        """|value| below which the relative window cannot be trusted:
        (2 g A + the absolute terms) (1+eps) / (budget - g (1+eps))."""
        a = self._row_bound(r0, r1)
        return (2.0 * self.g * a + 2.0 * self.tiny) * (1 + 2.0 ** -20) / (budget - self.g * (1 + 2.0 ** -20))

    # ------------------------------------------------------------------ the chunk

    def chunk(self, w64: torch.Tensor, r0: int, r1: int, out: torch.Tensor,
              base: Callable[[np.ndarray, np.ndarray], np.ndarray], scratch: Scratch | None = None,
              defer: list | None = None) -> None:
        """Rows r0:r1: `w64` holds the exact base values (float64, overwritten), `out` [r1-r0, cols] in the
        output dtype receives the correctly rounded merged values; `base(rows, cols)` gives exact base
        values (float64, absolute row indices) for the few elements decided exactly. Raises NotFinite.

        With `defer` (a list), the flagged elements of this chunk are appended to it instead of decided
        (their rounded float32 bits stay in `out` meanwhile): `resolve` decides them all at once, for a
        weight whose chunks run on the CPU (one call instead of one per chunk)."""
        if self.out_dtype == "F64":
            self._chunk_f64(w64, r0, r1, out, base)
            return
        self.sums(w64, r0, r1)
        scratch = scratch or Scratch()
        flat = self._bulk(w64, r0, r1, out, scratch)
        if not flat.numel():
            return
        if defer is None:
            self._resolve(w64, flat, r0, out, base)
        else:
            defer.append((flat.cpu().numpy() + r0 * self.cols, w64.view(-1)[flat].cpu().numpy()))

    def resolve(self, out: torch.Tensor, deferred: list, base: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        """Decide the elements `chunk(..., defer=deferred)` set aside and write their bits into `out`, the
        whole weight's output [rows, cols]. Raises NotFinite."""
        if not deferred:
            return
        idx = np.concatenate([i for i, _ in deferred])
        v = np.concatenate([x for _, x in deferred])
        bits = self.decide(v, idx // self.cols, idx % self.cols, base)
        out.view(FMTS[self.out_dtype].torch_int).view(-1)[torch.from_numpy(idx).to(out.device)] = torch.from_numpy(
            bits.view(_signed(self.out_dtype))).to(out.device)

    def sums(self, w64: torch.Tensor, r0: int, r1: int) -> None:
        """Level 1's float64 sums of rows r0:r1 into `w64` (holding the exact base values): any BLAS, any
        order; each within `bound` of the exact sum. (fp8.py rounds from these itself.)"""
        for up, down, t in self.gemm:
            lo, hi = max(r0, t.rows[0]), min(r1, t.rows[1])
            if lo < hi:
                w64[lo - r0:hi - r0].addmm_(up[lo - t.rows[0]:hi - t.rows[0]], down, alpha=t.alpha)

    def bound(self, v: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """E_ij >= |v - exact| for float64 sums v at (rows, cols) computed by `sums` (see `_bound`)."""
        return self._bound(v, rows, cols)

    def max_bound(self, value: float) -> float:
        """An upper bound of `bound` over every element whose float64 sum is at most `value` in magnitude."""
        a = self._row_bound(0, self.rows)
        return (self.g * (abs(value) + 2.0 * a)) * (1 + 2.0 ** -29) + self.g * 2.0 ** -1021 + self.tiny

    def low_threshold(self, r0: int, r1: int, budget: float) -> float:
        """|value| below which, in rows r0:r1, the bound may exceed `budget` times the value."""
        return self._low_threshold(r0, r1, budget) if self.terms else 0.0

    def _bulk(self, w64: torch.Tensor, r0: int, r1: int, out: torch.Tensor, s: Scratch) -> torch.Tensor:
        """Round every element; the flat indices (in the chunk) of those the bound may not decide.

        The flag test (see the module docstring) in a few integer operations on the bits: for bf16 / fp16
        outputs on the float32 value t of the sum (magnitude bits outside [lo, hi), or the bits below the
        output's exactly a midpoint); for fp32 outputs on the float64 sum (outside [lo, hi), or within
        F32_WINDOW of a midpoint). On the CPU in numpy (several times faster than torch's integer and bool
        operations here), on a device in torch."""
        if self.out_dtype in ("BF16", "F16"):
            smallest = 2.0 ** -126 if self.out_dtype == "BF16" else 2.0 ** -14  # below: subnormal output grids
            lo = _f32_bits_ceil(max(self._low_threshold(r0, r1, 2.0 ** -26), smallest))
            hi = _f32_bits_floor(FMTS[self.out_dtype].max)  # at or past the largest value, Inf, NaN
            low = 16 if self.out_dtype == "BF16" else 13  # float32 fraction bits below the output's
            wide, bits, mask, mid = torch.float32, torch.int32, 0x7FFFFFFF, -(1 << 31)  # mid: low bits << (32 - low)
        else:  # F32: on the float64 sum itself
            lo = _f64_bits(max(self._low_threshold(r0, r1, F32_WINDOW * 2.0 ** -53), 2.0 ** -126))
            hi = _f64_bits(FMTS["F32"].max)
            low, wide, bits, mask = 29, None, torch.int64, 0x7FFFFFFFFFFFFFFF
        n = w64.numel()
        if wide is not None:
            t = s.get("t32", n, wide, w64.device).view_as(w64)
            t.copy_(w64)  # to nearest even: exact near midpoints only where flagged
        else:
            t = w64
        if w64.device.type == "cpu":
            ti = t.numpy().view(np.int32 if wide is not None else np.int64).reshape(-1)
            m = s.get("m", n, bits, w64.device).numpy()
            flag = s.get("flag", n, torch.bool, w64.device).numpy()
            other = s.get("other", n, torch.bool, w64.device).numpy()
            np.bitwise_and(ti, mask, out=m)
            np.less(m, lo, out=flag)
            np.greater_equal(m, hi, out=other)
            np.logical_or(flag, other, out=flag)
            if wide is not None:  # exactly a midpoint: the low bits, shifted to the top, are 100...0
                np.left_shift(ti, 32 - low, out=m)
                np.equal(m, mid, out=other)
            else:  # within F32_WINDOW float64 ulps of a midpoint
                np.add(ti, F32_WINDOW - (1 << (low - 1)), out=m)
                np.bitwise_and(m, (1 << low) - 1, out=m)
                np.less(m, 2 * F32_WINDOW, out=other)
            np.logical_or(flag, other, out=flag)
            out.copy_(t)
            return torch.from_numpy(np.flatnonzero(flag))
        ti = t.view(bits)
        m = s.get("m", n, bits, w64.device).view_as(w64)
        flag = s.get("flag", n, torch.bool, w64.device).view_as(w64)
        other = s.get("other", n, torch.bool, w64.device).view_as(w64)
        torch.bitwise_and(ti, mask, out=m)
        torch.lt(m, lo, out=flag)
        torch.ge(m, hi, out=other)
        flag.logical_or_(other)
        if wide is not None:
            torch.bitwise_and(ti, (1 << low) - 1, out=m)
            torch.eq(m, 1 << (low - 1), out=other)
        else:
            torch.add(ti, F32_WINDOW - (1 << (low - 1)), out=m)
            m.bitwise_and_((1 << low) - 1)
            torch.lt(m, 2 * F32_WINDOW, out=other)
        flag.logical_or_(other)
        out.copy_(t)
        return flag.view(-1).nonzero().view(-1)

    def _resolve(self, w64: torch.Tensor, flat: torch.Tensor, r0: int, out: torch.Tensor,
                 base: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        """Decide the flagged elements (levels 2 and 3) and write their bits into `out`."""
        idx = flat.cpu().numpy()
        v = w64.view(-1)[flat].cpu().numpy()
        rows, cols = idx // self.cols + r0, idx % self.cols
        bits = self.decide(v, rows, cols, base)
        out.view(FMTS[self.out_dtype].torch_int).view(-1)[flat] = torch.from_numpy(
            bits.view(_signed(self.out_dtype))).to(out.device)

    def decide(self, v: np.ndarray, rows: np.ndarray, cols: np.ndarray,
               base: Callable[[np.ndarray, np.ndarray], np.ndarray], err: np.ndarray | None = None) -> np.ndarray:
        """Bits of the exact sum at (rows, cols), given float64 approximations `v` within `err` (default:
        the bulk's bound): the interval decides where it can, the exact sum elsewhere."""
        dt = self.out_dtype
        if not np.isfinite(v).all() or not self.finite_inputs:
            raise NotFinite
        e = self._bound(v, rows, cols) if err is None else err
        with np.errstate(over="ignore", invalid="ignore"):
            a = np.nextafter(v - e, -np.inf)
            b = np.nextafter(v + e, np.inf)
        ra, rb = round_f64(a, dt), round_f64(b, dt)
        bits = ra.copy()
        todo = np.flatnonzero(ra != rb)
        if todo.size:  # an element no term changes is its base value, rounded (an exact zero is +0)
            free = todo[self._change_free(rows[todo], cols[todo])]
            if free.size:
                bits[free] = round_f64(base(rows[free], cols[free]) + 0.0, dt)
                todo = np.setdiff1d(todo, free)
        if todo.size:  # where every step of the float64 sums was exact, v is the exact sum: round it
            sure = self._exact_sums(v[todo], rows[todo], cols[todo], base(rows[todo], cols[todo]))
            bits[todo[sure]] = round_f64(v[todo[sure]] + 0.0, dt)  # (an exact zero is +0 whatever the order made)
            todo = todo[~sure]
        if todo.size:  # level 2b: the sums again in double-double, each interval end rounded exactly
            hi, lo, e, known = self._dd(rows[todo], cols[todo], base(rows[todo], cols[todo]))
            with np.errstate(over="ignore", invalid="ignore"):
                ra = _round_dd(*_two_sum(hi, np.nextafter(lo - e, -np.inf)), dt)
                rb = _round_dd(*_two_sum(hi, np.nextafter(lo + e, np.inf)), dt)
                ra[known] = _round_dd(hi[known], lo[known], dt)  # the exact sum itself: ties included
                rb[known] = ra[known]
            same = (ra == rb) & np.isfinite(hi)
            bits[todo[same]] = ra[same]
            todo = todo[~same]
        if todo.size:
            wb = base(rows[todo], cols[todo])
            for k, i in enumerate(todo):
                bits[i] = round_dyadic(*exact_sum(float(wb[k]), self._terms_at(int(rows[i]), int(cols[i]))), dt)
        if not np.isfinite(from_bits(bits, dt)).all():
            raise NotFinite
        return bits

    def _exact_sums(self, v: np.ndarray, rows: np.ndarray, cols: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Where the float64 sums `v` at (rows, cols) are the exact sums, whatever the order and the kernel.

        A certificate, not an estimate: every value any evaluation of `b + sum alpha_p * up_p @ down_p` can
        form (a factor scaled by alpha, a product, a partial sum, alpha times a partial sum) is a multiple
        of 2**L, L the lowest bit of the base value, of each term's up row plus down column plus
        min(0, the lowest bit of alpha), and of alpha times a factor; and each is at most
        M = |b| + sum_p max(1, |alpha_p|) (S_p + max|up row| + max|down column|) in magnitude, S_p >= sum_k
        |up_ik down_kj| (Cauchy-Schwarz). If M < 2**(L + 53), each is a float64 and every operation exact.
        This is the common case that makes exact ties common: bf16 or fp16 factors, alpha a power of two
        (1 x 0.5), whose sums need few bits (a float32 result exactly on a midpoint of its grid)."""
        if self._certificate is None:  # per term: the lowest bit of each up row's and each down column's
            # values, their largest magnitudes, and the lowest bit of strength x scale
            big = np.int64(1 << 20)
            cert = []
            for t, u, d in zip(self.terms, self.up_np, self.down_np):
                lu, um = np.full(self.rows, big), np.zeros(self.rows)
                lu[t.rows[0]:t.rows[1]] = _lsb(u).min(axis=1)
                um[t.rows[0]:t.rows[1]] = np.abs(u).max(axis=1)
                exact_alpha = float(_two_prod(np.float64(t.strength), np.float64(t.scale))[1]) == 0.0
                cert.append((lu, _lsb(d).min(axis=0), um, np.abs(d).max(axis=0), int(_lsb(np.array([t.alpha]))[0]),
                             exact_alpha, t.rows))
            self._certificate = cert
        low = _lsb(b)
        mag = np.abs(b)
        ok = np.isfinite(v)
        for al, (lu, ld, um, dm, la, exact_alpha, span), nu, nd in zip(self.alphas, self._certificate, self.nu,
                                                                        self.nd):
            if not exact_alpha:  # the sums used strength x scale rounded: never exact where the term applies
                ok &= (rows < span[0]) | (rows >= span[1])
            lu_, ld_ = lu[rows], ld[cols]
            a0 = min(0, la)
            low = np.minimum(low, np.minimum(lu_ + ld_ + a0, np.minimum(lu_, ld_) + a0))
            mag = mag + max(1.0, al) * (nu[rows] * nd[cols] + um[rows] + dm[cols])
        with np.errstate(over="ignore"):
            room = np.ldexp(1.0, np.clip(low + 53, -1074, 1100).astype(np.int32))
        return ok & (low >= -1074) & (mag * (1 + 2.0 ** -40) < room)

    def _dd(self, rows: np.ndarray, cols: np.ndarray, b: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The sums at (rows, cols) in double-double: (hi, lo, e, exact) with |hi + lo - exact sum| <= e, and
        `exact` where hi + lo is the exact sum itself (every step below was error-free there). Catches, at a
        few hundred operations per element, what the float64 bound cannot: sums within 1e-15 of a
        midpoint, or exactly on one, which factors with few significant bits and strengths such as 1.0 or
        0.8 make common in float32 (about 1 element in 40 for a bf16 LoRA at strength 1, alpha_scale 0.5:
        their exact sums have fewer than 53 bits).

        Every product of two stored factors is exact in float64 when both factors hold float32 values,
        else split exactly (two_prod: p = ph + pl); the ph are summed in a pairwise tree of error-free
        additions (two_sum, all elements and ranks at once), the tree's errors and the pl in float64:
        that sum's error is at most (r + 1)(levels + 2) u**2 sum|ph| (each level's errors total at most u
        sum|ph|, the pl u sum|ph|, and a float64 sum of m terms errs by at most m u times their
        magnitudes), and it is zero where they all are. Then strength x scale and the base in
        double-double (a few u**2 of the magnitudes each; error-free where strength x scale is a float64
        and the sums need no low part). Products or sums in the subnormal range add at most 2**-1070 each."""
        hi = np.asarray(b, dtype=np.float64).copy()
        lo = np.zeros_like(hi)
        mag = np.abs(hi)
        exact = np.ones(hi.shape, dtype=bool)
        units = 16.0  # multiples of u**2 = 2**-106 of mag that bound the error
        tiny = 2.0 * 2.0 ** -1070  # absolute: subnormal products and sums, each term's times its strength x scale
        for j, (t, u, d) in enumerate(zip(self.terms, self.up_np, self.down_np)):
            ii = np.flatnonzero((rows >= t.rows[0]) & (rows < t.rows[1]))
            r = u.shape[1]
            if not ii.size or not r:
                continue
            ah, al = _two_prod(np.float64(t.strength), np.float64(t.scale))
            sub = max(1.0, abs(float(ah))) * 2.0 ** -1070 * 4 * r  # (2**-1070 * |ah| does not overflow)
            uu, dd = u[rows[ii] - t.rows[0]], d[:, cols[ii]].T  # [n, r] each
            if self._narrow[j]:  # factors of at most 24 bits: every product is exact
                ph = uu * dd
                err = np.zeros(ii.size)
                tiny += sub  # (a product in the subnormal range is not)
            else:
                ph, pl = _two_prod(uu, dd)
                err = pl.sum(axis=1)
                exact[ii] &= ~(pl != 0).any(axis=1)  # (a float64 sum of low parts can be 0 and they not)
            # a product near the subnormal range may have lost bits (and its split, its low part), or all
            exact[ii] &= ~((np.abs(ph) < 2.0 ** -960) & (uu != 0) & (dd != 0)).any(axis=1)
            m = np.abs(ph).sum(axis=1) * (1 + 2.0 ** -40)
            h = ph
            levels = 0
            while h.shape[1] > 1:
                if h.shape[1] % 2:
                    h = np.concatenate([h, np.zeros((h.shape[0], 1))], axis=1)
                h, e2 = _two_sum(h[:, 0::2], h[:, 1::2])
                err += e2.sum(axis=1)
                exact[ii] &= ~(e2 != 0).any(axis=1)
                levels += 1
            exact[ii] &= err == 0  # (then no low part at all: the tree summed without error)
            sh, sl = _two_sum(h[:, 0], err)
            if al == 0:  # strength x scale is a float64: (sh + sl) * ah in double-double, error-free when sl == 0
                xh, xl = _two_prod(sh, ah)
                xl = xl + sl * ah
                exact[ii] &= (sl == 0) & ((sh == 0) | (np.abs(xh) >= 2.0 ** -960))  # (xh == 0 may be an underflow)
            else:
                xh, xl = _dd_mul(sh, sl, ah, al)
                exact[ii] = False
            # hi + lo + xh + xl, error-free where the low parts add without rounding
            s1, e1 = _two_sum(hi[ii], xh)
            t1, te = _two_sum(lo[ii], xl)
            u1, ue = _two_sum(e1, t1)
            exact[ii] &= (te == 0) & (ue == 0)
            hi[ii], lo[ii] = _two_sum(s1, u1 + (ue + te))
            mag[ii] += abs(float(ah)) * m * 2
            units += 2.0 * (r + 1) * (levels + 2) + 16
            tiny += sub + 4 * 2.0 ** -1070
        exact &= np.isfinite(hi) & (np.abs(hi) >= 2.0 ** -960)  # (far from the subnormal range)
        e = units * 2.0 ** -106 * mag + tiny
        return hi, lo, e, exact

    def compare(self, rows: np.ndarray, cols: np.ndarray, base: Callable[[np.ndarray, np.ndarray], np.ndarray],
                t: np.ndarray) -> np.ndarray:
        """sign(exact sum - t) at (rows, cols), as int8 -1 / 0 / 1, for float64 values `t` (what requantizing
        to fp8 needs where the float32 result is exactly a midpoint of its grid). An element no term changes
        compares its base value; the others a float64 sum with the bulk's bound (any summation order), and
        the exact sum where that cannot decide. `base` as for `chunk`. Raises NotFinite."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        t = np.asarray(t, dtype=np.float64)
        out = np.zeros(len(t), dtype=np.int8)
        if not len(t):
            return out
        if not self.finite_inputs or not np.isfinite(t).all():
            raise NotFinite
        b = np.asarray(base(rows, cols), dtype=np.float64)
        free = self._change_free(rows, cols)
        out[free] = np.sign(b[free] - t[free])  # the sign of a float64 difference is exact
        todo = np.flatnonzero(~free)
        if not todo.size:
            return out
        r, c, tt = rows[todo], cols[todo], t[todo]
        v = b[todo].copy()
        for term, u, d in zip(self.terms, self.up_np, self.down_np):
            ii = np.flatnonzero((r >= term.rows[0]) & (r < term.rows[1]))
            if ii.size:
                v[ii] += term.alpha * np.einsum("ij,ji->i", u[r[ii] - term.rows[0]], d[:, c[ii]])
        if not np.isfinite(v).all():
            raise NotFinite
        e = self._bound(v, r, c)
        s = np.where(v - e > tt, 1, np.where(v + e < tt, -1, 0)).astype(np.int8)
        und = np.flatnonzero(s == 0)
        if und.size:  # double-double: sign(hi + lo - t) where the bound of that sum decides
            hi, lo, ed, known = self._dd(r[und], c[und], b[todo[und]])
            d, derr = _two_sum(hi, -tt[und])
            u, ue = _two_sum(derr, lo)
            w, we = _two_sum(d, u)
            # known: hi + lo - t = w + we + ue exactly, a nonoverlapping sum: its sign is the first nonzero's
            exact_sign = np.where(w != 0, np.sign(w), np.where(we != 0, np.sign(we), np.sign(ue)))
            sure = np.abs(w) > ed + 2.0 ** -52 * (np.abs(u) + np.abs(w))
            s[und[sure]] = np.sign(w[sure]).astype(np.int8)
            s[und[known]] = exact_sign[known].astype(np.int8)
        for k in np.flatnonzero(s == 0):
            n, ex = exact_sum(float(b[todo[k]]), self._terms_at(int(r[k]), int(c[k])))
            tn, te = dyadic(float(tt[k]))
            m = min(ex, te)
            diff = (n << (ex - m)) - (tn << (te - m))
            s[k] = (diff > 0) - (diff < 0)
        out[todo] = s
        return out

    def _terms_at(self, row: int, col: int) -> list[tuple[float, float, np.ndarray, np.ndarray]]:
        out = []
        for t, u, d in zip(self.terms, self.up_np, self.down_np):
            if t.rows[0] <= row < t.rows[1]:
                out.append((t.strength, t.scale, u[row - t.rows[0]], d[:, col]))
        return out

    # ------------------------------------------------------------------ float64 outputs

    def _chunk_f64(self, w64: torch.Tensor, r0: int, r1: int, out: torch.Tensor,
                   base: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        """Double-double sums in a fixed order, rounded with a bound, the rest exactly."""
        hi = w64.cpu().numpy().copy()
        lo = np.zeros_like(hi)
        mag = np.abs(hi)  # sum of the magnitudes of everything added (for the bound)
        count = 0
        tiny = 2.0 ** -1070  # absolute: subnormal products and sums, each term's times its strength x scale
        for t, u, d in zip(self.terms, self.up_np, self.down_np):
            a, b = max(r0, t.rows[0]), min(r1, t.rows[1])
            if a >= b:
                continue
            uu = u[a - t.rows[0]:b - t.rows[0]]
            sh, sl = np.zeros((b - a, self.cols)), np.zeros((b - a, self.cols))
            sm = np.zeros((b - a, self.cols))
            for k in range(uu.shape[1]):
                ph, pl = _two_prod(uu[:, k:k + 1], d[k:k + 1, :])
                sh, sl = _dd_add(sh, sl, ph, pl)
                sm += np.abs(ph)
            ah, al = _two_prod(np.float64(t.strength), np.float64(t.scale))
            xh, xl = _dd_mul(sh, sl, ah, al)
            hi[a - r0:b - r0], lo[a - r0:b - r0] = _dd_add(hi[a - r0:b - r0], lo[a - r0:b - r0], xh, xl)
            mag[a - r0:b - r0] += np.abs(float(ah)) * sm * 2
            count += uu.shape[1] + 4
            tiny += max(1.0, abs(float(ah))) * 2.0 ** -1070 * 4 * (uu.shape[1] + 2)
        v = hi + lo
        e = (count + 2) * 8 * 2.0 ** -106 * mag + tiny
        with np.errstate(over="ignore", invalid="ignore"):
            ra = hi + np.nextafter(lo - e, -np.inf)
            rb = hi + np.nextafter(lo + e, np.inf)
        if not (np.isfinite(ra).all() and np.isfinite(rb).all()):
            raise NotFinite
        res = ra.copy()
        todo = np.flatnonzero((ra.view(np.uint64) != rb.view(np.uint64)).reshape(-1))
        if todo.size:
            rr, cc = todo // self.cols + r0, todo % self.cols
            wb = base(rr, cc)
            flat = res.reshape(-1)
            for k, i in enumerate(todo):
                b = round_dyadic(*exact_sum(float(wb[k]), self._terms_at(int(rr[k]), int(cc[k]))), "F64")
                flat[i] = np.array([b], dtype=np.uint64).view(np.float64)[0]
        if not np.isfinite(v).all():
            raise NotFinite
        out.copy_(torch.from_numpy(res))


class Scratch:
    """Reused buffers for the bulk pass (one per worker thread)."""

    def __init__(self) -> None:
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype, device) -> torch.Tensor:
        b = self.bufs.get(name)
        if b is None or b.numel() < n or b.device != torch.device(device):
            b = self.bufs[name] = torch.empty(n, dtype=dtype, device=device)
        return b[:n]


def _norms(x: np.ndarray, axis: int) -> np.ndarray:
    """Upper bounds of the 2-norms of x's rows (axis 1) or columns (axis 0), scaled by each one's largest
    magnitude so that tiny or huge factors neither underflow to 0 nor overflow (a bound of 0 only for an
    all-zero row); inflated past the rounding of the computation."""
    if not x.size:
        return np.zeros(x.shape[1 - axis])
    m = np.abs(x).max(axis=axis)
    safe = np.where(m > 0, m, 1.0)
    y = x / (safe[:, None] if axis == 1 else safe[None, :])
    with np.errstate(over="ignore"):
        return np.where(m > 0, np.sqrt(np.einsum("ij,ij->i" if axis == 1 else "ij,ij->j", y, y)) * m, 0.0) * (1 + 2.0 ** -40)


def _lsb(x: np.ndarray) -> np.ndarray:
    """The exponent of the lowest set bit of each float64 (x = odd integer * 2**lsb), as int64; a large
    value (2**20) for 0 (no bit), so that minima over values skip zeros."""
    x = np.asarray(x, dtype=np.float64)
    m, e = np.frexp(np.abs(x))  # |x| = m * 2**e, 0.5 <= m < 1
    sig = (m * 2.0 ** 53).astype(np.int64)  # the significand as an integer, exactly
    _, le = np.frexp((sig & -sig).astype(np.float64))  # its lowest set bit, 2**(le - 1)
    out = e.astype(np.int64) - 53 + (le.astype(np.int64) - 1)
    out[(x == 0) | ~np.isfinite(x)] = 1 << 20
    return out


def _signed(dtype: str):
    return {"BF16": np.int16, "F16": np.int16, "F32": np.int32, "F64": np.int64}[dtype]


def _f32_bits_ceil(x: float) -> int:
    """The bits of the smallest float32 >= x (x >= 0), as an int (magnitude bits compare like values)."""
    with np.errstate(over="ignore"):  # past float32's range: inf, whose bits compare above every value
        t = np.float32(x)
    if float(t) < x:
        t = np.nextafter(t, np.float32(np.inf))
    return int(np.array(t, dtype=np.float32).view(np.int32))


def _f32_bits_floor(x: float) -> int:
    with np.errstate(over="ignore"):
        t = np.float32(x)
    if float(t) > x:
        t = np.nextafter(t, np.float32(0))
    return int(np.array(t, dtype=np.float32).view(np.int32))


def _f64_bits(x: float) -> int:
    return int(np.array(x, dtype=np.float64).view(np.int64))


# double-double helpers (numpy: every operation rounds once, none is fused, so the results are the same
# on every machine)
_SPLIT = 134217729.0  # 2**27 + 1


def _split(a):
    """(hi, lo), a = hi + lo exactly, each of at most 26 significant bits (Dekker). A value past 2**995,
    whose 2**27 + 1 multiple would overflow, is split scaled down by 2**-54 (exact) and scaled back."""
    s = np.where(np.abs(a) > 2.0 ** 995, 2.0 ** -54, 1.0)
    a_s = a * s
    c = _SPLIT * a_s
    hi = (c - (c - a_s)) / s
    return hi, a - hi


def _two_prod(a, b):
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _dd_add(ah, al, bh, bl):
    s = ah + bh
    bb = s - ah
    e = (ah - (s - bb)) + (bh - bb)
    e = e + al + bl
    h = s + e
    return h, e - (h - s)


def _two_sum(a, b):
    """(s, e) with s = fl(a + b) and s + e == a + b exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _round_dd(hi: np.ndarray, lo: np.ndarray, dtype: str) -> np.ndarray:
    """Bits of the double-double value hi + lo (normalized: |lo| <= ulp(hi) / 2) rounded to nearest even in
    `dtype` (BF16, F16, F32), exactly: it rounds as hi does unless hi is itself a midpoint of the grid,
    where lo's sign decides (lo can move hi by half a float64 ulp at most, and any other midpoint is at
    least one float64 ulp away)."""
    f = FMTS[dtype]
    hi = np.where((hi == 0) & (lo == 0), 0.0, hi)  # an exact zero is +0
    bits = round_f64(hi, dtype).astype(np.int64)
    sign = bits & (1 << (f.bits - 1))
    mag = bits ^ sign
    a = np.abs(hi)
    r = from_bits(mag.astype(f.np_uint), dtype)
    other = np.where(a > r, mag + 1, np.where(a < r, mag - 1, mag))
    o = from_bits(np.clip(other, 0, None).astype(f.np_uint), dtype)
    below, above = np.minimum(r, o), np.maximum(r, o)
    with np.errstate(over="ignore", invalid="ignore"):  # past the largest value: its half ulp, not (max + inf) / 2
        mid = np.where(np.isinf(above), below + math.ldexp(1.0, f.emax - f.p), (below + above) / 2)
    at_mid = (a != r) & (a == mid) & (lo != 0)
    away = (lo > 0) == (hi > 0)  # lo moves the value away from zero
    new = np.where(at_mid, np.where(away, np.maximum(mag, other), np.minimum(mag, other)), mag)
    return (new | sign).astype(f.np_uint)


def _dd_mul(ah, al, bh, bl):
    p, e = _two_prod(ah, bh)
    e = e + (ah * bl + al * bh)
    h = p + e
    return h, e - (h - p)


__all__ = ["ExactMerge", "Term", "NotFinite", "Scratch", "round_dyadic", "round_f64", "exact_sum", "FMTS"]
