"""Property: `SafeFile` accepts a safetensors file if and only if the `safetensors` library accepts it.

The library's side: `safe_open(path, "np")` and `get_tensor` for every name (`"pt"` for the dtypes numpy
has no type for: numpy cannot say what the library thinks of those). Ours: `SafeFile(path)` and
`read_raw` for every name; a refusal must be one `LoraError` line, never another exception. When both
accept, the names, dtypes, shapes, metadata and every tensor's bytes are the same.

Files are generated valid (dtypes, shapes, names of any Unicode, metadata, unknown fields, data order
unlike header order, compact or spaced JSON, padding) and then mutated: JSON edited structurally
(wrong types, missing/extra/duplicate fields and names, negative, -0, overflowing and huge numbers,
shifted/overlapping/gapped/swapped offsets, lone surrogates, deep nesting, `__metadata__` of wrong
types) and bytes edited (flipped, inserted, deleted, non-UTF-8, header length changed, truncation,
trailing bytes, whitespace or other padding around the JSON, empty header).

Intended differences, each named in `DIFFERENCES`, asserted where it occurs and shown by its own test
(the library accepts, we refuse with a known message); anything else where the two disagree fails:
- DUPLICATE_NAME: a tensor name or `__metadata__` key given twice; the library keeps the last silently.
- LIBRARY_ONLY_DTYPE: dtypes the library knows and nothing in a LoRA uses (C64, F4, F6_*, F8_E8M0).
- PICKLE_MAGIC: a header whose length field reads as a pickle's or zip's first bytes and whose JSON
  does not start with `{`: named as a pickle/checkpoint by its magic bytes.
- NUMPY_CANNOT_HOLD: a zero-element tensor whose other dimensions span 2**63 bytes: numpy refuses it
  (so the library's "np" agrees with us); only for the dtypes read through "pt" does the library accept.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from longcat_lora.errors import LoraError
from longcat_lora.io.reader import SafeFile

# Item sizes written out here (not taken from the code under test). The last two the library reads, we refuse.
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8, "F8_E8M0": 1}
NUMPY_LACKS = {"BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4"}  # the library is asked through "pt" for these
LIBRARY_ONLY = {"C64", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}
DIFFERENCES = {  # name -> words our refusal must hold
    "DUPLICATE_NAME": "appears twice",
    "LIBRARY_ONLY_DTYPE": "unsupported dtype",
    "PICKLE_MAGIC": "never unpickled",
    "NUMPY_CANNOT_HOLD": "2**63 bytes",
}
SETTINGS = settings(max_examples=800, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------ a JSON model that can say anything


class Obj(list):
    """A JSON object as (key, value) pairs: order and duplicates are kept."""


class Raw(str):
    """A JSON token written verbatim (`-0`, `1e400`, a lone surrogate escape, deep nesting)."""


def dump(v: object, spaced: bool, ascii_only: bool) -> str:
    sep, colon = (", ", ": ") if spaced else (",", ":")
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, Obj):
        return "{" + sep.join(dump(k, spaced, ascii_only) + colon + dump(x, spaced, ascii_only) for k, x in v) + "}"
    if isinstance(v, list):
        return "[" + sep.join(dump(x, spaced, ascii_only) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return json.dumps(v, ensure_ascii=ascii_only)


def entry(dtype: str, shape: list, lo: int, hi: int) -> Obj:
    return Obj([("dtype", dtype), ("shape", shape), ("data_offsets", [lo, hi])])


def pack(header: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


# ------------------------------------------------------------------ the two readers


@dataclass
class Read:
    tensors: dict  # name -> (dtype, shape, bytes)
    metadata: dict


def theirs(path: str) -> Read | None:
    """What the safetensors library reads, or None where it refuses."""
    try:
        with safe_open(path, "np") as f, safe_open(path, "pt") as g:
            tensors = {}
            for k in f.keys():
                dtype = f.get_slice(k).get_dtype()
                if dtype in NUMPY_LACKS:
                    t = g.get_tensor(k)
                    tensors[k] = (dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
                else:
                    a = f.get_tensor(k)
                    tensors[k] = (dtype, tuple(a.shape), a.tobytes())
            return Read(tensors, f.metadata() or {})
    except Exception:
        return None


def ours(path: str) -> Read | LoraError:
    """What `SafeFile` reads, or its refusal (any other exception propagates: a crash is a defect)."""
    try:
        with SafeFile(path) as f:
            tensors = {k: (f.info(k).dtype, f.info(k).shape, f.read_raw(k).tobytes()) for k in f.keys()}
            return Read(tensors, f.metadata)
    except LoraError as e:
        assert "\n" not in str(e) and path in str(e), str(e)
        return e


def differences(blob: bytes) -> set[str]:
    """The intended differences that apply to a file (found here, from its bytes, with the stdlib)."""
    found: set[str] = set()
    if len(blob) < 8:
        return found
    if len(blob) >= 10 and blob[8:9] != b"{" and (blob[:4] == b"PK\x03\x04" or (blob[0] == 0x80 and 2 <= blob[1] <= 5)):
        found.add("PICKLE_MAGIC")
    (n,) = struct.unpack("<Q", blob[:8])
    try:
        doc = json.loads(blob[8:8 + n].decode("utf-8"), object_pairs_hook=Obj)
    except ValueError:
        return found
    if type(doc) is not Obj:
        return found
    metas = [v for k, v in doc if k == "__metadata__" and type(v) is Obj]
    if len({k for k, _ in doc}) < len(doc) or any(len({k for k, _ in m}) < len(m) for m in metas):
        found.add("DUPLICATE_NAME")
    for k, e in doc:
        fields = dict(e) if type(e) is Obj else {}
        dtype, shape = fields.get("dtype"), fields.get("shape")
        if dtype in LIBRARY_ONLY:
            found.add("LIBRARY_ONLY_DTYPE")
        if (dtype in NUMPY_LACKS and type(shape) is list and all(type(s) is int for s in shape) and 0 in shape
                and math.prod(s for s in shape if s) * SIZES[dtype] >= 2**63):
            found.add("NUMPY_CANNOT_HOLD")
    return found


def check(path: str, blob: bytes) -> str:
    """Write `blob`, read it both ways, assert they agree or differ only as named; say which it was."""
    with open(path, "wb") as f:
        f.write(blob)
    want, got = theirs(path), ours(path)
    if want is None:
        assert isinstance(got, LoraError), f"we read a file the library refuses: {blob[:300]!r}"
        return "both refuse"
    if isinstance(got, LoraError):
        named = differences(blob)
        assert any(DIFFERENCES[d] in str(got) for d in named), \
            f"we refuse a file the library reads ({got}); named differences here: {named}; {blob[:300]!r}"
        return "named difference"
    assert got.metadata == want.metadata
    assert sorted(got.tensors) == sorted(want.tensors)
    for k, (dtype, shape, raw) in want.tensors.items():
        assert got.tensors[k] == (dtype, shape, raw), k
    return "both read"


# ------------------------------------------------------------------ strategies

names = st.text(st.characters(codec="utf-8"), max_size=6).filter(lambda s: s != "__metadata__")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.lists(st.tuples(st.text(max_size=3), inner), max_size=3).map(Obj),
    max_leaves=6)
HUGE = [2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**100, -1, -(2**63)]
HOSTILE_TOKENS = [Raw("-0"), Raw("-0.0"), Raw("1.0"), Raw("1e2"), Raw("1e400"), Raw("-1e400"), Raw("9" * 309),
                  Raw("9" * 308), Raw(str(int(1.7976931348623157e308))), Raw("1" + "0" * 400 + ".5"), Raw("1.7976931348623158e308"),
                  Raw("0e99999999999"), Raw("1e99999999999"), Raw('"\\ud800"'), Raw('"\\udc00x"'),
                  Raw('"\\ud83d\\ude00"'), Raw("[" * 124 + "]" * 124), Raw("[" * 126 + "]" * 126),
                  Raw('{"a":' * 125 + "1" + "}" * 125), Raw("9" * 5000)]
HOSTILE_KINDS = [st.sampled_from(HOSTILE_TOKENS)] * 3 + [
    st.sampled_from(HUGE), json_values, st.sampled_from(["F32", "f32", "F4", "C64", "F8_E8M0", "F6_E2M3", "", "BF16 "])]
hostile = st.integers(0, len(HOSTILE_KINDS) - 1).flatmap(HOSTILE_KINDS.__getitem__)  # tokens: half the draws


@st.composite
def valid_files(draw) -> tuple[Obj, bytes, dict]:
    """A valid file as (header model, data, format options): data order independent of header order."""
    n = draw(st.integers(0, 4))
    keys = draw(st.lists(names, min_size=n, max_size=n, unique=True))
    common = sorted(set(SIZES) - LIBRARY_ONLY)
    dtypes = [draw(st.sampled_from(common) if draw(st.integers(0, 9)) else st.sampled_from(sorted(SIZES)))
              for _ in keys]
    shapes = [draw(st.lists(st.integers(0, 4), max_size=3)) for _ in keys]
    order = draw(st.permutations(range(n)))
    blobs, spans, at = {}, {}, 0
    for i in order:
        size = math.prod(shapes[i]) * SIZES[dtypes[i]]
        blobs[i] = draw(st.binary(min_size=size, max_size=size))
        spans[i], at = (at, at + size), at + size
    pairs = [(keys[i], entry(dtypes[i], shapes[i], *spans[i])) for i in range(n)]
    for _, e in pairs:
        if draw(st.integers(0, 5)) == 0:  # an unknown field, anywhere in the entry
            e.insert(draw(st.integers(0, 3)), (draw(st.text(max_size=4)), draw(json_values)))
    meta = draw(st.sampled_from(["absent", "null", "map"]))
    if meta != "absent":
        value = None if meta == "null" else Obj(draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4),
                                                                     max_size=3)).items())
        pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", value))
    fmt = {"spaced": draw(st.booleans()), "ascii_only": draw(st.booleans()),
           "lead": draw(st.sampled_from(["", " ", "\n\t"])), "pad": " " * draw(st.integers(0, 7))}
    return Obj(pairs), b"".join(blobs[i] for i in order), fmt


def serialize(doc: object, data: bytes, fmt: dict) -> bytes:
    text = fmt["lead"] + dump(doc, fmt["spaced"], fmt["ascii_only"]) + fmt["pad"]
    return pack(text.encode("utf-8", "surrogatepass"), data)


def _entries(doc: Obj) -> list[Obj]:
    return [v for k, v in doc if k != "__metadata__" and type(v) is Obj]


@st.composite
def edit_json(draw, doc: Obj) -> object:
    """One structural edit of the header model (in place where it can be; returns the new document)."""
    es = _entries(doc)
    what = draw(st.sampled_from(["field", "number", "drop", "extra", "dup_field", "dup_name", "dup_meta",
                                 "meta", "entry", "top", "shift", "swap", "dtype", "dims"]
                                + ["extra", "respell"] * 3))  # the edits that can leave a file valid
    if what == "top":
        return draw(hostile)
    if what == "dup_name" and doc:
        k, v = doc[draw(st.integers(0, len(doc) - 1))]
        doc.insert(draw(st.integers(0, len(doc))), (k, v if draw(st.booleans()) else draw(hostile)))
    elif what == "dup_meta":
        doc.append(("__metadata__", Obj([("a", "1"), ("a", draw(st.sampled_from(["1", "2"])))])))
    elif what == "meta":
        doc.insert(0, ("__metadata__", draw(hostile | st.lists(st.tuples(st.text(max_size=2), hostile),
                                                               max_size=2).map(Obj))))
    elif what == "entry" and doc:
        i = draw(st.integers(0, len(doc) - 1))
        doc[i] = (doc[i][0], draw(hostile))
    elif not es:
        return doc
    else:
        e = draw(st.sampled_from(es))
        fields = [i for i, (k, _) in enumerate(e) if k in ("dtype", "shape", "data_offsets")]
        if what == "field" and fields:
            i = draw(st.sampled_from(fields))
            e[i] = (e[i][0], draw(hostile))
        elif what == "number" and fields:
            lists = [i for i in fields if type(e[i][1]) is list and e[i][1]]
            if lists:
                values = e[draw(st.sampled_from(lists))][1]
                values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from(HUGE) | st.sampled_from(
                    [Raw("-0"), Raw("1.0"), Raw("9" * 309), True]) | st.integers(-3, 70))
        elif what == "respell" and fields:
            _respell(draw, e, draw(st.sampled_from(fields)))
        elif what == "drop" and e:
            del e[draw(st.integers(0, len(e) - 1))]
        elif what == "extra":
            e.insert(draw(st.integers(0, len(e))), (draw(st.sampled_from(["x", "dtype ", "\\ud800"])), draw(hostile)))
        elif what == "dup_field" and e:
            e.insert(draw(st.integers(0, len(e))), e[draw(st.integers(0, len(e) - 1))])
        elif what in ("shift", "swap", "dtype", "dims"):
            _edit_layout(draw, what, e, es)
    return doc


def _respell(draw, e: Obj, i: int) -> None:
    """The same number written another way: `-0`, `2.0`, `2e0`, `true` for 1 (JSON equal, not integers)."""
    key, values = e[i]
    if type(values) is list and values and all(type(v) is int for v in values):
        j = draw(st.integers(0, len(values) - 1))
        v = values[j]
        values[j] = draw(st.sampled_from([Raw("-0")] * 3 if v == 0 else [Raw(f"-{v}"), Raw(f"{v}.0"), Raw(f"{v}e0"),
                                                                      v == 1, Raw(f"{v}")]))


def _edit_layout(draw, what: str, e: Obj, es: list[Obj]) -> None:
    """Offsets moved (overlap, gap, out of order, past the end), swapped, dtype or dimensions changed."""
    fields = dict(e)
    if what == "shift" and type(fields.get("data_offsets")) is list and len(fields["data_offsets"]) == 2:
        lo, hi = fields["data_offsets"]
        if type(lo) is int and type(hi) is int:
            d = draw(st.integers(-9, 9))
            fields["data_offsets"][:] = draw(st.sampled_from([[lo + d, hi + d], [lo, hi + d], [lo + d, hi]]))
    elif what == "swap":
        other = dict(draw(st.sampled_from(es)))
        if "data_offsets" in other and "data_offsets" in fields:
            fields["data_offsets"], other["data_offsets"] = other["data_offsets"], fields["data_offsets"]
            for target, src in ((e, fields), (draw(st.sampled_from(es)), other)):
                target[:] = [(k, src.get(k, v)) for k, v in target]
            return
    elif what == "dtype":
        fields["dtype"] = draw(st.sampled_from(sorted(SIZES) + ["F4", "F6_E3M2", "I4"]))
    elif what == "dims" and type(fields.get("shape")) is list:
        shape = fields["shape"]
        how = draw(st.sampled_from(["append", "drop", "set"]))
        if how == "append":
            shape.append(draw(st.integers(0, 3) | st.sampled_from(HUGE)))
        elif shape:
            i = draw(st.integers(0, len(shape) - 1))
            if how == "drop":
                del shape[i]
            else:
                shape[i] = draw(st.integers(0, 5) | st.sampled_from(HUGE))
    e[:] = [(k, fields.get(k, v)) for k, v in e]


@st.composite
def edit_bytes(draw, blob: bytes) -> bytes:
    """One byte-level edit: in the header (flip, insert, delete, non-UTF-8, padding), its length, the end."""
    if len(blob) < 8:
        return blob + draw(st.binary(max_size=9))
    (n,) = struct.unpack("<Q", blob[:8])
    n = min(n, len(blob) - 8)
    header, data = blob[8:8 + n], blob[8 + n:]
    what = draw(st.sampled_from(["flip", "insert", "delete", "non_utf8", "pad", "length", "truncate", "append",
                                 "empty"]))
    at = draw(st.integers(0, len(header)))
    if what == "flip" and header:
        i = min(at, len(header) - 1)
        header = header[:i] + bytes([header[i] ^ draw(st.integers(1, 255))]) + header[i + 1:]
    elif what == "insert":
        header = header[:at] + draw(st.binary(min_size=1, max_size=3)) + header[at:]
    elif what == "delete":
        header = header[:at] + header[at + draw(st.integers(1, 3)):]
    elif what == "non_utf8":
        header = header[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82"])) \
            + header[at:]
    elif what == "pad":
        pad = draw(st.sampled_from([b" ", b"\t\r\n", b"\x00", b"\x0c", b"\xc2\xa0", b" " * 64]))
        header = pad + header if draw(st.booleans()) else header + pad
    elif what == "length":
        length = draw(st.sampled_from([0, 1, n - 1, n + 1, n + len(data), 100_000_000, 100_000_001, 2**63, 2**64 - 1])
                      | st.integers(0, n + len(data) + 8))
        return pack(header, data, max(0, min(length, 2**64 - 1)))
    elif what == "truncate":
        return blob[:draw(st.integers(0, len(blob)))]
    elif what == "append":
        return blob + draw(st.binary(min_size=1, max_size=9))
    elif what == "empty":
        return pack(draw(st.sampled_from([b"", b"{}", b"  {} "])), b"" if draw(st.booleans()) else data)
    return pack(header, data)


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("prop") / "f.safetensors")


# ------------------------------------------------------------------ the properties


@settings(SETTINGS, max_examples=250)
@given(valid_files())
def test_valid_files_read_the_same(path, case):
    doc, data, fmt = case
    outcome = check(path, serialize(doc, data, fmt))
    event(outcome)
    dtypes = {dict(v)["dtype"] for k, v in doc if k != "__metadata__"}
    assert outcome == "both read" or dtypes & LIBRARY_ONLY, outcome


def mutated(data, json_edits: list[int], byte_edits: list[int]) -> bytes:
    """A valid file given some JSON edits, serialized, then some byte edits."""
    doc, blob, fmt = data.draw(valid_files())
    for _ in range(data.draw(st.sampled_from(json_edits))):
        doc = data.draw(edit_json(doc)) if type(doc) is Obj else doc
    blob = serialize(doc, blob, fmt)
    for _ in range(data.draw(st.sampled_from(byte_edits))):
        blob = data.draw(edit_bytes(blob))
    return blob


@SETTINGS
@given(st.data())
def test_json_edited_files_are_accepted_exactly_when_the_library_accepts(path, data):
    """One or two structural edits and nothing else: most of the edits the library accepts live here."""
    event(check(path, mutated(data, [1, 1, 1, 2], [0])))


@settings(SETTINGS, max_examples=250)
@given(st.data())
def test_byte_edited_files_are_accepted_exactly_when_the_library_accepts(path, data):
    event(check(path, mutated(data, [0], [1, 2])))


@settings(SETTINGS, max_examples=250)
@given(st.data())
def test_files_edited_both_ways_are_accepted_exactly_when_the_library_accepts(path, data):
    event(check(path, mutated(data, [0, 1, 2, 3], [0, 1, 2])))


@settings(SETTINGS, max_examples=300)
@given(valid_files(), st.data())
def test_edge_edits_are_accepted_exactly_when_the_library_accepts(path, case, data):
    """One edit that leaves a file valid for Python's json, at the edges where the library differs: an
    unknown field holding an edge token, a number spelled another way, an empty tensor with huge dimensions."""
    doc, blob, fmt = case
    es = _entries(doc)
    what = data.draw(st.sampled_from(["extra", "respell", "empty"]))
    if what == "extra" and es:
        e = data.draw(st.sampled_from(es))
        e.insert(data.draw(st.integers(0, len(e))), ("x", data.draw(st.sampled_from(HOSTILE_TOKENS))))
    elif what == "respell" and es:
        _respell(data.draw, *data.draw(st.sampled_from([(e, i) for e in es for i in (1, 2) if i < len(e)])))
    else:
        shape = data.draw(st.sampled_from([[0, 2**62], [2**62, 0], [2**61, 2, 0], [2**63 - 1, 0], [0, 2**61]]))
        doc.append((data.draw(names.filter(lambda k: k not in dict(doc))),
                    entry(data.draw(st.sampled_from(sorted(SIZES))), shape, len(blob), len(blob))))
    event(f"{what}: {check(path, serialize(doc, blob, fmt))}")


# ------------------------------------------------------------------ each intended difference, shown


def _one(dtype: str = "F32", shape: str = "[2]", nbytes: int = 8) -> str:
    return f'{{"dtype":"{dtype}","shape":{shape},"data_offsets":[0,{nbytes}]}}'


@pytest.mark.parametrize("name, header, nbytes", [
    ("DUPLICATE_NAME", '{"t":' + _one() + ',"t":' + _one() + "}", 8),
    ("DUPLICATE_NAME", '{"__metadata__":{"a":"1","a":"2"},"t":' + _one() + "}", 8),
    ("LIBRARY_ONLY_DTYPE", '{"t":' + _one("C64", "[1]") + "}", 8),
    ("LIBRARY_ONLY_DTYPE", '{"t":' + _one("F8_E8M0", "[2]", 2) + "}", 2),
    ("LIBRARY_ONLY_DTYPE", '{"t":' + _one("F4", "[2]", 1) + "}", 1),
    ("NUMPY_CANNOT_HOLD", '{"t":' + _one("BF16", "[4611686018427387904,0]", 0) + "}", 0),
])
def test_each_intended_difference_the_library_reads_we_refuse(path, name, header, nbytes):
    blob = pack(header.encode(), bytes(range(nbytes)))
    with open(path, "wb") as f:
        f.write(blob)
    assert theirs(path) is not None
    assert DIFFERENCES[name] in str(ours(path))
    assert name in differences(blob)
    assert check(path, blob) == "named difference"


def test_pickle_magic_difference(path):
    """A header of exactly 640 bytes has the length field 80 02 00 ..: a protocol-2 pickle's first bytes.
    If its JSON starts with whitespace, the library reads it and we name it a pickle."""
    header = b" " * (640 - 2) + b"{}"
    blob = pack(header, b"")
    assert blob[:2] == b"\x80\x02"
    with open(path, "wb") as f:
        f.write(blob)
    assert theirs(path) == Read({}, {})
    assert check(path, blob) == "named difference" and "PICKLE_MAGIC" in differences(blob)
    assert check(path, pack(b"{}" + b" " * 638, b"")) == "both read"  # starting with "{": read as safetensors


def test_numpy_cannot_hold_agrees_with_numpy(path):
    """The same shape in a dtype numpy has: the library's "np" refuses it too, so we agree."""
    assert check(path, pack(('{"t":' + _one("F32", "[0,4611686018427387904]", 0) + "}").encode(), b"")) == "both refuse"
    assert check(path, pack(('{"t":' + _one("U8", "[9223372036854775807,0]", 0) + "}").encode(), b"")) == "both read"


