"""The arithmetic of a checkpoint merge, as pipeline stages: `W' = W + sum strength * scale * up @ down`.

Every merged element is the correctly rounded value of that exact sum (exact.py), so the bytes depend
only on the inputs: not on the CPU, the BLAS, threads, chunk workers, chunk size or device. Two
implementations of `pipeline.Stages` over the same `Job`s:

- `CpuStages`: row chunks of a few MiB, so each chunk is converted to float64, summed (one in-place
  addmm per LoRA part), rounded and checked while it sits in cache.
- `DeviceStages` (`device="cuda"`): pinned host staging buffers; host-to-device copies on a copy stream,
  the float64 sums and the rounding on a compute stream (the few elements the bulk cannot decide are
  decided on the host), device-to-host copies on a third stream, ordered by CUDA events, so only
  output-dtype bytes come back. Every buffer is allocated once at the largest job's size, one per
  pipeline slot, so copies of one job overlap the compute of another. With `device="cpu"` the same code
  runs without streams (what the CPU-only tests exercise).

A job reads its base weight as stored (a float tensor, or a row range of one: the q rows of a fused
qkv for a split output), or as a quantized weight with its scales (a scaled fp8 weight, an INT8 one),
whose exact values `stored * scale` are formed in float64. It writes the output dtype, or fp8 with fresh
scales (fp8.py: the merged weight correctly rounded to float32 first, then the codes and power-of-two
scales from it, ties decided against the exact sum).

A merge never writes Inf/NaN: a value the output dtype cannot hold is an error naming the tensor.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import LoraError, Param
from ..io.direct import ALIGN
from ..io.dtypes import ITEMSIZE, torch_dtype
from ..io.reader import SafeFile
from ..threads import single_threaded
from .exact import ExactMerge, NotFinite, Scratch, Term, from_bits
from .fp8 import Exact, Fp8Format, Requantizer, ScaleLayout
from .targets import Target

CHUNK_ELEMENTS = 1 << 19  # float64 elements per row chunk of a merged weight on the CPU (4 MiB)
# `device="auto"` takes CUDA when the LoRA products are at least this many GFLOP. Below it, starting
# CUDA (context and cuBLAS, about 0.5 s) costs more than the CPU spends on them: the issue-12 H100 host
# merged 272 GFLOP on 16 cores at about 150 GFLOP/s effective, so the break-even is near 75 GFLOP; one
# full-width block of a rank-128 refinement LoRA is about 68 GFLOP.
AUTO_CUDA_GFLOP = 128.0


# every fp8 code's value as float64 (NaN where the format has one), for dequantizing on the CPU
_FP8_TABLES = {dt: torch.arange(256, dtype=torch.uint8).view(dt).to(torch.float64)
               for dt in (torch.float8_e4m3fn, torch.float8_e5m2)}


@dataclass(frozen=True)
class Scaled:
    """The scales of a quantized stored weight (fp8 or INT8): tensor `name` of `sf` (rows `rows` of it, for
    per-row scales of a row range), covering the job's rows as `layout` says."""

    sf: SafeFile
    name: str
    layout: ScaleLayout
    rows: tuple[int, int] | None = None

    def values(self) -> torch.Tensor:
        """The scales as float64 [nr, nc] (exact)."""
        return self.sf.read(self.name, self.rows).double().reshape(self.layout.nr, self.layout.nc)


@dataclass(frozen=True)
class Fp8Out:
    """Requantize the merged weight to `fmt` with fresh scales of `layout`, stored as `scale_dtype`."""

    fmt: Fp8Format
    layout: ScaleLayout
    scale_dtype: str


