"""What the safetensors library's JSON parser refuses in a header that Python's `json` takes.

The library parses a header with serde_json (default features: no `float_roundtrip`). Python's `json`
is looser in four places, so the header parser in `reader` applies these rules on top of it (they were
found by tests/test_reader_property.py, which compares both readers on generated and mutated files):

- a number serde_json reads as out of range: it keeps an integer's leading digits while they fit 64
  bits, counts the rest as powers of ten, and multiplies by a table of powers in floating point, so
  `1797...` (the largest double, as 309 digits) is out of range for it while Python takes any integer;
- `-0` is a float there (so not a valid shape or offset), an integer (0) in Python;
- a string holding a lone surrogate escape (`"\\ud800"`), anywhere in the header, not only in names;
- nesting deeper than 127 arrays and objects (serde_json's recursion limit; the header is level 1).
"""

from __future__ import annotations

import re

MAX_DEPTH = 127  # serde_json refuses the 128th nested array/object
_U64_MAX = (1 << 64) - 1
_I32_MAX = (1 << 31) - 1
_POW10 = [float(f"1e{i}") for i in range(309)]  # serde_json's table, each correctly rounded
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(?:\.([0-9]+))?(?:[eE]([+-]?)([0-9]+))?")


def number_in_range(text: str) -> bool:
    """Whether serde_json reads this JSON number literal as finite (it refuses the others).

    Follows its `parse_integer`, `parse_long_integer`, `parse_decimal(_overflow)`, `parse_exponent(_overflow)`
    and `f64_from_parts` step for step; only whether the result is finite matters here.
    """
    m = _NUMBER.fullmatch(text)
    if m is None:
        raise ValueError(f"not a JSON number: {text[:40]}")
    integer, fraction, sign, digits = m.groups()
    significand, exponent, full = 0, 0, False
    for c in integer:  # past u64, every further integer digit only raises the exponent
        if full or significand * 10 + int(c) > _U64_MAX:
            full, exponent = True, exponent + 1
        else:
            significand = significand * 10 + int(c)
    for c in fraction or "":  # past u64, further fraction digits are ignored
        if significand * 10 + int(c) > _U64_MAX:
            break
        significand, exponent = significand * 10 + int(c), exponent - 1
    if digits is not None:
        e = 0
        for c in digits:
            if e * 10 + int(c) > _I32_MAX:  # an exponent overflowing i32: out of range unless it makes 0
                return significand == 0 or sign == "-"
            e = e * 10 + int(c)
        exponent = max(-(1 << 31), exponent - e) if sign == "-" else min(_I32_MAX, exponent + e)
    return _finite_from_parts(significand, exponent)


def _finite_from_parts(significand: int, exponent: int) -> bool:
    f = float(significand)
    while True:
        if abs(exponent) < len(_POW10):
            return exponent < 0 or f * _POW10[exponent] != float("inf")
        if f == 0.0:
            return True
        if exponent >= 0:
            return False
        f /= 1e308
        exponent += 308


def json_float(text: str) -> float:
    """`json.loads(parse_float=...)`: a float literal, refused (ValueError) where serde_json refuses it."""
    if not number_in_range(text):
        raise ValueError(f"number {text[:40]} out of range")
    return float(text)


def json_int_no_negative_zero(text: str) -> int | float:
    """`json.loads(parse_int=...)` for a header holding "-0": that literal is the float -0.0 in serde_json."""
    return -0.0 if text == "-0" else int(text)


def refusal(value: object, depth: int, obj: type) -> str | None:
    """Why serde_json would refuse `value` (parsed by Python's json, objects as `obj`: lists of key/value
    pairs) found at nesting `depth`; None if it would not. Walks without recursion."""
    stack = [(value, depth)]
    while stack:
        v, d = stack.pop()
        t = type(v)
        if t is str:
            if not v.isascii() and not _unicode(v):
                return f"{v[:80]!r} is not valid Unicode"
        elif t is int:
            if (v > _U64_MAX or v < -_U64_MAX) and not number_in_range(str(v)):
                return f"number {str(v)[:40]} out of range"
        elif t is obj or t is list:
            if d > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            for item in v:
                if t is obj:
                    key, item = item
                    if not key.isascii() and not _unicode(key):
                        return f"{key[:80]!r} is not valid Unicode"
                stack.append((item, d + 1))
    return None


def _unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON allows the escape; UTF-8 cannot hold it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
