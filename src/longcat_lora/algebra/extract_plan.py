"""BASE and TUNED as extract reads them: every tensor under its LongCat parameter name, the two matched.

A checkpoint is opened as `merge` opens a base (base_checkpoint.py), in LongCat's or FastVideo's naming,
recognised tensor by tensor through the naming table (`param_from`): FastVideo's and the wrapper's split layers
(to_q / to_k / to_v, to_k / to_v) are read back as row pieces of the fused parameter, and LongCat's INT8
layers (`weight_int8` int8 + `weight_scale` per row) as the weight they stand for. `plan_extraction`
matches the two checkpoints (headers only); `same_values` compares the parameters that are not LoRA targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model import naming
from ..errors import LoraError
from ..apply.base_checkpoint import Base
from ..io.dtypes import FLOATS
from ..io.reader import SafeFile


@dataclass(frozen=True)
class Piece:
    """Rows lo:hi of a canonical parameter, held by one tensor of one shard."""

    file: SafeFile
    tensor: str
    lo: int
    hi: int

    @property
    def dtype(self) -> str:
        return self.file.info(self.tensor).dtype


@dataclass
class CanonParam:
    """One parameter in LongCat's naming, whatever tensors hold it (a fused tensor, or split layers)."""

    name: str
    shape: tuple[int, ...]
    pieces: list[Piece]
    # LongCat's INT8 layers: this weight is `weight_int8` (the pieces) times this per-row `weight_scale`
    scale: CanonParam | None = None

    @property
    def dtypes(self) -> set[str]:
        """The value dtypes (an INT8 weight counts as its scale's float dtype)."""
        return self.scale.dtypes if self.scale is not None else {p.dtype for p in self.pieces}

    def where(self) -> str:
        return ", ".join(f"{p.file.path}:{p.tensor}" for p in self.pieces)


def canonical_params(b: Base) -> dict[str, CanonParam]:
    """Every tensor of a checkpoint under its LongCat name; FastVideo split layers joined by rows."""
    groups: dict[str, dict[int, str]] = {}
    splits: dict[str, int] = {}
    for tensor in b.tensors:
        canon, j, n = naming.param_from(tensor)
        g = groups.setdefault(canon, {})
        if splits.setdefault(canon, n) != n or j in g:
            other = next(iter(g.values()))
            raise LoraError(f"{b.path}: tensors {other!r} and {tensor!r} both hold {canon} "
                            f"(two names for one parameter)")
        g[j] = tensor
    out: dict[str, CanonParam] = {}
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
        out[canon] = CanonParam(canon, shape, [Piece(f, g[j], j * h, (j + 1) * h) for j, f in enumerate(files)])
    return _int8_weights(out, b.path)


def _int8_weights(params: dict[str, CanonParam], where: str) -> dict[str, CanonParam]:
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
        params[module + ".weight"] = CanonParam(module + ".weight", q.shape, q.pieces, s)
    return params


@dataclass
class ExtractionPlan:
    modules: list[tuple[str, int, CanonParam, CanonParam]]  # (module, up blocks, base weight, tuned weight)
    others: list[tuple[CanonParam, CanonParam]]  # every other parameter, to compare


def plan_extraction(pb: dict[str, CanonParam], pt: dict[str, CanonParam], base: str, tuned: str) -> ExtractionPlan:
    """Match the two checkpoints parameter by parameter; any missing tensor, shape or dtype problem is a
    LoraError naming the file and tensor. Reads headers only."""
    for a, b, pa, pbb in ((pb, pt, base, tuned), (pt, pb, tuned, base)):
        missing = sorted(set(a) - set(b))
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise LoraError(f"{pbb}: missing tensor(s) that {pa} has: {shown}")
    plan = ExtractionPlan([], [])
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


def same_values(x: CanonParam, y: CanonParam) -> bool:
    """Whether two parameters hold equal values (bitwise when their dtypes agree)."""
    import torch

    def whole(p: CanonParam) -> torch.Tensor:
        parts = [pc.file.read(pc.tensor) for pc in p.pieces]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    a, b = whole(x), whole(y)
    if a.dtype == b.dtype:
        return bool(np.array_equal(a.contiguous().view(-1).view(torch.uint8).numpy(),
                                   b.contiguous().view(-1).view(torch.uint8).numpy()))
    if a.dtype.is_floating_point and b.dtype.is_floating_point:
        return torch.equal(a.to(torch.float64), b.to(torch.float64))
    return False


__all__ = ["CanonParam", "ExtractionPlan", "Piece", "canonical_params", "plan_extraction", "same_values"]
