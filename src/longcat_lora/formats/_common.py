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
from ..model.sources import folded, negated
from ..model.sources import FileTensor, NonFinite, Source
from ..errors import LoraError, Param, UnknownModulesError, UnmappedModulesError, q
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
    raw = sf.read_raw(key).tobytes()
    value = decode_scalar(raw, info.dtype)
    if info.dtype in INTS and int.from_bytes(raw, "little", signed=info.dtype.startswith("I")) != value:
        raise LoraError(f"{sf.path}: tensor {key!r} holds an integer a float64 cannot hold exactly")
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
    """Refuse (unless skip_unmapped, which lists them in opts.skipped) modules the target cannot name."""
    if modules and not opts.skip_unmapped:
        raise UnmappedModulesError((f"{len(modules)} modules have no name in {target} (pass ", Param("skip_unmapped"),
                                    " to leave them out)"), sorted(modules))
    opts.skipped.extend(sorted(modules))


def refuse_unknown(adapter: LoraAdapter, opts: WriteOptions) -> None:
    """Modules of no LongCat model are never written: refused, or left out and listed with skip_unmapped."""
    unknown = sorted(m.name for m in adapter.modules.values() if m.naming is Naming.UNKNOWN)
    if unknown and not opts.skip_unmapped:
        raise UnknownModulesError(unknown)
    opts.skipped.extend(unknown)


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


def placement(adapter: LoraAdapter, layer: str, underscored: bool = False) -> tuple[str, int, int, Naming, int]:
    """Where a file's layer lands: (module name, split, splits, naming, native up blocks per split).

    Names in every scheme of the naming table are recognised (LongCat's, FastVideo's, the wrapper's
    Wan-style ones; with `underscored`, kohya's dots-as-underscores form of any of them). A name no scheme
    knows is kept as read (`Naming.UNKNOWN`): such a module is never written, merged or applied. The
    schemes seen are counted in `adapter.schemes`."""
    found = naming.resolve_underscored(layer) if underscored else naming.resolve(layer)
    if found is None:
        adapter.schemes["unknown"] = adapter.schemes.get("unknown", 0) + 1
        return layer, 0, 1, Naming.UNKNOWN, 1
    label = "kohya" if underscored else (next(iter(found.schemes)).value if len(found.schemes) == 1 else "shared")
    adapter.schemes[label] = adapter.schemes.get(label, 0) + 1
    chunks = found.kind.chunks // found.nsplit if found.kind.chunks % found.nsplit == 0 else 1
    return found.module, found.split, found.nsplit, Naming.LONGCAT, chunks


def add_part(adapter: LoraAdapter, where: str, layer: str, name: str, split: int, nsplit: int, naming_: Naming,
             part_rows: int, in_features: int, part: Part, refine=None) -> None:
    """Add a layer's part at rows split*part_rows of module `name` (made with nsplit*part_rows outputs);
    refuses a layer whose size disagrees with the module's other parts, or whose rows another layer of
    the file already adapts (two names for one weight, e.g. `self_attn.to_q` beside `attn.qkv`)."""
    m = adapter.modules.get(name)
    if m is None:
        m = adapter.modules[name] = LoraModule(name, nsplit * part_rows, in_features, [], naming_)
    elif m.out_features != nsplit * part_rows:
        raise LoraError(f"{where}: layer {q(layer)} has {part_rows} outputs but the other parts of {q(name)} "
                        f"imply {m.out_features // nsplit}")
    lo, hi = part.rows
    for other in m.given:
        if other.rows[0] < hi and lo < other.rows[1]:
            raise LoraError(f"{where}: layer {q(layer)} adapts rows {lo}:{hi} of {q(name)}, which another layer "
                            f"of the file adapts too (rows {other.rows[0]}:{other.rows[1]}: two names for one weight)")
    m.add(part, refine)


