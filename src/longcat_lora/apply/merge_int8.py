"""Merging LoRAs into LongCat's INT8 checkpoints (the official `base_model_int8/` layout, which
int8_layout.py reads and validates): the entries of each shard and the requantizing arithmetic behind them.

Two outputs (`merge_checkpoint` decides by `dtype`):

- **requantized** (`--dtype keep`, the default): the same layout. Each adapted layer is computed as
  `W' = weight_int8 * weight_scale + sum strength * dW`, each element the correctly rounded float32
  value of that exact sum (exact.py), row chunk by row chunk, and requantized per row with the
  official scheme (`int8.quantize_rows`: a new scale per row). The bytes depend only on the inputs. Every key, dtype, shape, shard name
  and the index stay as they were; untouched tensors are copied byte for byte. The requantization
  error of each layer (relative Frobenius error of `dequant(q', s')` against the fp32 `W'`, and the
  worst element error in units of its row's new scale) goes into the report.
- **dequantized** (`--dtype bf16|fp16|fp32`): ordinary `<m>.weight` keys in that dtype (each element
  the exact sum correctly rounded to it) in place of
  `weight_int8`/`weight_scale`, every other float tensor cast, shards and index renamed from
  `quantized_model*` to diffusers' `diffusion_pytorch_model*` (what the non-INT8 loader reads), the
  index's weight_map and total_size rewritten, `quantization_config.json` not copied.

Memory: `weight_int8` and `weight_scale` of one layer come from one computation but are two tensors,
maybe in two shards, in any order (files written by `safetensors` put all F32 tensors before the I8
ones). Within a shard, an adapted layer's `weight_scale` is written right after its `weight_int8`, so
each layer is computed once and only its new scale (out x 4 bytes) waits to be written. When the two
lie in different shards and the scale's shard is written first, the layer is computed when the scale
is written (its int8 result dropped) and again when its int8 is; the two scales must agree bit for bit
(they do: same inputs, same code), or the merge stops. So at most one layer is held at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import LoraError
from .exact import ExactMerge, NotFinite, Scratch, Term
from .int8 import quantize_rows
from .int8_layout import INT8, PLAIN_STEM, QUANT_CONFIG, SCALE, Int8Layer, plain_name, shard_path, split_name
from ..io.dtypes import ITEMSIZE, torch_dtype
from ..io.writer import Entry
from ..io.reader import SafeFile

if TYPE_CHECKING:
    from .base_checkpoint import Base
    from .targets import Target

CHUNK_ELEMENTS = 1 << 19  # float64 elements per row chunk (4 MiB), as in merge_compute.py


@dataclass(frozen=True)
class Requant:
    """Requantization error of one merged INT8 layer."""

    rel: float  # ||dequant(q', s') - W'||_F / ||W'||_F, W' the merged weight in fp32
    steps: float  # worst |dequant(q', s') - W'| element, in units of its row's new scale (<= 0.5)


class Int8Merge:
    """Entries for the shards of an INT8 base, and the report of what was requantized."""

    def __init__(self, b: Base, layers: dict[str, Int8Layer], adds: dict[str, list[tuple[Target, float]]],
                 out_dtype: str | None, device: str):
        self.b, self.layers, self.adds = b, layers, adds  # adds: layer -> [(target, strength)]
        self.out_dtype, self.device = out_dtype, device
        self.report: dict[str, Requant] = {}
        self._pending: dict[str, torch.Tensor] = {}  # layer -> new scale, int8 written, scale not yet
        self._early: dict[str, torch.Tensor] = {}  # layer -> new scale written before its int8
        self._raw = torch.empty(0, dtype=torch.uint8)
        self._f64 = torch.empty(0, dtype=torch.float64, device=device)
        self._f32 = torch.empty(0, dtype=torch.float32, device=device)
        self._scratch = Scratch()
        self._err = torch.empty(0, dtype=torch.float32, device=device)
        self._out = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
        self._turn = 0

    # ------------------------------------------------------------------ planning

    def check_names(self) -> None:
        """A dequantized directory renames shards and index: refuse if that collides with another file."""
        if self.out_dtype is None or not self.b.directory:
            return
        renamed = {plain_name(n) for n in [*self.b.shards, self.b.index_name or ""] if plain_name(n) != n}
        for entry in os.listdir(self.b.path):
            if entry in renamed and entry not in self.b.shards and entry != self.b.index_name:
                raise LoraError(f"{os.path.join(self.b.path, entry)}: a dequantized output names a shard "
                                f"{entry}; this base already holds a file of that name")

    def out_shard(self, shard: str) -> str:
        return plain_name(shard) if self.out_dtype is not None else shard

    def entries(self, shard: str, sf: SafeFile, plain: Callable[[str], Entry]) -> list[Entry]:
        """This shard's entries in input order, except that an adapted layer's weight_scale follows its
        weight_int8 when both are in this shard; `plain(name)` makes the entry of any other tensor."""
        out: list[Entry] = []
        for name in sorted(sf.keys(), key=lambda k: sf.info(k).start):
            layer, kind = split_name(name)
            if layer not in self.layers:
                out.append(plain(name))
            elif self.out_dtype is not None:  # dequantized: <m>.weight where <m>.weight_int8 was
                if kind == INT8:
                    out.append(Entry(layer + ".weight", self.out_dtype, self.layers[layer].shape,
                                     lambda layer=layer: self._dequantized(layer)))
            elif layer not in self.adds:
                out.append(plain(name))
            elif kind == INT8:
                out.append(Entry(name, "I8", self.layers[layer].shape, lambda layer=layer: self._int8(layer)))
                if self.layers[layer].s_shard == shard:  # its scale follows at once
                    out.append(self._scale_entry(layer))
            elif self.layers[layer].q_shard != shard:
                out.append(self._scale_entry(layer))
        return out

    def _scale_entry(self, layer: str) -> Entry:
        return Entry(layer + SCALE, "F32", self.layers[layer].shape[:1], lambda: self._scale(layer))

    # ------------------------------------------------------------------ producers

    def _int8(self, layer: str) -> np.ndarray:
        q, s = self._requantized(layer)
        early = self._early.pop(layer, None)
        if early is None:
            self._pending[layer] = s
        elif not torch.equal(early.view(torch.int32), s.view(torch.int32)):
            raise RuntimeError(f"{layer}: recomputing the merged weight gave other scales (non-deterministic "
                               f"arithmetic on this device)")
        return q

    def _scale(self, layer: str) -> np.ndarray:
        s = self._pending.pop(layer, None)
        if s is None:  # the scale's shard comes first: compute now, again for the int8 weight
            _, s = self._requantized(layer)
            self._early[layer] = s
        return s.numpy().view(np.uint8)

    def _requantized(self, layer: str) -> tuple[np.ndarray, torch.Tensor]:
        """(new weight_int8 bytes, new weight_scale) of one layer; records its error."""
        rows, cols = self.layers[layer].shape
        out = self._buffer(rows * cols).view(torch.int8).view(rows, cols)
        scale = torch.empty(rows, dtype=torch.float32)
        err2 = ref2 = steps = 0.0
        for r0, r1, w in self._merged_rows(layer, "F32", None):
            q, s = quantize_rows(w)
            out[r0:r1].copy_(q)
            scale[r0:r1].copy_(s)
            # error q * s - W' in fp32, in place in a reused buffer (float64 temporaries cost more than the
            # merge): good to ~1e-5 of a step, far below the figures reported
            e = self._scratch_buf(w.numel(), w.device).view_as(w)
            e.copy_(q).mul_(s[:, None]).sub_(w)
            err2 += float(torch.linalg.vector_norm(e)) ** 2
            ref2 += float(torch.linalg.vector_norm(w)) ** 2
            if e.numel():  # whole-chunk reductions: far cheaper here than per-row ones
                steps = max(steps, float(torch.linalg.vector_norm(e.div_(s[:, None]), float("inf"))))
        rel = (err2 ** 0.5 / ref2 ** 0.5) if ref2 else (0.0 if err2 == 0 else float("inf"))
        self.report.setdefault(layer, Requant(rel, steps))
        return out.view(torch.uint8).reshape(-1).numpy(), scale

    def _dequantized(self, layer: str) -> np.ndarray:
        """weight_int8 * weight_scale (+ the LoRAs, if any), each element correctly rounded to the output dtype."""
        rows, cols = self.layers[layer].shape
        dt = self.out_dtype
        assert dt is not None
        nbytes = rows * cols * ITEMSIZE[dt]
        out = self._buffer(nbytes).view(torch_dtype(dt)).view(rows, cols)
        dev_out = out if self.device == "cpu" else torch.empty(rows, cols, dtype=out.dtype, device=self.device)
        for _ in self._merged_rows(layer, dt, dev_out):
            pass
        if dev_out is not out:
            out.copy_(dev_out)
        return out.view(torch.uint8).reshape(-1).numpy()

    def _scratch_buf(self, n: int, device) -> torch.Tensor:
        if self._err.numel() < n or self._err.device != device:
            self._err = torch.empty(n, dtype=torch.float32, device=device)
        return self._err[:n]

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """One of two alternating output buffers (the write pipeline is at most one tensor deep)."""
        k = self._turn = 1 - self._turn
        if self._out[k].numel() < nbytes:
            self._out[k] = torch.empty(nbytes, dtype=torch.uint8)
        return self._out[k][:nbytes]

    def _merged_rows(self, layer: str, dtype: str, into: torch.Tensor | None):
        """Yield (r0, r1, W'[r0:r1]) by row chunk: `weight_int8 * weight_scale + sum strength * scale * up @ down`,
        each element correctly rounded to `dtype`, written into rows of `into` (on the device), or into a
        reused float32 chunk (valid until the next one) when `into` is None (dtype F32)."""
        info = self.layers[layer]
        rows, cols = info.shape
        qf = self.b.shards[info.q_shard]
        if self._raw.numel() < rows * cols:
            self._raw = torch.empty(rows * cols, dtype=torch.uint8)
        raw = self._raw[:rows * cols]
        qf.read_into(layer + INT8, memoryview(raw.numpy()))
        q_host = raw.view(torch.int8).view(rows, cols)
        s_host = self.b.shards[info.s_shard].read(layer + SCALE).to(torch.float64)
        q = q_host.to(self.device)
        s = s_host.to(self.device)
        terms = [Term(p.rows, p.up.load().double(), p.down.load().double(), strength, p.scale)
                 for t, strength in self.adds.get(layer, []) for p in t.parts()]
        merge = ExactMerge(terms, rows, cols, dtype, device=self.device)

        def base(r: np.ndarray, c: np.ndarray) -> np.ndarray:  # q * s is exact in float64 (8 x 24 bits)
            rr, cc = torch.from_numpy(r), torch.from_numpy(c)
            return (q_host[rr, cc].double() * s_host[rr]).numpy()

        step = max(1, CHUNK_ELEMENTS // max(cols, 1))
        if self._f64.numel() < step * cols:
            self._f64 = torch.empty(step * cols, dtype=torch.float64, device=self.device)
        if into is None and self._f32.numel() < step * cols:
            self._f32 = torch.empty(step * cols, dtype=torch.float32, device=self.device)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            w = self._f64[:(r1 - r0) * cols].view(r1 - r0, cols)
            w.copy_(q[r0:r1]).mul_(s[r0:r1, None])  # the exact dequantized weight
            dst = into[r0:r1] if into is not None else self._f32[:(r1 - r0) * cols].view(r1 - r0, cols)
            try:
                merge.chunk(w, r0, r1, dst, base, self._scratch)
            except NotFinite:
                what = "merging" if self.adds.get(layer) else "dequantizing"
                raise LoraError(f"{shard_path(self.b, layer + INT8)}: {what} gives non-finite values in "
                                f"{layer + INT8} (as {dtype})") from None
            yield r0, r1, dst

    # ------------------------------------------------------------------ side files and summary

    def copy_rest(self, tmp: str, copy_entry: Callable[[str, str], None]) -> None:
        """A dequantized directory's other files: the index rewritten and renamed, quantization_config.json
        left out, every other entry copied with `copy_entry(src, dst)` (merge's side-file copy)."""
        b = self.b
        for entry in os.listdir(b.path):
            if entry in b.shards or entry == QUANT_CONFIG:
                continue
            if entry == b.index_name and b.index is not None:
                self._write_index(os.path.join(tmp, plain_name(entry)))
            else:
                copy_entry(os.path.join(b.path, entry), os.path.join(tmp, entry))

    def _write_index(self, dst: str) -> None:
        assert self.b.index is not None and self.out_dtype is not None
        weight_map: dict[str, str] = {}
        total = 0
        for name, shard in self.b.index["weight_map"].items():
            layer, kind = split_name(name)
            shape = None
            if layer in self.layers:
                if kind != INT8:
                    continue
                name, shape = layer + ".weight", self.layers[layer].shape
            weight_map[name] = plain_name(shard)
            info = self.b.shards[shard].info(name if shape is None else layer + INT8)
            dt = self.out_dtype if (shape is not None or info.dtype in ("F16", "BF16", "F32", "F64")) else info.dtype
            total += int(np.prod(info.shape, dtype=np.int64)) * ITEMSIZE[dt]
        index = json.loads(json.dumps(self.b.index))
        index["weight_map"] = weight_map
        meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
        index["metadata"] = {**meta, "total_size": total}
        with open(dst, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")

    def summary(self) -> str:
        """One line: what happened to the INT8 layers (and the worst requantization error)."""
        if self.out_dtype is not None:
            dt = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}[self.out_dtype]
            what = f"dequantized {len(self.layers)} INT8 weights to {dt} (ordinary .weight keys"
            if self.b.directory:
                what += f", {PLAIN_STEM} shard names; {QUANT_CONFIG} not copied"
            return what + ")"
        if not self.report:
            return "no INT8 weight adapted"
        worst = max(self.report, key=lambda k: (self.report[k].rel, k))
        far = max(self.report, key=lambda k: (self.report[k].steps, k))
        return (f"requantized {len(self.report)} INT8 weights; worst relative error {self.report[worst].rel:.1e} "
                f"at {worst} (worst element {self.report[far].steps:.2f} steps, at {far})")


__all__ = ["Requant", "Int8Merge"]
