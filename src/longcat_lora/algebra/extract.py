"""Extract a LoRA from two checkpoints: a low-rank SVD of `W_tuned - W_base` for each adapted Linear.

BASE and TUNED are read as `merge` reads a base (a safetensors file or a sharded directory with an
index), each in LongCat's or FastVideo's naming, recognised tensor by tensor through the naming table
(`param_from_fastvideo`), so a FastVideo fine-tune of an official base works: FastVideo's split layers
(to_q / to_k / to_v, to_k / to_v) are read back into the fused module's rows. LongCat's INT8 layers
(`weight_int8` int8 + `weight_scale` per row, the official QuantizedLinear) are read as the weight they
stand for, `weight_int8 * weight_scale[:, None]` (exact in float64, one rounding in float32). Every module of the
naming table is extracted the way the native format counts rank: its rows are cut into the module's up
blocks (attn.qkv 3, cross_attn.kv_linear 2, adaLN 6, final adaLN 2, Avatar's audio adaLN 3, else 1), and
each block's change is truncated separately (for qkv and kv_linear these are exactly FastVideo's split
layers, so extracting per split layer would give the same factors).

Streaming: one up block at a time, TUNED's rows are read (one pread into a reused buffer) and converted
into a reused compute buffer, then BASE's rows are read into the same byte buffer and subtracted in
place: about two weights in memory, never a checkpoint. The factors go to an anonymous spool file, not
memory, so a 48-block extraction at rank 128 does not hold gigabytes of factors either. Blocks of up to
`FLOAT64_BELOW` elements (and float64 inputs) are computed in float64 with an exact SVD; larger blocks in
float32 with a randomized SVD (`dense_svd`). Each written block's true error `||dW - up @ down||_F` is
measured against the change itself, with the factors as stored.

Output: the native format by default, `alpha_scale` 1.0 and float32 factors split as `up = U sqrt(S)`,
`down = sqrt(S) Vh` (both factors of the same magnitude, so any dtype a converter picks holds them
well); with a fixed rank every up block has exactly that rank (zero-padded where the change has lower
rank), as the official loader's `lora_network_dim` expects. Any other format through `save_lora`.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from ..model import naming
from ..model.adapter import LoraAdapter, LoraModule, Part
from ..model.sources import Source, Stored
from ..errors import LoraError
from ..formats import FORMATS, check_lora_output, save_lora
from ..apply.merge import Base, open_base
from ..io.dtypes import FLOATS, ITEMSIZE, dtype_name, torch_dtype
from ..io.reader import SafeFile
from .engine import single_threaded
from .lowrank import ModuleReport, RankRule, Report, dense_svd

if TYPE_CHECKING:
    import torch

DTYPES = {"keep": "float32", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
FLOAT64_BELOW = 1 << 22  # blocks with at most this many elements are computed in float64 (4M: 32 MiB)
FIRST_SKETCH = 64  # randomized rank tried first for --energy / --max-error (doubled until enough)
RESIDUAL_ELEMENTS = 1 << 22  # row chunk of the residual check


# ---------------------------------------------------------------- checkpoints by canonical parameter


@dataclass(frozen=True)
class _Piece:
    """Rows lo:hi of a canonical parameter, held by one tensor of one shard."""

    file: SafeFile
    tensor: str
    lo: int
    hi: int

    @property
    def dtype(self) -> str:
        return self.file.info(self.tensor).dtype


@dataclass
class _Param:
    """One parameter in LongCat's naming, whatever tensors hold it (a fused tensor, or split layers)."""

    name: str
    shape: tuple[int, ...]
    pieces: list[_Piece]
    # LongCat's INT8 layers: this weight is `weight_int8` (the pieces) times this per-row `weight_scale`
    scale: _Param | None = None

    @property
    def dtypes(self) -> set[str]:
        """The value dtypes (an INT8 weight counts as its scale's float dtype)."""
        return self.scale.dtypes if self.scale is not None else {p.dtype for p in self.pieces}

    def where(self) -> str:
        return ", ".join(f"{p.file.path}:{p.tensor}" for p in self.pieces)


