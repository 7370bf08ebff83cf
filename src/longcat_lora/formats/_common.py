"""Helpers every format module shares: tensor checks, scalar reads, standard (A/B/alpha) layers."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

from ..model import naming
from ..model.adapter import LoraAdapter, LoraModule, Naming, Part, validate_module
from ..model.layout import split_diagonal, standard_layer
from ..model.sources import FileTensor, NonFinite, Source
from ..errors import LoraError, Param, UnmappedModulesError, q
from ..io.jsonsafe import field as json_field, is_int, is_number, type_name
from .patterns import PatternTable
from ..io.dtypes import FLOATS, INTS, decode_scalar, encode_scalar, representable
from ..io.writer import Entry
from ..io.reader import SafeFile, nonfinite_check


@dataclass
class WriteOptions:
    skip_unmapped: bool = False
    skipped: list[str] = field(default_factory=list)  # filled in by writers: modules left out
    progress: Callable[[int], None] | None = None  # called with bytes written


def in_file_order(adapter: LoraAdapter) -> list[LoraModule]:
    """Modules in the order their first tensor lies in the input (name order otherwise).

    Writers emit each module's down/A tensors, then its up/B tensors, in this order and put the small
    scalars last, so tensors copied unchanged lie back to back in input and output alike and go out in
    a few large copies instead of one per tensor.
    """
    def key(m: LoraModule) -> tuple[int, str]:
        where = m.given[0].down.file_range() if m.given else None
        return (where[1].offset if where else 1 << 62, m.name)

    return sorted(adapter.modules.values(), key=key)


def weight(sf: SafeFile, key: str) -> FileTensor:
    """A lazy 2-D float weight; anything else is refused by name."""
    info = sf.info(key)
    if info.dtype not in FLOATS:
        raise LoraError(f"{sf.path}: tensor {key!r} has dtype {info.dtype}; LoRA weights must be F16, BF16, "
                        f"F32 or F64")
    if len(info.shape) != 2:
        raise LoraError(f"{sf.path}: tensor {key!r} has shape {list(info.shape)}; LoRA weights must be 2-D")
    if 0 in info.shape:
        raise LoraError(f"{sf.path}: tensor {key!r} is empty (shape {list(info.shape)})")
    return FileTensor(sf, key)


def scalar(sf: SafeFile, key: str) -> tuple[float, str]:
    """A finite scalar (shape [] or [1]) such as alpha_scale or lora_alpha, and its dtype."""
    info = sf.info(key)
    if info.dtype not in FLOATS and info.dtype not in INTS:
        raise LoraError(f"{sf.path}: tensor {key!r} has dtype {info.dtype}; expected a number")
    if info.shape not in ((), (1,)):
        raise LoraError(f"{sf.path}: tensor {key!r} has shape {list(info.shape)}; expected a scalar")
    value = decode_scalar(sf.read_raw(key).tobytes(), info.dtype)
    if not math.isfinite(value):
        raise LoraError(f"{sf.path}: tensor {key!r} is {value}; expected a finite number")
    return value, info.dtype


def entry(name: str, src: Source, opts: WriteOptions, module: str) -> Entry:
    """An output tensor; a NaN/Inf its source refuses (see `LoraAdapter.refusing_nonfinite`) names the module.

    Bytes that lie unchanged in an input file are copied file-to-file (copy_file_range), their bits
    scanned while refusing in the same pass as the copy (`FileRange.check`), never converted; anything
    else is produced as bytes by its source.
    """

    def refuse() -> None:
        raise NonFinite(f"module {q(module)}: non-finite values (NaN/Inf) in its LoRA weights")

    def produce():
        where = src.file_range()
        if where is None:
            return checked(src.chunks())
        tensor, rng = where
        if not tensor.refuse_nonfinite:
            return rng
        # scanned in the same pass as the kernel copies it (io.writer._Copier), not in a pass before
        return replace(rng, check=nonfinite_check(tensor.dtype, refuse))

    def checked(chunks):
        try:
            yield from chunks
        except NonFinite:
            refuse()

    return Entry(name, src.dtype, tuple(src.shape), produce)


def scalar_entry(name: str, value: float, dtype: str) -> Entry:
    data = encode_scalar(value, dtype)
    return Entry(name, dtype, (), lambda: data)


def exact_dtype(value: float, preferred: str) -> str:
    """`preferred` if it holds value exactly, else F32 if that does, else F64."""
    for dt in (preferred, "F32"):
        if dt in FLOATS and representable(value, dt):
            return dt
    return "F64"


SCALE_DTYPE_KEY = "longcat_lora.alpha_scale_dtype"


def metadata(adapter: LoraAdapter, **extra: str) -> dict[str, str]:
    """safetensors metadata for an output; records the native alpha_scale dtype so that
    native -> X -> native gives back the same dtypes."""
    meta = {"format": "pt", **extra}
    if adapter.scale_dtype:
        meta[SCALE_DTYPE_KEY] = adapter.scale_dtype
    return meta


def finish(adapter: LoraAdapter, where: str) -> LoraAdapter:
    if adapter.scale_dtype is None:
        for f in adapter.files:
            dt = f.metadata.get(SCALE_DTYPE_KEY)
            if dt in FLOATS:
                adapter.scale_dtype = dt
    if not adapter.modules:
        raise LoraError(f"{where}: no LoRA modules found")
    for m in adapter.modules.values():
        validate_module(m, where)
    return adapter


def unmapped(modules: list[str], opts: WriteOptions, target: str) -> None:
    if modules and not opts.skip_unmapped:
        raise UnmappedModulesError((f"{len(modules)} modules have no name in {target} (pass ", Param("skip_unmapped"),
                                    " to leave them out)"), sorted(modules))
    opts.skipped.extend(sorted(modules))


# ------------------------------------------------------------------ standard A/B/alpha layers

_STANDARD = re.compile(r"\.lora_(A|B|alpha)(\.weight)?$")


def standard_key(key: str) -> bool:
    """Whether a key names a standard tensor: `.lora_A`, `.lora_B` or `.lora_alpha`, each with or without `.weight`."""
    return _STANDARD.search(key) is not None


@dataclass
class StdKeys:
    a: str | None = None
    b: str | None = None
    alpha: str | None = None


def group_keys(sf: SafeFile, patterns: list[tuple[re.Pattern[str], str]], what: str) -> dict[str, StdKeys]:
    """Group keys into layers by the (regex with a 'layer' group, role) patterns; refuse strays."""
    layers: dict[str, StdKeys] = {}
    for key in sf.keys():
        for rx, role in patterns:
            m = rx.match(key)
            if m:
                keys = layers.setdefault(m.group("layer"), StdKeys())
                if getattr(keys, role) is not None:
                    what = {"a": "the down/A matrix", "b": "the up/B matrix", "alpha": "the alpha"}[role]
                    raise LoraError(f"{sf.path}: tensors {getattr(keys, role)!r} and {key!r} both give "
                                    f"{what} of layer {q(m.group('layer'))}")
                setattr(keys, role, key)
                break
        else:
            raise LoraError(f"{sf.path}: unexpected tensor {key!r} in a {what} file")
    for layer, keys in layers.items():
        if keys.a is None or keys.b is None:
            missing = "down/A" if keys.a is None else "up/B"
            raise LoraError(f"{sf.path}: layer {q(layer)} has no {missing} matrix")
    return layers


def add_standard_layer(modules: dict[str, LoraModule], sf: SafeFile, layer: str, keys: StdKeys,
                       scale_of: Callable[[int], float], naming_: Naming) -> None:
    """Add one A/B layer to `modules`, mapped to its LongCat module (splits and block-diagonals undone).

    FastVideo layer names are recognised in every format; a name the table does not know keeps the
    format's own naming (`naming_`: LONGCAT, or FASTVIDEO for FastVideo files)."""
    a, b = weight(sf, keys.a), weight(sf, keys.b)
    if b.shape[1] != a.shape[0]:
        raise LoraError(f"{sf.path}: layer {q(layer)}: up/B {list(b.shape)} and down/A {list(a.shape)} "
                        f"disagree on rank")
    scale = scale_of(a.shape[0])
    name, split, nsplit = layer, 0, 1
    mapped = naming.from_fastvideo(layer)
    if mapped is not None:
        name, split, nsplit = mapped
        naming_ = Naming.LONGCAT
    elif naming.kind_of(layer) is not None:
        naming_ = Naming.LONGCAT
    found = naming.kind_of(name) if naming_ is Naming.LONGCAT else None
    chunks = found[0].chunks // nsplit if found and found[0].chunks % nsplit == 0 else 1
    h = b.shape[0]
    m = modules.get(name)
    if m is None:
        m = modules[name] = LoraModule(name, nsplit * h, a.shape[1], [], naming_)
    elif m.out_features != nsplit * h:
        raise LoraError(f"{sf.path}: layer {q(layer)} has {h} outputs but the other parts of {q(name)} "
                        f"imply {m.out_features // nsplit}")
    m.add(Part((split * h, (split + 1) * h), a, b, scale), partial(split_diagonal, hint=chunks))