def add_standard_layer(adapter: LoraAdapter, sf: SafeFile, layer: str, keys: StdKeys,
                       scale_of: Callable[[int], float], underscored: bool = False) -> None:
    """Add one A/B layer to the adapter, mapped to its LongCat module (splits and block-diagonals undone;
    see `placement` for the names recognised)."""
    a, b = weight(sf, keys.a), weight(sf, keys.b)
    if b.shape[1] != a.shape[0]:
        raise LoraError(f"{sf.path}: layer {q(layer)}: up/B {list(b.shape)} and down/A {list(a.shape)} "
                        f"disagree on rank")
    scale = scale_of(a.shape[0])
    name, split, nsplit, naming_, chunks = placement(adapter, layer, underscored)
    h = b.shape[0]
    add_part(adapter, sf.path, layer, name, split, nsplit, naming_, h, a.shape[1],
             Part((split * h, (split + 1) * h), a, b, scale), partial(split_diagonal, hint=chunks))


def exact_alpha(scale: float, rank: int, positive: bool = True) -> float | None:
    """The alpha to write for a scale, read back by loaders as alpha / rank: one with alpha / rank == scale
    exactly in float64 where there is one (a neighbour of scale * rank, when that product rounded), else
    scale * rank (within one float64 ulp of the scale: 1.1e-16, far below any storage rounding, where
    folding the scale into the up matrix would cost a float32 rounding). Positive when asked (kohya-style
    loaders: an alpha of 0 means "no alpha" to some): None for a scale that is not (the writer then writes
    a negative scale on the negated up matrix, exactly, or folds it)."""
    if not math.isfinite(scale) or (positive and not scale > 0):
        return None
    alpha = scale * rank
    for candidate in (alpha, math.nextafter(alpha, 0.0), math.nextafter(alpha, math.copysign(math.inf, alpha))):
        if (candidate > 0 or not positive) and candidate / rank == scale:
            return candidate
    return alpha


@dataclass
class LayerInfo:
    module: str  # the layer's name in the output
    rank: int
    alpha: float  # scale * rank


def layer_entries(adapter: LoraAdapter, opts: WriteOptions, scheme: naming.Scheme, a_key: Callable[[str], str],
                  b_key: Callable[[str], str], alpha_for: Callable[[float, int], float | None],
                  target: str) -> tuple[list[Entry], list[LayerInfo]]:
    """Standard LoRA layers (A/down, B/up, an alpha) for every module, named in `scheme`.

    A module becomes one layer per name the scheme has for it (`naming.layers`: the wrapper's and
    FastVideo's split q/k/v take their rows of the module, each its slice of the down matrix and its up
    block); several parts on one layer become one LoRA of summed rank with a block-diagonal up matrix.
    `alpha_for(scale, rank)` is the alpha the target's loader needs for that scale, or None when no
    alpha gives it exactly: then a negative scale whose magnitude has an alpha is written as that alpha
    on the negated up matrix (exact), and any other scale is folded into the up matrix (one rounding of
    float32 or wider) with alpha = rank. Entries come per module, down/A matrices first, in input-file order (see
    `in_file_order`); unknown modules are refused and modules the scheme cannot name are refused as
    unmapped into `target` (both left out and listed with skip_unmapped)."""
    refuse_unknown(adapter, opts)
    todo, missing = [], []
    for m in in_file_order(adapter):
        if m.naming is not Naming.LONGCAT:
            continue
        names = (m.name,) if scheme is naming.Scheme.LONGCAT else naming.layers(m.name, scheme)
        (missing.append(m.name) if names is None else todo.append((m, names)))
    unmapped(missing, opts, target)
    out, infos = [], []
    for m, names in todo:
        if m.out_features % len(names):
            raise LoraError(f"module {q(m.name)}: {m.out_features} outputs do not split into {len(names)} "
                            f"layers in {target}")
        h = m.out_features // len(names)
        a_entries, b_entries = [], []
        for j, layer in enumerate(names):
            std = standard_layer(m, j * h, (j + 1) * h)
            if std is None:  # no part adapts these rows
                continue
            b, alpha = std.b, alpha_for(std.scale, std.rank)
            if alpha is None and std.scale < 0 and (flip := alpha_for(-std.scale, std.rank)) is not None:
                b, alpha = negated(b), flip  # a negative scale as a positive alpha on -B: exact, same dtype
            elif alpha is None:
                b, alpha = folded(b, std.scale), float(std.rank)
            a_entries.append(entry(a_key(layer), std.a, opts, m.name))
            b_entries.append(entry(b_key(layer), b, opts, m.name))
            infos.append(LayerInfo(layer, std.rank, alpha))
        out += a_entries + b_entries
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
