"""fp8 "scaled" weights: the formats, the scale layouts a checkpoint may hold, the scan that validates
them, and the requantizer (round to nearest even, a fresh power-of-two scale).

ComfyUI's convention, which ComfyUI-WanVideoWrapper follows: a quantized Linear `<m>` is stored as
`<m>.weight` in float8_e4m3fn or float8_e5m2 (safetensors F8_E4M3 / F8_E5M2) with `<m>.scale_weight`
(or `<m>.weight_scale`, which the wrapper renames) beside it, and a marker tensor `scaled_fp8`; the
weight it stands for is `weight * scale`, the scale broadcast over blocks. `scan` reads what a file holds:

- one scale per tensor: shape `()`, `[1]` or `[1, 1]` (ComfyUI's and the wrapper's only working form);
- one per row: `[out]` or `[out, 1]`;
- one per block: `[out / bo, in / bi]` for blocks of `bo` rows by `bi` columns dividing the weight.

Anything else is refused with a line naming the tensor, and so is an fp8 weight without a scale, a scale
that is zero, negative or not finite, a scale without an fp8 weight, or a weight with two scales.

**Requantizing** (`Requantizer`) a merged weight `W'` (each element the exact `dequant(W) + sum s*dW`
correctly rounded to float32, exact.py) keeps the scale's shape and dtype and chooses each new scale as
the power of two `2**k` with the smallest k such that the block's largest |W'| is at most the format's
largest value (448 for e4m3fn, 57344 for e5m2); a block of zeros gets 1. A power of two is exact in every
dtype the scale may be stored or used in (the wrapper rounds scales to its base dtype, bf16, at load:
a power of two survives that unchanged, absmax / 448 in general does not), multiplying by it is exact,
and each element's code is then the exact merged value divided by the scale, rounded to nearest with
ties to even: correctly rounded from the exact value, not from its float32 rounding (an element whose
float32 value is exactly a midpoint of the fp8 grid, so that rounding twice could go the wrong way, is
decided against the exact sum). Nothing is clipped: the largest element fits by construction, and a
block whose scale the stored dtype cannot hold, or whose values are too small for the rule
(largest |W'| below 448 * 2**-126), is an error naming the tensor. The cost against `absmax / 448`: up
to one binade of range at the small end (an element's relative precision does not depend on the scale
in a floating-point format, only where the subnormals begin).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import LoraError

if TYPE_CHECKING:
    from .base_checkpoint import Base

MARKER = "scaled_fp8"  # ComfyUI's marker tensor of a scaled fp8 checkpoint (its dtype names the format)
SCALE_NAMES = (".scale_weight", ".weight_scale")  # the wrapper renames .weight_scale to .scale_weight
INPUT_SCALES = (".scale_input", ".input_scale")  # activation scales (ComfyUI core's fp8 matmul); no weight's
SCALE_DTYPES = ("F32", "BF16", "F16", "F64")


@dataclass(frozen=True)
class Fp8Format:
    """An fp8 format: p significant bits (the implicit one included), smallest normal exponent, bias, the
    largest finite value and its code (magnitude bits)."""

    dtype: str  # safetensors name
    name: str  # torch / ComfyUI name
    p: int
    emin: int
    bias: int
    max: float
    max_code: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.name)

    @property
    def values(self) -> np.ndarray:
        """The value of every magnitude code 0..max_code, as float64 (exact)."""
        out = np.zeros(self.max_code + 1)
        for c in range(self.max_code + 1):
            e, m = c >> (self.p - 1), c & ((1 << (self.p - 1)) - 1)
            out[c] = math.ldexp(m, self.emin - self.p + 1) if e == 0 else \
                math.ldexp((1 << (self.p - 1)) + m, e - self.bias - self.p + 1)
        return out


E4M3 = Fp8Format("F8_E4M3", "float8_e4m3fn", 4, -6, 7, 448.0, 0x7E)  # no infinities; 0x7F is NaN
E5M2 = Fp8Format("F8_E5M2", "float8_e5m2", 3, -14, 15, 57344.0, 0x7B)  # IEEE-like: 0x7C is infinity
FORMATS = {f.dtype: f for f in (E4M3, E5M2)}
# Powers of two each scale dtype holds exactly (its subnormals included)
POW2_RANGE = {"F32": (-149, 127), "BF16": (-133, 127), "F16": (-24, 15), "F64": (-1074, 1023)}
K_MIN = -126  # smallest scale exponent the requantizer uses (exactness of its float32 arithmetic)


@dataclass(frozen=True)
class ScaleLayout:
    """How a scale tensor of stored shape `shape` covers a [rows, cols] weight: one scale per block of
    `bo` rows by `bi` columns, `nr` x `nc` blocks."""

    rows: int
    cols: int
    bo: int
    bi: int
    shape: tuple[int, ...]

    @property
    def nr(self) -> int:
        return self.rows // self.bo

    @property
    def nc(self) -> int:
        return self.cols // self.bi

    def describe(self) -> str:
        if self.nr == 1 and self.nc == 1:
            return "one scale per tensor"
        if self.bo == 1 and self.nc == 1:
            return "one scale per row"
        return f"one scale per {self.bo}x{self.bi} block"

    def expand(self, s: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """[nr, nc] per-block values -> [r1 - r0, nc, 1] for rows r0:r1, to broadcast over a weight's rows
        viewed as [rows, nc, bi]."""
        idx = torch.arange(r0, r1, device=s.device) // self.bo
        return s[idx].unsqueeze(2)


def layout_of(wshape: tuple[int, ...], sshape: tuple[int, ...]) -> ScaleLayout | None:
    """The layout of a scale of shape `sshape` for a 2-D weight, or None if it is not one we read."""
    rows, cols = wshape
    if rows == 0 or cols == 0:
        return None
    if math.prod(sshape) == 1 and len(sshape) <= 2:
        return ScaleLayout(rows, cols, rows, cols, sshape)
    if sshape == (rows,):
        return ScaleLayout(rows, cols, 1, cols, sshape)
    if len(sshape) == 2 and 0 < sshape[0] and 0 < sshape[1] and rows % sshape[0] == 0 and cols % sshape[1] == 0:
        return ScaleLayout(rows, cols, rows // sshape[0], cols // sshape[1], sshape)
    return None


@dataclass(frozen=True)
class Fp8Layer:
    """One scaled fp8 weight `<name>.weight` of a base checkpoint and its scale."""

    name: str  # the layer (module path)
    fmt: Fp8Format
    shape: tuple[int, int]
    w_shard: str
    scale: str  # the scale tensor's full name
    s_shard: str
    s_dtype: str
    layout: ScaleLayout

    @property
    def weight(self) -> str:
        return self.name + ".weight"


@dataclass(frozen=True)
class Fp8Scan:
    """What a checkpoint holds of the scaled fp8 scheme."""

    layers: dict[str, Fp8Layer]  # layer -> its fp8 weight and scale
    marker: str | None  # the `scaled_fp8` marker's name (a ComfyUI prefix included), if present
    input_scales: tuple[str, ...]  # activation scales (kept, or dropped with the scheme)

    def scheme_tensors(self) -> set[str]:
        """Tensors that belong to the scheme itself: the scales, the marker, the activation scales."""
        out = {x.scale for x in self.layers.values()} | set(self.input_scales)
        if self.marker:
            out.add(self.marker)
        return out


def scan(b: Base) -> Fp8Scan | None:
    """The scaled fp8 weights of a base checkpoint, validated; None when it holds no fp8 tensor, scale or
    marker. Every scale is read (small) and checked positive and finite before anything is written."""
    def where(t: str) -> str:
        return b.shards[b.tensors[t]].path

    markers = [t for t in b.tensors if t == MARKER or t.endswith("." + MARKER)]
    marker = markers[0] if markers else None
    fp8 = [t for t in b.tensors if t not in markers and b.shards[b.tensors[t]].info(t).dtype in FORMATS]
    scales = [t for t in b.tensors if t.endswith(SCALE_NAMES)]
    if not fp8 and not marker and not any(t.endswith(".scale_weight") for t in scales):
        return None  # (a `.weight_scale` alone is the INT8 layout's)
    layers: dict[str, Fp8Layer] = {}
    for t in sorted(fp8):
        info = b.shards[b.tensors[t]].info(t)
        if not t.endswith(".weight") or len(info.shape) != 2:
            raise LoraError(f"{where(t)}: tensor {t!r} is {info.dtype} {list(info.shape)}; an fp8 tensor must be a "
                            f"2-D Linear weight (<module>.weight) with a scale beside it")
        m = t[:-len(".weight")]
        found = [m + s for s in SCALE_NAMES if m + s in b.tensors]
        if not found:
            raise LoraError(f"{where(t)}: fp8 weight {t!r} has no scale ({m + '.scale_weight'!r} or "
                            f"{m + '.weight_scale'!r}); refusing to guess one")
        if len(found) > 1:
            raise LoraError(f"{where(t)}: fp8 weight {t!r} has two scales, {found[0]!r} and {found[1]!r}")
        s = found[0]
        sf = b.shards[b.tensors[s]]
        sinfo = sf.info(s)
        lay = layout_of(info.shape, sinfo.shape)  # type: ignore[arg-type]
        if sinfo.dtype not in SCALE_DTYPES or lay is None:
            raise LoraError(f"{sf.path}: scale {s!r} is {sinfo.dtype} {list(sinfo.shape)}; for the fp8 weight {t!r} "
                            f"{list(info.shape)} it must be a float tensor of shape [], [1], [1, 1] (per tensor), "
                            f"[{info.shape[0]}] or [{info.shape[0]}, 1] (per row), or [out/bo, in/bi] (per block)")
        values = sf.read(s).double().reshape(-1)
        if sinfo.dtype == "F64":  # an fp8 value (at most 4 bits) times the scale must be exact in float64
            from .exact import _lsb

            v = values.numpy()
            _, e = np.frexp(v)
            wide = np.flatnonzero(np.isfinite(v) & (v > 0) & ((e.astype(np.int64) - 1) - _lsb(v) + 1 > 49))
            if wide.size:
                at = f"element {int(wide[0])} " if values.numel() > 1 else ""
                raise LoraError(f"{sf.path}: scale {s!r} {at}is {float(v[wide[0]])!r}, a float64 with more than 49 "
                                f"significant bits: its products with fp8 values are not exact in float64")
        bad = ~(torch.isfinite(values) & (values > 0))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            at = f"element {i} " if values.numel() > 1 else ""
            raise LoraError(f"{sf.path}: scale {s!r} {at}is {float(values[i])!r}; every scale must be positive "
                            f"and finite")
        layers[m] = Fp8Layer(m, FORMATS[info.dtype], info.shape, b.tensors[t], s, b.tensors[s],  # type: ignore[arg-type]
                             sinfo.dtype, lay)
    for s in scales:
        m = s[:-len(".scale_weight")] if s.endswith(".scale_weight") else s[:-len(".weight_scale")]
        if m not in layers and not (s.endswith(".weight_scale") and m + ".weight_int8" in b.tensors):
            w = m + ".weight"
            what = f"its weight {w!r} is {b.shards[b.tensors[w]].info(w).dtype}" if w in b.tensors else f"there is no {w!r}"
            raise LoraError(f"{where(s)}: scale {s!r} belongs to no fp8 weight ({what}); refusing a scaled weight "
                            f"that is not fp8")
    inputs = tuple(sorted(t for t in b.tensors if t.endswith(INPUT_SCALES)))
    return Fp8Scan(layers, marker, inputs)


# ----------------------------------------------------------------------------- requantizing


def pow2(k: np.ndarray | torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """2**k exactly, k integers within the normal range of `dtype` (float32 or float64), built from bits."""
    k = torch.as_tensor(k, dtype=torch.int64)
    if dtype == torch.float64:
        return ((k + 1023) << 52).view(torch.float64)
    return ((k + 127) << 23).to(torch.int32).view(torch.float32)


def scale_exponent(amax: np.ndarray, fmt: Fp8Format) -> np.ndarray:
    """Per block, the smallest integer k with amax <= fmt.max * 2**k (0 where amax is 0), exactly."""
    m, e = np.frexp(amax)  # amax = m * 2**e, 0.5 <= m < 1
    fm, fe = math.frexp(fmt.max)
    k = e - fe + (m > fm)
    return np.where(amax == 0, 0, k).astype(np.int64)


@dataclass(frozen=True)
class Rounded:
    """One chunk quantized: magnitude codes rounded to nearest even, and what the tie decisions need."""

    code: torch.Tensor  # int32 magnitude codes (RNE)
    floor: torch.Tensor  # int32 codes of the value truncated toward zero
    tie: torch.Tensor  # bool: the value was exactly halfway between floor and floor + 1
    sub: torch.Tensor  # bool: below the smallest normal value (the subnormal grid)
    steps: float  # the largest |rounded - value|, in units of the fp8 step there


def round_fp8(y: torch.Tensor, fmt: Fp8Format, below: float = 0.0) -> Rounded:
    """Round float32 values `y` (their magnitudes) to `fmt` with round to nearest, ties to even, exactly:
    integer operations on the float32 bits (the few values in the subnormal range through an exact
    power-of-two scaling). Values past the format's range are the caller's to refuse. `sub` marks the
    values below the smallest normal one, or below `below` if that is larger (what the caller decides
    otherwise)."""
    a = y.view(torch.int32) & 0x7FFFFFFF
    sh = 23 - (fmt.p - 1)  # float32 fraction bits below the format's
    half = 1 << (sh - 1)
    off = (127 - fmt.bias) << (fmt.p - 1)
    hi = a >> sh
    code = ((a + (half - 1)).add_(hi & 1) >> sh).sub_(off)  # to nearest, ties to the even last bit
    floor = hi.sub_(off)  # exponent and fraction bits, truncated
    rem = a.bitwise_and_((1 << sh) - 1)
    tie = rem == half
    steps = float(rem.sub_((code - floor) << sh).abs_().max()) / (1 << sh) if rem.numel() else 0.0
    lim = max(2.0 ** fmt.emin, below)
    sub = y.abs() < lim
    idx = sub.view(-1).nonzero().view(-1)
    if idx.numel():  # multiples of 2**(emin - p + 1): a power-of-two scaling of float32 values, exact
        t = y.view(-1)[idx].abs()
        small = t < 2.0 ** fmt.emin
        t = t * float(2.0 ** (fmt.p - 1 - fmt.emin))
        tf = t.floor()
        fr = t - tf
        fi = tf.to(torch.int32)
        up = (fr > 0.5) | ((fr == 0.5) & ((fi & 1) == 1))
        j = idx[small]
        code.view(-1)[j] = (fi + up.to(torch.int32))[small]
        floor.view(-1)[j] = fi[small]
        tie.view(-1)[j] = (fr == 0.5)[small]
        if bool(small.any()):
            steps = max(steps, float(torch.where(up, 1 - fr, fr)[small].max()))
    return Rounded(code, floor, tie, sub, steps)


class Exact:
    """What the requantizer asks of the exact merged values `x` (exact.ExactMerge, through merge_compute):
    `f32(rows, cols, w)`: x correctly rounded to float32 (float64 values), given float32 approximations w
    from `sums` rounded once; `sign(rows, cols, t)`: sign(x - t); `margin(a)`: a bound of |v - x| for any
    float64 sum v with |v| <= a; `small(r0, r1)`: |value| below which, in rows r0:r1, that bound may reach
    2**-25 of the value (there a float32 approximation no longer tells which side of a grid point x is)."""

    def f32(self, rows: np.ndarray, cols: np.ndarray, w: np.ndarray) -> np.ndarray: ...

    def sign(self, rows: np.ndarray, cols: np.ndarray, t: np.ndarray) -> np.ndarray: ...

    def margin(self, a: float) -> float: ...

    def small(self, r0: int, r1: int) -> float: ...


class Requantizer:
    """A merged weight to fp8 codes and fresh power-of-two scales of the layout `layout` (module docstring).

    Its input is the float64 sums of exact.ExactMerge (any BLAS, any order) rounded once to float32, `w`,
    row chunk by row chunk: `observe` every chunk (any order, any thread), then `finish` (the scales), then
    `quantize` every chunk; `report()` gives the requantization error. The bytes depend only on the exact
    values x: each scale comes from the largest |x| correctly rounded to float32 (the few elements that
    may be a block's largest are rounded exactly, `Exact.f32`), and each code is x / scale rounded to
    nearest even, which `w` decides wherever it lies more than one float32 step from a midpoint of the fp8
    grid and the sums' bound is below half a step (a value sitting exactly on a midpoint, values near zero,
    fp8 subnormals: decided by `Exact.sign` against the midpoint)."""

    def __init__(self, fmt: Fp8Format, layout: ScaleLayout, scale_dtype: str, where: str):
        self.fmt, self.layout, self.scale_dtype, self.where = fmt, layout, scale_dtype, where
        self.amax = np.zeros((layout.nr, layout.nc))
        self.k: np.ndarray | None = None
        self.lock = threading.Lock()
        self.err2 = self.ref2 = self.steps = 0.0
        self.values = torch.from_numpy(fmt.values)

    def chunk_rows(self, step: int) -> int:
        """A chunk height near `step` rows that keeps whole row blocks in a chunk (when blocks are shorter)."""
        bo = self.layout.bo
        return max(bo, step // bo * bo) if bo <= step else step

    def observe(self, w: torch.Tensor, r0: int, r1: int) -> None:
        """Take the block maxima of |w| over rows r0:r1 (float32 [r1 - r0, cols])."""
        lay = self.layout
        rowmax = w.abs().view(r1 - r0, lay.nc, lay.bi).amax(2).double().numpy()  # [rows, nc]
        blocks = np.arange(r0, r1) // lay.bo
        starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
        m = np.maximum.reduceat(rowmax, starts, axis=0)
        with self.lock:
            ids = blocks[starts]
            self.amax[ids] = np.maximum(self.amax[ids], m)

    def finish(self, w: torch.Tensor, exact: Exact) -> np.ndarray:
        """The new scales (float64 [nr, nc]) from the whole float32 weight `w` [rows, cols]; raises naming the
        tensor where a block's scale cannot be held."""
        lay = self.layout
        if not np.isfinite(self.amax).all():
            raise LoraError(f"{self.where}: merging gives non-finite values")
        # the elements that may be their block's largest |x|: within two float32 steps and twice the sums'
        # bound of the largest |w|; their exact values rounded to float32 give the block's largest
        margin = np.vectorize(exact.margin)(self.amax * (1 + 2.0 ** -22))
        thr = torch.from_numpy(self.amax * (1 - 2.0 ** -21) - 2 * margin - 2.0 ** -148)
        cand = (w.abs().view(lay.nr, lay.bo, lay.nc, lay.bi) >= thr.view(lay.nr, 1, lay.nc, 1).float()).view(-1)
        flat = cand.nonzero().view(-1)
        rows, cols = (flat // lay.cols).numpy(), (flat % lay.cols).numpy()
        x32 = np.abs(exact.f32(rows, cols, w.view(-1)[flat].double().numpy()))
        amax = np.zeros_like(self.amax)
        np.maximum.at(amax, (rows // lay.bo, cols // lay.bi), x32)
        k = scale_exponent(amax, self.fmt)
        lo, hi = POW2_RANGE[self.scale_dtype]
        bad = (k < max(lo, K_MIN)) | (k > min(hi, 126))
        if bad.any():
            i = tuple(int(x) for x in np.argwhere(bad)[0])
            a = float(amax[i])
            why = (f"a scale of 2**{int(k[i])} is outside what {self.scale_dtype} holds exactly" if (k[i] < lo or k[i] > hi)
                   else f"its values are too small to requantize (largest |value| {a!r}, below {self.fmt.max} * 2**{K_MIN})")
            at = "" if amax.size == 1 else f" block {list(i)}"
            raise LoraError(f"{self.where}{at}: {why}")
        self.k = k
        return np.ldexp(1.0, k)

    def quantize(self, w: torch.Tensor, r0: int, r1: int, out: torch.Tensor, exact: Exact) -> None:
        """Codes of rows r0:r1 into `out` (uint8 [r1 - r0, cols]), from their float32 values `w`."""
        assert self.k is not None
        lay, fmt = self.layout, self.fmt
        n = r1 - r0
        kb = torch.from_numpy(self.k)
        k = lay.expand(kb, r0, r1)  # [n, nc, 1]
        if kb.numel() == 1:
            y = w * float(2.0 ** -int(kb.reshape(())))  # exact (tiny values aside: they round to 0)
        else:
            y = (w.view(n, lay.nc, lay.bi) * pow2(-k)).view(n, lay.cols)
        small = exact.small(r0, r1)
        per_tensor = kb.numel() == 1
        # undecided by w: on a midpoint, on the subnormal grid, or near zero (the sums' bound is not small
        # against a float32 step there: |w| < small, in units of the scale for one scale per tensor)
        q = round_fp8(y, fmt, small * float(2.0 ** -int(kb.reshape(()))) if per_tensor else 0.0)
        code = q.code
        flag = q.tie | q.sub if per_tensor else q.tie | q.sub | (w.abs() < small)
        flat = flag.view(-1).nonzero().view(-1)
        sign = (y.view(torch.int32) >> 24) & 0x80
        if flat.numel():
            rows, cols = (flat // lay.cols + r0).numpy(), (flat % lay.cols).numpy()
            fl = q.floor.view(-1)[flat]  # |y| truncated: x rounds to fl or fl + 1 (x lies far closer to y than a step)
            kk = kb[torch.from_numpy(rows // lay.bo), torch.from_numpy(cols // lay.bi)]
            mid = (self.values[fl.long()] + self.values[(fl + 1).clamp(max=fmt.max_code).long()]) / 2
            ng = sign.view(-1)[flat] != 0
            t = torch.where(ng, -mid, mid) * pow2(kk, torch.float64)
            s = torch.from_numpy(exact.sign(rows, cols, t.numpy()).astype(np.int64))
            away = torch.where(ng, s < 0, s > 0)  # x lies beyond the midpoint, away from zero
            new = torch.where(s == 0, fl + (fl & 1), fl + away.to(torch.int32))
            if bool((new == 0).any()):  # a zero code takes the exact value's sign (an exact zero is +0)
                z = torch.from_numpy(exact.sign(rows, cols, np.zeros(len(rows))).astype(np.int64))
                ng = torch.where(new == 0, z < 0, ng)
            code.view(-1)[flat] = new
            sign.view(-1)[flat] = ng.to(torch.int32) << 7
        if code.numel() and int(code.max()) > fmt.max_code:
            raise LoraError(f"{self.where}: a value past {fmt.max} after scaling (internal: the scale rule failed)")
        out.copy_(code | sign)
        # the error against the float32 merged weight, |dequant - w|: relative (Frobenius) and in steps.
        # Codes back to float32 by their bits (exact), the subnormal ones (only where flagged) by their multiple
        sh = 23 - (fmt.p - 1)
        deq = ((code + ((127 - fmt.bias) << (fmt.p - 1))) << sh).view(torch.float32)
        if flat.numel():
            low = flat[code.view(-1)[flat] < (1 << (fmt.p - 1))]
            deq.view(-1)[low] = code.view(-1)[low].to(torch.float32) * float(2.0 ** (fmt.emin - fmt.p + 1))
        err = deq.sub_(y.abs())  # in units of the scale: exact (Sterbenz), or nearly
        if per_tensor:
            e2 = float(torch.linalg.vector_norm(err.view(-1), dtype=torch.float64) ** 2) * 4.0 ** int(kb.reshape(()))
        else:
            e2 = torch.sum((err * err).view(n, lay.nc, lay.bi), dim=2, dtype=torch.float64)  # [n, nc]
            e2 = float((e2 * pow2(2 * k.view(n, lay.nc), torch.float64)).sum())
        r2 = float(torch.linalg.vector_norm(w.view(-1), dtype=torch.float64) ** 2)
        with self.lock:
            self.err2 += e2
            self.ref2 += r2
            self.steps = max(self.steps, q.steps)

    def report(self) -> tuple[float, float]:
        """(relative Frobenius error, worst element error in fp8 steps)."""
        rel = (self.err2 ** 0.5 / self.ref2 ** 0.5) if self.ref2 else (0.0 if self.err2 == 0 else math.inf)
        return rel, self.steps

    def scale_bytes(self) -> np.ndarray:
        """The new scales stored in the scale's dtype and shape, as bytes."""
        from ..io.dtypes import torch_dtype

        assert self.k is not None
        s = torch.from_numpy(np.ldexp(1.0, self.k)).to(torch_dtype(self.scale_dtype))  # exact: powers of two
        return s.reshape(-1).contiguous().view(torch.uint8).numpy()


__all__ = ["MARKER", "SCALE_NAMES", "Fp8Format", "E4M3", "E5M2", "FORMATS", "ScaleLayout", "layout_of",
           "Fp8Layer", "Fp8Scan", "scan", "Exact", "Requantizer", "round_fp8", "scale_exponent", "pow2"]