@dataclass
class LayerInfo:
    module: str
    rank: int
    alpha: float  # scale * rank


def standard_entries(adapter: LoraAdapter, opts: WriteOptions, a_key: Callable[[str], str],
                     b_key: Callable[[str], str], target: str) -> tuple[list[Entry], list[LayerInfo]]:
    """One standard LoRA per module in LongCat naming (block-diagonal up matrix where it has parts)."""
    unmapped([m.name for m in adapter.modules.values() if m.naming is not Naming.LONGCAT], opts, target)
    out, infos = [], []
    for m in in_file_order(adapter):
        if m.naming is not Naming.LONGCAT:
            continue
        std = standard_layer(m, 0, m.out_features)
        out.append(entry(a_key(m.name), std.a, opts, m.name))
        out.append(entry(b_key(m.name), std.b, opts, m.name))
        infos.append(LayerInfo(m.name, std.rank, std.scale * std.rank))
    return out, infos


def peft_config(infos: list[LayerInfo]) -> dict:
    """A PEFT LoraConfig dict: most common rank/alpha as defaults, full-path patterns for the rest."""
    r = Counter(i.rank for i in infos).most_common(1)[0][0]
    alpha = Counter(i.alpha for i in infos).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": _num(alpha),
        "target_modules": [i.module for i in infos],
        "rank_pattern": {i.module: i.rank for i in infos if i.rank != r},
        "alpha_pattern": {i.module: _num(i.alpha) for i in infos if i.alpha != alpha},
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }


