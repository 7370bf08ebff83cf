"""LongCat-Video's native LoRA format (what the official repo ships and loads).

Keys: `lora___lorahyphen___` + module path with `.` -> `___lorahyphen___`, then `.lora_down.weight`
[n*r, in], `.lora_up.weight` [out, r] (n = 1) or `.lora_up.blocks.{i}.weight` [out/n, r], and
`.alpha_scale` (alpha / r). Up block i reads rows i*r:(i+1)*r of the down output.
"""

from __future__ import annotations

import re
from collections import defaultdict

from ..model import naming
from ..model.adapter import LoraAdapter, Naming, Part
from ..model.layout import native_blocks
from ..errors import LoraError, q
from ..io.writer import Entry, write_safetensors
from ..io.reader import SafeFile
from ._common import (WriteOptions, add_part, entry, exact_dtype, finish, in_file_order, metadata, placement,
                      refuse_unknown, scalar, scalar_entry, weight)
from .base import Format

NAME = "longcat"
PREFIX = "lora___lorahyphen___"
SEP = "___lorahyphen___"
_TENSOR = re.compile(r"^(lora_down\.weight|lora_up\.weight|alpha_scale|lora_up\.blocks\.(\d+)\.weight)$")


def encode(module: str) -> str:
    return PREFIX + module.replace(".", SEP)


def owns_key(key: str) -> bool:
    return key.startswith(PREFIX)


def read(sf: SafeFile) -> LoraAdapter:
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    for key in sf.keys():
        if not key.startswith(PREFIX):
            raise LoraError(f"{sf.path}: unexpected tensor {key!r} in a LongCat native LoRA file")
        enc, dot, tname = key[len(PREFIX):].partition(".")
        if not dot or not enc or not _TENSOR.match(tname):
            raise LoraError(f"{sf.path}: unexpected tensor {key!r} (not lora_down/lora_up/alpha_scale)")
        groups[enc.replace(SEP, ".")][tname] = key
    adapter = LoraAdapter({}, NAME, sf.path, files=[sf])
    scale_dtypes = set()
    missing_alpha = []
    for module, tensors in groups.items():
        if "lora_down.weight" not in tensors:
            raise LoraError(f"{sf.path}: module {q(module)} has no lora_down.weight")
        down = weight(sf, tensors["lora_down.weight"])
        blocks: dict[int, str] = {}
        for t, k in tensors.items():
            if t.startswith("lora_up.blocks."):
                digits = _TENSOR.match(t).group(2)
                if len(digits) > 9 or not digits.isascii():
                    raise LoraError(f"{sf.path}: tensor {k!r}: up block index {digits[:20]!r} is out of range")
                i = int(digits)
                if i in blocks:
                    raise LoraError(f"{sf.path}: module {q(module)}: tensors {blocks[i]!r} and {k!r} are both up block {i}")
                blocks[i] = k
        if "lora_up.weight" in tensors and blocks:
            raise LoraError(f"{sf.path}: module {q(module)} has both lora_up.weight and lora_up.blocks.*")
        if "lora_up.weight" in tensors:
            ups = [weight(sf, tensors["lora_up.weight"])]
        elif blocks:
            n = len(blocks)
            if sorted(blocks) != list(range(n)):
                gaps = [i for i in range(n) if i not in blocks]  # n blocks: some index is >= n
                raise LoraError(f"{sf.path}: module {q(module)} is missing up block(s) {gaps} "
                                f"(has {sorted(blocks)})")
            ups = [weight(sf, blocks[i]) for i in range(n)]
        else:
            raise LoraError(f"{sf.path}: module {q(module)} has no lora_up weight")
        n = len(ups)
        h, r = ups[0].shape
        for i, u in enumerate(ups):
            if u.shape != (h, r):
                raise LoraError(f"{sf.path}: module {q(module)}: up block {i} is {list(u.shape)}, "
                                f"block 0 is {[h, r]} (inconsistent shapes)")
        if down.shape[0] != n * r:
            raise LoraError(f"{sf.path}: module {q(module)}: lora_down has {down.shape[0]} rows but "
                            f"{n} up block(s) of rank {r} need {n * r} (inconsistent rank)")
        if "alpha_scale" in tensors:
            scale, dt = scalar(sf, tensors["alpha_scale"])
            scale_dtypes.add(dt)
        else:
            scale = 1.0
            missing_alpha.append(module)
        name, split, nsplit, naming_, _ = placement(adapter, module)
        base = split * n * h  # a layer of another scheme (a split q of qkv, say) takes its rows of the module
        for i in range(n):
            add_part(adapter, sf.path, module, name, split, nsplit, naming_, n * h, down.shape[1],
                     Part((base + i * h, base + (i + 1) * h), down.rows(i * r, (i + 1) * r), ups[i], scale))
    if missing_alpha:
        adapter.notes.append(f"{len(missing_alpha)} modules have no alpha_scale: 1.0 assumed "
                             f"(e.g. {q(missing_alpha[0])})")
    if len(scale_dtypes) == 1:
        adapter.scale_dtype = scale_dtypes.pop()
    return finish(adapter, sf.path)


def write(adapter: LoraAdapter, path: str, opts: WriteOptions) -> None:
    out: list[Entry] = []
    scales: list[Entry] = []
    refuse_unknown(adapter, opts)
    for m in in_file_order(adapter):
        if m.naming is not Naming.LONGCAT:
            continue
        if SEP in m.name or not m.name:  # would read back as another module (or none)
            raise LoraError(f"module {q(m.name)}: the native format cannot name it ({SEP!r} stands for '.')")
        found = naming.kind_of(m.name)
        down, ups, scale = native_blocks(m, found[0].chunks if found else 1)
        base = encode(m.name)
        out.append(entry(f"{base}.lora_down.weight", down, opts, m.name))
        if len(ups) == 1:
            out.append(entry(f"{base}.lora_up.weight", ups[0], opts, m.name))
        else:
            out += [entry(f"{base}.lora_up.blocks.{i}.weight", u, opts, m.name) for i, u in enumerate(ups)]
        dt = exact_dtype(scale, adapter.scale_dtype or down.dtype)
        scales.append(scalar_entry(f"{base}.alpha_scale", scale, dt))
    write_safetensors(path, out + scales, metadata(adapter), opts.progress)


FORMAT = Format(NAME, owns_key, read, write)