def canonical_params(b: Base) -> dict[str, _Param]:
    """Every tensor of a checkpoint under its LongCat name; FastVideo split layers joined by rows."""
    groups: dict[str, dict[int, str]] = {}
    splits: dict[str, int] = {}
    for tensor in b.tensors:
        canon, j, n = naming.param_from_fastvideo(tensor)
        g = groups.setdefault(canon, {})
        if splits.setdefault(canon, n) != n or j in g:
            other = next(iter(g.values()))
            raise LoraError(f"{b.path}: tensors {other!r} and {tensor!r} both hold {canon} "
                            f"(LongCat and FastVideo names for one parameter)")
        g[j] = tensor
    out: dict[str, _Param] = {}
    for canon, g in groups.items():
        n = splits[canon]
        missing = [j for j in range(n) if j not in g]
        if missing:
            raise LoraError(f"{b.path}: has {g[min(g)]!r} but not the other split layer(s) of {canon} "
                            f"(split {missing} of {n} missing)")
        files = [b.shards[b.tensors[g[j]]] for j in range(n)]
        shapes = [f.info(g[j]).shape for j, f in enumerate(files)]
        if n > 1 and (len(set(shapes)) != 1 or not shapes[0]):
            raise LoraError(f"{b.path}: the split layers of {canon} have shapes {[list(s) for s in shapes]}; "
                            f"they must be equal row blocks")
        h = shapes[0][0] if shapes[0] else 1
        shape = (n * h, *shapes[0][1:]) if shapes[0] else ()
        out[canon] = _Param(canon, shape, [_Piece(f, g[j], j * h, (j + 1) * h) for j, f in enumerate(files)])
    return _int8_weights(out, b.path)


def _int8_weights(params: dict[str, _Param], where: str) -> dict[str, _Param]:
    """Fold each INT8 layer's `weight_int8` [out, in] int8 and `weight_scale` [out] float32 (the
    official QuantizedLinear's buffers) into one `<module>.weight` that reads as int8 * scale."""
    for name in [k for k in params if k.endswith(".weight_int8")]:
        module = name.removesuffix(".weight_int8")
        q, s = params[name], params.get(module + ".weight_scale")
        if s is None:
            continue  # left as is: compared as a plain tensor
        if module + ".weight" in params:
            raise LoraError(f"{where}: {module} has both a weight and an INT8 weight_int8")
        if q.dtypes != {"I8"} or len(q.shape) != 2 or s.shape != q.shape[:1] or not s.dtypes <= set(FLOATS):
            raise LoraError(f"{where}: {module}: weight_int8 {sorted(q.dtypes)} {list(q.shape)} and weight_scale "
                            f"{sorted(s.dtypes)} {list(s.shape)} are not an INT8 layer (int8 [out, in], float [out])")
        del params[name], params[module + ".weight_scale"]
        params[module + ".weight"] = _Param(module + ".weight", q.shape, q.pieces, s)
    return params


@dataclass
class _Plan:
    modules: list[tuple[str, int, _Param, _Param]]  # (module, up blocks, base weight, tuned weight)
    others: list[tuple[_Param, _Param]]  # every other parameter, to compare