def _num(x: float) -> float | int:
    return int(x) if x == int(x) and abs(x) < 2**53 else x


def peft_scales(config: dict, where: str) -> Callable[[str, int], float]:
    """module, tensor rank -> scale, resolving rank/alpha patterns exactly as PEFT does.

    Every field used is type-checked (`r` a positive integer, `lora_alpha` a finite number, booleans
    never numbers, patterns maps of such values), and patterns are matched in bounded time
    (`patterns.PatternTable`): a malformed config is a LoraError naming the field, never a crash.
    """
    peft_type = json_field(config, "peft_type", lambda v: isinstance(v, str), "a string", where, "LORA")
    if peft_type.upper() != "LORA":
        raise LoraError(f"{where}: peft_type {peft_type!r} is not LORA")
    for flag in ("use_dora", "use_rslora"):
        json_field(config, flag, lambda v: isinstance(v, bool), "true or false", where)
    if config.get("use_dora"):
        raise LoraError(f"{where}: use_dora adapters are not plain LoRAs and cannot be converted")
    json_field(config, "target_modules", lambda v: isinstance(v, str) or (isinstance(v, list) and all(
        isinstance(x, str) for x in v)), "a string or a list of strings", where)
    positive = (lambda v: is_int(v) and v > 0)
    r0 = json_field(config, "r", positive, "a positive integer", where, 8)
    a0 = json_field(config, "lora_alpha", is_number, "a finite number", where, 8)
    tables = []
    for name, check, expected in (("rank_pattern", positive, "positive integers"),
                                  ("alpha_pattern", is_number, "finite numbers")):
        pats = json_field(config, name, lambda v: isinstance(v, dict), "an object (module -> value)", where, {})
        for k, v in pats.items():
            if not check(v):
                raise LoraError(f"{where}: {name}[{k[:80]!r}] must be one of {expected}, not {type_name(v)} "
                                f"{str(v)[:40]}")
        tables.append(PatternTable(pats, where, name))
    rank_pattern, alpha_pattern = tables
    rslora = bool(config.get("use_rslora"))

    def scale(module: str, rank: int) -> float:
        r = rank_pattern.lookup(module)
        r = r0 if r is None else r
        a = alpha_pattern.lookup(module)
        a = float(a0 if a is None else a)
        if r != rank:
            raise LoraError(f"{where}: module {module!r} has rank {rank} but the config says r={r}")
        return a / math.sqrt(r) if rslora else a / r

    return scale