@pytest.mark.parametrize("token, agree", [
    ("9" * 308, "both read"), ("9" * 309, "both refuse"), (str(int(1.7976931348623157e308)), "both refuse"),
    ("-" + "9" * 300, "both read"), ("-" + "9" * 309, "both refuse"), ("-" + str(int(1.7976931348623157e308)), "both refuse"),
    ("1e308", "both read"), ("1.7976931348623157e308", "both read"),
    ("1.7976931348623158e308", "both refuse"), ("17976931348623157e292", "both read"), ("0e99999999999", "both read"), ("1e-99999999999", "both read"),
    ("1e99999999999", "both refuse"), ("-0", "both read"), ('"\\ud83d\\ude00"', "both read"),
    ('"\\ud800"', "both refuse"), ('"\\udc00"', "both refuse"), ("[" * 125 + "]" * 125, "both read"),
    ("[" * 126 + "]" * 126, "both refuse"),
])
def test_what_serde_json_refuses_in_an_unknown_field(path, token, agree):
    """Unknown fields are ignored by both, but their JSON must still parse as serde_json parses it."""
    header = '{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + token + "}}"
    assert check(path, pack(header.encode(), b"\0" * 8)) == agree


def test_negative_zero_is_not_an_integer_for_the_library(path):
    for shape, offsets in (("[-0,2]", "[0,0]"), ("[2]", "[-0,8]")):
        header = f'{{"t":{{"dtype":"F32","shape":{shape},"data_offsets":{offsets}}}}}'
        assert check(path, pack(header.encode(), b"\0" * (0 if shape.startswith("[-0") else 8))) == "both refuse"