def plan_extraction(pb: dict[str, _Param], pt: dict[str, _Param], base: str, tuned: str) -> _Plan:
    """Match the two checkpoints parameter by parameter; any missing tensor, shape or dtype problem is a
    LoraError naming the file and tensor. Reads headers only."""
    for a, b, pa, pbb in ((pb, pt, base, tuned), (pt, pb, tuned, base)):
        missing = sorted(set(a) - set(b))
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise LoraError(f"{pbb}: missing tensor(s) that {pa} has: {shown}")
    plan = _Plan([], [])
    def file_order(name: str) -> tuple[str, int]:
        first = pb[name].pieces[0]
        return first.file.path, first.file.info(first.tensor).start

    for name in sorted(pb, key=file_order):  # read BASE front to back
        x, y = pb[name], pt[name]
        if x.shape != y.shape:
            raise LoraError(f"{name}: shape {list(x.shape)} in {base} ({x.where()}) but {list(y.shape)} in "
                            f"{tuned} ({y.where()})")
        module, leaf = naming.split_param(name)
        found = naming.kind_of(module)
        if found is None or leaf != "weight":
            plan.others.append((x, y))
            continue
        for p, path in ((x, base), (y, tuned)):
            bad = sorted(p.dtypes - set(FLOATS))
            if bad:
                raise LoraError(f"{path}: tensor {p.pieces[0].tensor!r} has dtype {bad[0]}; a weight to extract "
                                f"a LoRA from must be F16, BF16, F32 or F64")
            if len(p.shape) != 2 or 0 in p.shape:
                raise LoraError(f"{path}: tensor {p.pieces[0].tensor!r} has shape {list(p.shape)}; a Linear "
                                f"weight must be a non-empty 2-D matrix")
        chunks = found[0].chunks
        plan.modules.append((module, chunks if x.shape[0] % chunks == 0 else 1, x, y))
    return plan


# ---------------------------------------------------------------- reading one block of a change


class _Workspace:
    """Reused buffers: one for raw bytes, one for the change in the compute dtype (and a device stage)."""

    def __init__(self, device: str):
        import torch

        self.device = device
        self.raw = np.empty(0, dtype=np.uint8)
        self.bufs: dict[torch.dtype, torch.Tensor] = {}
        self.stage: dict[torch.dtype, torch.Tensor] = {}

    def _buf(self, pool: dict, dtype, n: int):
        import torch

        b = pool.get(dtype)
        if b is None or b.numel() < n:
            pool.pop(dtype, None)
            b = pool[dtype] = torch.empty(n, dtype=dtype, device=self.device)
        return b[:n]

    def _rows(self, pc: _Piece, a: int, b: int):
        """Rows a:b (of the canonical parameter) of one piece, as a CPU tensor over the reused byte buffer."""
        import torch

        info = pc.file.info(pc.tensor)
        start, count = pc.file.byte_range(pc.tensor, (a - pc.lo, b - pc.lo))
        if self.raw.size < count:
            self.raw = np.empty(count, dtype=np.uint8)
        buf = self.raw[:count]
        pc.file._pread(pc.tensor, start, memoryview(buf))
        return torch.from_numpy(buf).view(torch_dtype(info.dtype)).view(b - a, *info.shape[1:])

    def _read(self, p: _Param, lo: int, hi: int, into, subtract: bool) -> None:
        """into (+)= rows lo:hi of p, piece by piece (into is [hi-lo, cols] on the device)."""
        import torch

        for pc in p.pieces:
            a, b = max(lo, pc.lo), min(hi, pc.hi)
            if a >= b:
                continue
            dst = into[a - lo:b - lo]
            plain = p.scale is None
            if plain and not subtract:
                dst.copy_(self._rows(pc, a, b))
                continue
            if plain and into.device.type == "cpu":
                dst.sub_(self._rows(pc, a, b))
                continue
            stage = self._buf(self.stage, into.dtype, dst.numel()).view(dst.shape)
            stage.copy_(self._rows(pc, a, b))
            if not plain:  # int8 * its row's scale, in the compute dtype (exact in float64)
                scale = torch.empty(b - a, dtype=into.dtype)
                for sc in p.scale.pieces:
                    c, d = max(a, sc.lo), min(b, sc.hi)
                    if c < d:
                        scale[c - a:d - a].copy_(self._rows(sc, c, d))
                stage.mul_(scale.to(into.device)[:, None])
            if subtract:
                dst.sub_(stage)
            else:
                dst.copy_(stage)

    def change(self, base: _Param, tuned: _Param, lo: int, hi: int):
        """W_tuned - W_base on rows lo:hi, in float64 when small (or float64 in), float32 otherwise."""
        import torch

        n = (hi - lo) * base.shape[1]
        wide = n <= FLOAT64_BELOW or "F64" in base.dtypes | tuned.dtypes
        dtype = torch.float64 if wide else torch.float32
        d = self._buf(self.bufs, dtype, n).view(hi - lo, base.shape[1])
        self._read(tuned, lo, hi, d, subtract=False)
        self._read(base, lo, hi, d, subtract=True)
        return d