@dataclass(frozen=True)
class Job:
    """One adapted weight: `adds` (target, strength) folded into tensor `name` of `sf` (rows `rows` of it,
    all when None; scaled by `scale` when it is quantized), written as `out_dtype` (fp8 with fresh scales
    when `fp8` is set; only those scales when `scale_only`). `result` receives an fp8 job's new scale bytes
    ("scale") and its requantization error ("report": relative, steps)."""

    sf: SafeFile
    name: str
    adds: tuple[tuple[Target, float], ...]
    out_dtype: str
    out_offset: int | None = None  # where its bytes start in the output file, when known (alignment)
    rows: tuple[int, int] | None = None
    scale: Scaled | None = None
    fp8: Fp8Out | None = None
    scale_only: bool = False
    label: str = ""  # the output tensor's name, for messages (default: `name`)
    result: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.sf.info(self.name).shape
        if self.rows is not None:
            rows = self.rows[1] - self.rows[0]
        return rows, cols

    @property
    def stored_dtype(self) -> str:
        return self.sf.info(self.name).dtype

    @property
    def in_bytes(self) -> int:
        return self.sf.byte_range(self.name, self.rows)[1]

    @property
    def out_bytes(self) -> int:
        if self.scale_only:
            assert self.fp8 is not None
            return self.fp8.layout.nr * self.fp8.layout.nc * ITEMSIZE[self.fp8.scale_dtype]
        rows, cols = self.shape
        return rows * cols * ITEMSIZE[self.out_dtype]

    @property
    def merge_dtype(self) -> str:
        """The dtype the merged weight is correctly rounded to: the output's, float32 before fp8."""
        return "F32" if self.fp8 is not None else self.out_dtype

    @property
    def where(self) -> str:
        return f"{self.sf.path}: {self.label or self.name!r}"

    def terms(self, device: torch.device | str = "cpu", pin: bool = False) -> list[Term]:
        """Every LoRA part on this weight as an exact float64 `Term` (rows relative to the weight)."""
        out = []
        for t, strength in self.adds:
            for p in t.parts():
                if not math.isfinite(p.scale * strength):
                    raise LoraError(f"{self.sf.path}: {self.name!r}: strength x scale = {p.scale * strength} is not "
                                    f"finite (strength {strength}, LoRA scale {p.scale})")
                up, down = p.up.load().double(), p.down.load().double()
                if pin:
                    up, down = up.pin_memory(), down.pin_memory()
                out.append(Term(p.rows, up.to(device, non_blocking=pin), down.to(device, non_blocking=pin),
                                strength, p.scale))
        return out

    def read_into(self, raw: torch.Tensor) -> None:
        """Read the job's stored bytes (its rows) into the start of `raw` (uint8)."""
        buf = memoryview(raw[:self.in_bytes].numpy())
        if self.rows is None:
            self.sf.read_into(self.name, buf)
        else:
            self.sf.read_into(self.name, buf, self.rows)

    def stored(self, raw: torch.Tensor) -> torch.Tensor:
        """The job's stored values [rows, cols] in their dtype, viewing its raw bytes `raw`."""
        rows, cols = self.shape
        return raw[:self.in_bytes].view(torch_dtype(self.stored_dtype)).view(rows, cols)

    def base_values(self, raw: torch.Tensor, scales: torch.Tensor | None = None
                    ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """Exact base values at (rows, cols), as float64, from the job's stored bytes `raw` and its scales
        (float64 [nr, nc], for a quantized weight) on the host. A scaled value is exact: an fp8 or int8
        value (at most 8 bits) times a scale (at most 53) has at most 61, and a power of two aside from
        that, fits float64 unless the scale itself is below 2**-1000."""
        w = self.stored(raw)
        if scales is None:
            return lambda r, c: w[torch.from_numpy(r), torch.from_numpy(c)].double().numpy()
        lay = self.scale.layout  # type: ignore[union-attr]

        def values(r: np.ndarray, c: np.ndarray) -> np.ndarray:
            rr, cc = torch.from_numpy(r), torch.from_numpy(c)
            return (w[rr, cc].double() * scales[rr // lay.bo, cc // lay.bi]).numpy()

        return values

    def dequantize_into(self, w64: torch.Tensor, src: torch.Tensor, scales: torch.Tensor | None, r0: int, r1: int) -> None:
        """Rows r0:r1 of the exact base weight into `w64` (float64 [r1 - r0, cols]): the stored values,
        times their scales for a quantized weight."""
        if src.dtype in _FP8_TABLES and w64.device.type == "cpu":  # a table lookup: 3-4x torch's own cast here
            torch.index_select(_FP8_TABLES[src.dtype], 0, src[r0:r1].reshape(-1).view(torch.uint8).to(torch.int32),
                               out=w64.view(-1))
        else:
            w64.copy_(src[r0:r1])
        if scales is not None:
            lay = self.scale.layout  # type: ignore[union-attr]
            w64.view(r1 - r0, lay.nc, lay.bi).mul_(lay.expand(scales, r0, r1))

    def nonfinite_error(self) -> LoraError:
        """The error for a merged value the output dtype cannot hold (or NaN/Inf in the inputs)."""
        dt = self.fp8.fmt.name if self.fp8 is not None else self.out_dtype
        return LoraError(f"{self.sf.path}: merging gives non-finite values in {self.label or self.name!r} (as {dt})")

    def requantizer(self) -> Requantizer | None:
        if self.fp8 is None:
            return None
        return Requantizer(self.fp8.fmt, self.fp8.layout, self.fp8.scale_dtype, self.where)

    def requantized(self, rq: Requantizer) -> None:
        """Record an fp8 job's new scales (bytes) and error in `result`; a scale-only job must agree with the
        weight job that computes the same layer again."""
        scale = rq.scale_bytes()
        before = self.result.get("scale")
        if before is not None and not np.array_equal(before, scale):
            raise RuntimeError(f"{self.where}: recomputing the merged weight gave other scales (non-deterministic "
                               f"arithmetic on this device)")
        self.result["scale"] = scale
        if not self.scale_only:
            self.result["report"] = rq.report()


class _ExactView(Exact):
    """The exact merged values of one job as fp8.py's requantizer asks for them (fp8.Exact)."""

    def __init__(self, merge: ExactMerge, base: Callable[[np.ndarray, np.ndarray], np.ndarray], job: Job):
        self.merge, self.base, self.job = merge, base, job

    def f32(self, rows: np.ndarray, cols: np.ndarray, w: np.ndarray) -> np.ndarray:
        a = np.abs(w)
        # |x - w| <= |x - v| + |v - w|: the sums' bound, and a float32 step
        err = np.spacing(a.astype(np.float32)).astype(np.float64) + self.merge.bound(a * (1 + 2.0 ** -22), rows, cols)
        try:
            return from_bits(self.merge.decide(w, rows, cols, self.base, err), "F32")
        except NotFinite:
            raise self.job.nonfinite_error() from None

    def sign(self, rows: np.ndarray, cols: np.ndarray, t: np.ndarray) -> np.ndarray:
        try:
            return self.merge.compare(rows, cols, self.base, t)
        except NotFinite:
            raise self.job.nonfinite_error() from None

    def margin(self, a: float) -> float:
        return self.merge.max_bound(a)

    def small(self, r0: int, r1: int) -> float:
        return max(self.merge.low_threshold(r0, r1, 2.0 ** -25), 2.0 ** -126)


def gflop(adds: Sequence[tuple[Target, float]]) -> float:
    """The LoRA products' arithmetic on one weight: 2 * rows * columns * rank per part, in GFLOP."""
    return sum(2.0 * (p.rows[1] - p.rows[0]) * t.module.in_features * p.up.shape[1]
               for t, _ in adds for p in t.parts()) / 1e9


def resolve_device(device: str, work_gflop: float) -> str:
    """The device a merge runs on: `auto` is CUDA when available and `work_gflop` reaches AUTO_CUDA_GFLOP;
    an explicit device is checked (CUDA present, a name torch knows)."""
    if device == "auto":
        return "cuda" if work_gflop >= AUTO_CUDA_GFLOP and torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise LoraError(Param("device", device), ": must be cpu, cuda, cuda:N or auto")
    if kind == "cuda" and not torch.cuda.is_available():
        raise LoraError(Param("device", device), ": no CUDA device is available")
    if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise LoraError(Param("device", device), f": only {torch.cuda.device_count()} CUDA device(s) here")
    return "cpu" if kind == "cpu" else device


def _grow(buf: torch.Tensor, n: int) -> torch.Tensor:
    return buf if buf.numel() >= n else torch.empty(n, dtype=buf.dtype, device=buf.device)


class CpuStages:
    """Merging on the CPU in cache-sized row chunks (module docstring); buffers grow to the largest job.

    A job's chunks are shared out among `workers` threads of our own (each takes the next chunk when it
    is done with one), torch running single-threaded in each: with torch's own pool every GEMM is split
    in fixed halves and waits for the slower one, so whenever the reader or the writer takes a core the
    whole product stalls; chunks taken as threads come free keep every core busy instead. The bytes do
    not depend on the number of workers or the chunk size (every element is correctly rounded)."""

    def __init__(self, depth: int, workers: int | None = None, chunk_elements: int | None = None):
        self.raw = [torch.empty(0, dtype=torch.uint8) for _ in range(depth)]
        self.out = [torch.empty(0, dtype=torch.uint8) for _ in range(depth)]
        self.w32 = [torch.empty(0, dtype=torch.float32) for _ in range(depth)]  # an fp8 job's float32 result
        self.pad = [0] * depth  # where each slot's output starts in its buffer (see `_out`)
        self.terms: list[list[Term]] = [[] for _ in range(depth)]
        self.scales: list[torch.Tensor | None] = [None] * depth
        n = max(1, workers if workers is not None else torch.get_num_threads())
        self.chunk_elements = chunk_elements or CHUNK_ELEMENTS
        self.f64 = [torch.empty(0, dtype=torch.float64) for _ in range(n)]  # each worker's chunk
        self.scratch = [Scratch() for _ in range(n)]
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="merge-chunk") if n > 1 else None

    def load(self, job: Job, slot: int) -> None:
        self.raw[slot] = _grow(self.raw[slot], job.in_bytes)
        job.read_into(self.raw[slot])
        self.scales[slot] = job.scale.values() if job.scale is not None else None
        self.terms[slot] = job.terms()

    def compute(self, job: Job, slot: int) -> None:
        rows, cols = job.shape
        src = job.stored(self.raw[slot])
        scales = self.scales[slot]
        self.out[slot] = _grow(self.out[slot], job.out_bytes + ALIGN)
        pad = 0 if job.out_offset is None else (job.out_offset - self.out[slot].data_ptr()) % ALIGN
        self.pad[slot] = pad  # output bytes at an address congruent to their file offset: written in place
        rq = job.requantizer()
        if rq is not None:
            self.w32[slot] = _grow(self.w32[slot], rows * cols)
            dst = self.w32[slot][:rows * cols].view(rows, cols)
        else:
            dst = self._out(job, slot).view(torch_dtype(job.out_dtype)).view(rows, cols)
        merge = ExactMerge(self.terms[slot], rows, cols, job.merge_dtype)
        base = job.base_values(self.raw[slot], scales)
        step = max(1, self.chunk_elements // max(cols, 1))
        if rq is not None:
            step = rq.chunk_rows(step)
        chunks = [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
        deferred: list = []  # the few elements the chunks' bound cannot decide: decided at once, below

        def merged(k: int, r0: int, r1: int) -> None:
            self.f64[k] = _grow(self.f64[k], step * cols)
            w = self.f64[k][:(r1 - r0) * cols].view(r1 - r0, cols)
            job.dequantize_into(w, src, scales, r0, r1)  # to float64: exact
            if rq is not None:  # fp8: the float64 sums rounded once to float32; fp8.py decides from there
                merge.sums(w, r0, r1)
                dst[r0:r1].copy_(w)
                rq.observe(dst[r0:r1], r0, r1)
                return
            try:
                merge.chunk(w, r0, r1, dst[r0:r1], base, self.scratch[k], defer=deferred)
            except NotFinite:
                raise job.nonfinite_error() from None

        self._each(chunks, merged)
        try:
            merge.resolve(dst, deferred, base)
        except NotFinite:
            raise job.nonfinite_error() from None
        if rq is not None:
            exact = _ExactView(merge, base, job)
            rq.finish(dst, exact)
            if not job.scale_only:
                codes = self._out(job, slot).view(rows, cols)
                self._each(chunks, lambda k, r0, r1: rq.quantize(dst[r0:r1], r0, r1, codes[r0:r1], exact))
            job.requantized(rq)
            if job.scale_only:
                self._out(job, slot).numpy()[:] = job.result["scale"]
        self.terms[slot] = []
        self.scales[slot] = None

    def _each(self, chunks: list[tuple[int, int]], fn: Callable[[int, int, int], None]) -> None:
        """fn(worker, r0, r1) for every chunk, shared out among the workers (each takes the next chunk when
        it is done with one); the first failing chunk's error is raised, as a sequential run would."""
        taken = itertools.count()  # next() is atomic: each chunk goes to exactly one worker
        failed: list[tuple[int, BaseException]] = []  # (chunk, error)

        def work(k: int) -> None:
            while not failed and (i := next(taken)) < len(chunks):
                try:
                    fn(k, *chunks[i])
                except BaseException as e:  # noqa: BLE001 - raised below, after every worker stopped
                    failed.append((i, e))

        with single_threaded():  # only while computing: other work of the merge keeps torch's pool
            if self.pool is None:
                work(0)
            else:
                for f in [self.pool.submit(work, k) for k in range(len(self.f64))]:
                    f.result()  # waits for every worker: none still writes into the output
        if failed:
            raise min(failed, key=lambda x: x[0])[1]

    def _out(self, job: Job, slot: int) -> torch.Tensor:
        """The slot's output bytes: `pad` bytes into its buffer, so that their address is congruent to their
        offset in the output file (modulo io.direct.ALIGN) and a direct write needs no staging copy."""
        return self.out[slot][self.pad[slot]:self.pad[slot] + job.out_bytes]

    def finish(self, job: Job, slot: int) -> np.ndarray:
        return self._out(job, slot).numpy()

    def close(self) -> None:
        """Stop the chunk workers."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _NoEvent:
    """A CUDA event's interface for device="cpu", where every operation has completed when issued."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class DeviceStages:
    """Merging on a device through pinned staging buffers and three streams (module docstring)."""

    def __init__(self, jobs: list[Job], device: str, depth: int):
        dev = self.dev = torch.device(device)
        cuda = dev.type == "cuda"
        max_in = max((j.in_bytes for j in jobs), default=0)
        max_out = max((j.out_bytes for j in jobs), default=0)
        max_elems = max((j.shape[0] * j.shape[1] for j in jobs), default=0)

        def host(n: int) -> torch.Tensor:
            return torch.empty(n, dtype=torch.uint8, pin_memory=cuda)

        def device_buf(n: int, dtype=torch.uint8) -> torch.Tensor:
            return torch.empty(n, dtype=dtype, device=dev)

        self.streams = [torch.cuda.Stream(dev) for _ in range(3)] if cuda else [None, None, None]
        self.h_in, self.h_out = [host(max_in) for _ in range(depth)], [host(max_out) for _ in range(depth)]
        self.d_in, self.d_out = [device_buf(max_in) for _ in range(depth)], [device_buf(max_out) for _ in range(depth)]
        self.f64 = device_buf(max_elems, torch.float64)  # used on the compute stream only, so one suffices
        # an fp8 job's float32 result, on the device and back on the host (requantized there)
        max_fp8 = max((j.shape[0] * j.shape[1] for j in jobs if j.fp8 is not None), default=0)
        self.d_f32 = device_buf(max_fp8, torch.float32)
        self.h_f32 = torch.empty(max_fp8, dtype=torch.float32, pin_memory=cuda and max_fp8 > 0)
        self.scratch = Scratch()

        def event():
            if not cuda:
                return _NoEvent()
            with torch.cuda.device(dev):  # an event belongs to the device it is created on
                return torch.cuda.Event()

        # per slot: inputs copied in, device input consumed, output computed, output copied back
        self.copied, self.consumed, self.computed, self.back = ([event() for _ in range(depth)] for _ in range(4))
        self.terms: list[list[Term]] = [[] for _ in range(depth)]
        self.scales: list[torch.Tensor | None] = [None] * depth

    def _on(self, k: int):
        s = self.streams[k]
        return torch.cuda.stream(s) if s is not None else contextlib.nullcontext()

    def _wait(self, k: int, event) -> None:
        if self.streams[k] is not None:
            self.streams[k].wait_event(event)

    def load(self, job: Job, slot: int) -> None:
        job.read_into(self.h_in[slot])
        self.scales[slot] = job.scale.values() if job.scale is not None else None
        self.terms[slot] = job.terms()

    def compute(self, job: Job, slot: int) -> None:
        rows, cols = job.shape
        n, m = job.in_bytes, job.out_bytes
        scales = self.scales[slot]
        rq = job.requantizer()
        h2d, comp, d2h = range(3)
        with self._on(h2d):
            self._wait(h2d, self.consumed[slot])  # the job before in this slot has read d_in
            self.d_in[slot][:n].copy_(self.h_in[slot][:n], non_blocking=True)
            self.copied[slot].record(self.streams[h2d])
        with self._on(comp):
            self._wait(comp, self.copied[slot])
            self._wait(comp, self.back[slot])  # d_out of the job before in this slot is copied back
            w = self.f64[:rows * cols].view(rows, cols)
            job.dequantize_into(w, job.stored(self.d_in[slot]), None if scales is None else scales.to(self.dev), 0, rows)
            self.consumed[slot].record(self.streams[comp])
            merge = ExactMerge(self.terms[slot], rows, cols, job.merge_dtype, device=self.dev)
            base = job.base_values(self.h_in[slot], scales)
            if rq is None:
                out = self.d_out[slot][:m].view(torch_dtype(job.out_dtype)).view(rows, cols)
                try:  # the few undecided elements are decided on the host (this waits for the stream)
                    merge.chunk(w, 0, rows, out, base, self.scratch)
                except NotFinite:
                    raise job.nonfinite_error() from None
            else:  # fp8: the float64 sums rounded once to float32, requantized on the host (fp8.py)
                out = self.d_f32[:rows * cols].view(rows, cols)
                merge.sums(w, 0, rows)
                out.copy_(w)
            self.computed[slot].record(self.streams[comp])
        if rq is None:
            with self._on(d2h):
                self._wait(d2h, self.computed[slot])
                self.h_out[slot][:m].copy_(self.d_out[slot][:m], non_blocking=True)
                self.back[slot].record(self.streams[d2h])
        else:  # fp8: the float32 result back to the host, requantized there in row chunks
            self.computed[slot].synchronize()
            h = self.h_f32[:rows * cols].view(rows, cols)
            h.copy_(out)
            step = rq.chunk_rows(max(1, CHUNK_ELEMENTS // max(cols, 1)))
            chunks = [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
            for r0, r1 in chunks:
                rq.observe(h[r0:r1], r0, r1)
            exact = _ExactView(merge, base, job)
            rq.finish(h, exact)
            if not job.scale_only:
                codes = self.h_out[slot][:m].view(rows, cols)
                for r0, r1 in chunks:
                    rq.quantize(h[r0:r1], r0, r1, codes[r0:r1], exact)
            job.requantized(rq)
            if job.scale_only:
                self.h_out[slot][:m].numpy()[:] = job.result["scale"]
        self.copied[slot].synchronize()  # h_in of this slot may be reused now
        self.terms[slot] = []
        self.scales[slot] = None

    def finish(self, job: Job, slot: int) -> np.ndarray:
        self.back[slot].synchronize()
        return self.h_out[slot][:job.out_bytes].numpy()

    def close(self) -> None:
        """Wait for every stream (buffers are freed only after the device is done with them)."""
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)


__all__ = ["Job", "Scaled", "Fp8Out", "CpuStages", "DeviceStages", "gflop", "resolve_device", "AUTO_CUDA_GFLOP"]