# ---------------------------------------------------------------- factors and their spool


class _Spool:
    """An anonymous temp file the factors are appended to, so they never all sit in memory."""

    def __init__(self, directory: str):
        self.f = tempfile.TemporaryFile(dir=directory)
        self.end = 0

    def put(self, t: torch.Tensor) -> Source:
        """Append a 2-D float tensor; returns a Source reading it back."""
        raw = t.detach().to("cpu").contiguous().view(-1).numpy().view(np.uint8)
        mv = memoryview(raw).cast("B")
        fd, off, done = self.f.fileno(), self.end, 0
        while done < mv.nbytes:
            done += os.pwrite(fd, mv[done:], off + done)
        self.end += mv.nbytes
        return _SpoolSource((int(t.shape[0]), int(t.shape[1])), dtype_name(t.dtype), fd, off)

    def close(self) -> None:
        self.f.close()


class _SpoolSource(Stored):
    """A factor in the spool: rows read back with pread (checked for NaN/Inf as every stored source is)."""

    def __init__(self, shape: tuple[int, int], dtype: str, fd: int, offset: int):
        super().__init__(shape, dtype)
        self.fd, self.offset = fd, offset

    def fetch(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        item = ITEMSIZE[self.dtype]
        width = self.shape[1] * item
        n, start = (r1 - r0) * width, self.offset + r0 * width
        buf = bytearray(n)
        mv, got = memoryview(buf), 0
        while got < n:
            k = os.preadv(self.fd, [mv[got:]], start + got)
            if k <= 0:
                raise LoraError(f"extract: spool file truncated at byte {start + got}")
            got += k
        a = np.frombuffer(buf, dtype=np.uint8).reshape(r1 - r0, width)
        return a if (c0, c1) == (0, self.shape[1]) else np.ascontiguousarray(a[:, c0 * item:c1 * item])


@dataclass
class _Block:
    """One up block's result."""

    rank: int  # kept (before any padding)
    total: float  # ||change||_F^2
    kept: float  # sum of the kept singular values squared
    err2: float  # ||change - up @ down||_F^2 of the factors as stored
    up: torch.Tensor | None = None  # [h, r] in the output dtype
    down: torch.Tensor | None = None  # [r, in]


def _low_rank(d: torch.Tensor, rule: RankRule, total: float, gen: torch.Generator):
    """(U, S, Vh, k): the leading singular triplets of d and the rank the rule keeps (k <= len(S))."""
    import torch

    q = min(d.shape)
    if rule.rank is not None:
        u, s, vh = dense_svd(d, rule.rank, generator=gen)
        return u, s, vh, rule.choose(s, total)
    want = min(q, FIRST_SKETCH)
    while True:
        u, s, vh = dense_svd(d, want, generator=gen)
        k = rule.choose(s, total)
        kept = float(torch.sum(s[:k].double() ** 2))
        ok = (kept >= rule.energy * total) if rule.energy is not None else \
            (max(total - kept, 0.0) <= rule.max_error ** 2 * total)  # type: ignore[operator]
        if ok or want >= q:
            return u, s, vh, k
        want = min(q, 2 * want)


def _sumsq(d: torch.Tensor) -> float:
    """||d||_F^2 summed in float64, in row chunks (no full-size float64 copy)."""
    import torch

    step = max(1, RESIDUAL_ELEMENTS // d.shape[1])
    return math.fsum(float(torch.sum(torch.square(d[r0:r0 + step].to(torch.float64))))
                     for r0 in range(0, d.shape[0], step))


def _residual2(d: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """||d - up @ down||_F^2 in row chunks (no full-size temporary), summed in float64."""
    import torch

    up, down = up.to(d.dtype), down.to(d.dtype)
    step = max(1, RESIDUAL_ELEMENTS // d.shape[1])
    return math.fsum(float(torch.sum(torch.square((d[r0:r0 + step] - up[r0:r0 + step] @ down).to(torch.float64))))
                     for r0 in range(0, d.shape[0], step))


def extract_block(d: torch.Tensor, rule: RankRule, gen: torch.Generator, where: str,
                  store: torch.dtype | None = None) -> _Block | None:
    """Truncate one block of a weight change into factors stored as `store` (default float32); None
    when the change is exactly zero. The error is that of the stored factors."""
    import torch

    total = _sumsq(d)
    if not math.isfinite(total):
        raise LoraError(f"{where}: the weight change is not finite (NaN/Inf in a checkpoint, or overflow)")
    if total == 0.0:
        return None
    u, s, vh, k = _low_rank(d, rule, total, gen)
    k = max(k, 1)
    store = store or torch.float32
    root = torch.sqrt(s[:k].to(torch.float64))
    up = (u[:, :k].to(torch.float64) * root).to(store)
    down = (root[:, None] * vh[:k].to(torch.float64)).to(store)
    if rule.rank is not None and k < rule.rank:  # the native rank is per module: pad with zeros
        up = torch.cat([up, up.new_zeros(up.shape[0], rule.rank - k)], 1)
        down = torch.cat([down, down.new_zeros(rule.rank - k, down.shape[1])], 0)
    kept = float(torch.sum(s[:k].double() ** 2))
    return _Block(k, total, min(kept, total), _residual2(d, up, down), up, down)


# ---------------------------------------------------------------- the report


@dataclass
class ExtractReport(Report):
    """Report plus what extract alone knows: tensors that changed but are not the weight of a LoRA
    target (biases, norms, embedders), which a LoRA cannot carry. `skipped` lists the weights that are
    identical in both checkpoints. A module's `rank_before` is the full rank of a dense change of its up
    block's shape, min(rows / blocks, cols); `rank_after` the rank stored per up block."""

    not_representable: list[str] = field(default_factory=list)

    def format(self, per_module: bool = True) -> str:  # type: ignore[override]
        """The shared report, with the (often long) list of identical weights on one line."""
        lines = [Report.format(replace(self, skipped=[]), per_module)]
        if self.skipped:
            lines.append(f"identical in both checkpoints (skipped): {', '.join(self.skipped)}")
        for name in self.not_representable:
            lines.append(f"changed but not representable as LoRA: {name}")
        return "\n".join(lines)


def _same(x: _Param, y: _Param) -> bool:
    """Whether two parameters hold equal values (bitwise when their dtypes agree)."""
    import torch

    def whole(p: _Param) -> torch.Tensor:
        parts = [pc.file.read(pc.tensor) for pc in p.pieces]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    a, b = whole(x), whole(y)
    if a.dtype == b.dtype:
        return bool(np.array_equal(a.contiguous().view(-1).view(torch.uint8).numpy(),
                                   b.contiguous().view(-1).view(torch.uint8).numpy()))
    if a.dtype.is_floating_point and b.dtype.is_floating_point:
        return torch.equal(a.to(torch.float64), b.to(torch.float64))
    return False


# ---------------------------------------------------------------- the entry point


def extract_lora(base: str, tuned: str, out: str, *, rank: int | None = None, energy: float | None = None,
                 max_error: float | None = None, device: str = "cpu", format: str = "longcat",
                 dtype: str = "keep", overwrite: bool = False, skip_unmapped: bool = False,
                 progress: bool = False) -> ExtractReport:
    """Write the LoRA that best approximates `tuned - base` (see the module docstring) to `out`.

    Exactly one of `rank` (per up block), `energy` (smallest rank keeping that share of each block's
    squared Frobenius norm) or `max_error` (smallest rank whose relative Frobenius error is at most
    that). `dtype`: of the factors, "fp32" (also what "keep" means here: a change has no LoRA dtype to
    keep), "bf16", "fp16" or "fp64"; its rounding is part of the reported error. `skip_unmapped`: leave
    out (and list) modules the output format cannot name. Returns the report: per module ranks, retained
    share and true relative error; weights equal in both; other tensors that changed. Nothing is
    written unless everything succeeds.
    """
    import torch

    rule = RankRule.parse(rank, energy, max_error)
    if format not in FORMATS:
        raise LoraError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if dtype not in DTYPES:
        raise LoraError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    store = getattr(torch, DTYPES[dtype])
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LoraError("device cuda: no CUDA device is available")
    base, tuned, out = str(base), str(tuned), str(out)
    check_lora_output(out, format, overwrite=overwrite, inputs=[base, tuned])
    b = open_base(base)
    try:
        t = open_base(tuned)
    except BaseException:
        b.close()
        raise
    spool = None
    try:
        plan = plan_extraction(canonical_params(b), canonical_params(t), base, tuned)
        if not plan.modules:
            raise LoraError(f"{base}: holds no weight of a LongCat DiT Linear (nothing to extract from)")
        report = ExtractReport("extract", rule.describe(), format_out=format, output=out)
        report.bytes_before = sum(sf.size for sf in t.shards.values())
        ws = _Workspace(device)
        gen = torch.Generator(device=device).manual_seed(0)
        spool = _Spool(os.path.dirname(os.path.abspath(out)))
        modules: dict[str, LoraModule] = {}
        bar = _bar(len(plan.modules), progress)
        for module, n, pb, pt in plan.modules:
            rows, cols = pb.shape
            h = rows // n
            blocks: list[tuple[int, _Block]] = []
            # one thread: on a shared machine a pool's threads wait on each other far longer than the
            # 2x a free second core could give (a 4096 x 128 Gram: 3.5 ms on one thread, 17 ms on two)
            with single_threaded():
                for i in range(n):
                    d = ws.change(pb, pt, i * h, (i + 1) * h)
                    blk = extract_block(d, rule, gen, f"{tuned}: {module} (rows {i * h}:{(i + 1) * h})", store)
                    if blk is not None:
                        blocks.append((i, blk))
            if bar:
                bar.update(1)
            if not blocks:
                report.skipped.append(module)
                continue
            parts = [Part((i * h, (i + 1) * h), spool.put(blk.down), spool.put(blk.up), 1.0) for i, blk in blocks]
            modules[module] = LoraModule(module, rows, cols, parts)
            total = math.fsum(blk.total for _, blk in blocks)
            kept = math.fsum(blk.kept for _, blk in blocks)
            err2 = math.fsum(blk.err2 for _, blk in blocks)
            by_index = dict(blocks)
            ranks = [by_index[i].rank if i in by_index else 0 for i in range(n)]
            stored = max(p.rank for p in parts)
            report.modules.append(ModuleReport(module, min(h, cols), stored, math.sqrt(err2 / total),
                                               kept / total, ranks))
            report.params_before += rows * cols
            report.params_after += n * stored * (cols + h)
        if bar:
            bar.close()
        for x, y in plan.others:
            if not _same(x, y):
                report.not_representable.append(x.name)
        if not modules:
            raise LoraError(f"{tuned}: every Linear weight equals {base}'s; there is no change to extract")
        adapter = LoraAdapter(modules, "memory", tuned, scale_dtype="F32")
        left_out = save_lora(adapter, out, format, overwrite=overwrite, skip_unmapped=skip_unmapped,
                             inputs=[base, tuned], progress=progress)
        for m in left_out:
            report.notes.append(f"left out (no name in {format}): {m}")
        report.bytes_after = _size(out)
        return report
    finally:
        if spool is not None:
            spool.close()
        b.close()
        t.close()


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)


def _bar(total: int, enabled: bool):
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="module", desc="extract", leave=False)


__all__ = ["ExtractReport", "canonical_params", "extract_block", "extract_lora", "plan_extraction"]
