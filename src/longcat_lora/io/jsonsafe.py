"""JSON from files we do not trust: bounded size and nesting, strict JSON, typed fields, one-line errors.

Every JSON document this package reads from a user's file goes through here: a PEFT
`adapter_config.json`, a checkpoint's `*.safetensors.index.json`, diffusers' `lora_adapter_metadata`
string (the safetensors header has its own single-pass parser in `st.py`, built on the same rules).
What is refused, always as a `LoraError` naming the file:

- more than `max_bytes` bytes; text that is not UTF-8;
- anything that is not strict JSON: `NaN` / `Infinity` literals, numbers that overflow a float
  (`1e400`), integers of more than 4300 digits (Python's own limit);
- nesting deeper than `MAX_DEPTH` (the documents read here are two or three levels deep; the parser's
  own recursion limit is never reached, whatever the input);
- the same key twice in one object (Python's json keeps the last silently; a reader that kept the
  first would see another file);
- a field of the wrong type, through `field()`: `r = "abc"`, `lora_alpha = true`, a list where a map
  is expected. Booleans are never numbers here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

from ..errors import LoraError

MAX_DEPTH = 32
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # adapter_config.json, metadata strings: a few KB in practice
MAX_INDEX_BYTES = 64 * 1024 * 1024  # *.index.json: ~100 bytes per tensor name


class _Refused(ValueError):
    """Raised inside the parser's hooks; turned into a LoraError by `loads`."""


def _constant(name: str) -> float:
    raise _Refused(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is out of range")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Refused(f"the key {k!r} appears twice in one object")
            seen.add(k)
    return d


def depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, [] or {} is 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, d)
        stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
        if deepest > MAX_DEPTH:
            break
    return deepest


def loads(raw: bytes | str, where: str, what: str, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """Parse untrusted JSON text (see the module docstring for what is refused).

    `where` names the file in messages, `what` the document ("the adapter config").
    """
    if len(raw) > max_bytes:
        raise LoraError(f"{where}: {what} is {len(raw)} bytes, more than the {max_bytes} this tool reads")
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise LoraError(f"{where}: {what} is not UTF-8 text (byte {e.start})") from None
    try:
        value = json.loads(raw, parse_constant=_constant, parse_float=_float, object_pairs_hook=_object)
    except _Refused as e:
        raise LoraError(f"{where}: {what} is not valid JSON: {e}") from None
    except json.JSONDecodeError as e:
        raise LoraError(f"{where}: {what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise LoraError(f"{where}: {what} is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as e:  # e.g. an integer literal past Python's 4300-digit limit
        raise LoraError(f"{where}: {what} is not usable JSON: {str(e).splitlines()[0][:120]}") from None
    if depth(value) > MAX_DEPTH:
        raise LoraError(f"{where}: {what} is nested too deeply (more than {MAX_DEPTH} levels)")
    return value


def load_file(path: str, what: str, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """`loads` on a file's bytes, reading at most max_bytes + 1 of them; a non-regular file is refused."""
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would block, a device never end
        raise LoraError(f"{path}: {what} is not a regular file")
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise LoraError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    return loads(raw, path, what, max_bytes)


# ------------------------------------------------------------------------- typed fields


def type_name(value: Any) -> str:
    """JSON's name for a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def is_int(value: Any) -> bool:
    """A JSON integer (not a boolean, not 8.0)."""
    return type(value) is int


def is_number(value: Any) -> bool:
    """A finite JSON number (not a boolean)."""
    return type(value) in (int, float) and math.isfinite(value)


def field(obj: dict, key: str, check: Callable[[Any], bool], expected: str, where: str, default: Any = None) -> Any:
    """obj[key] if it passes `check` (`default` when absent or null); else a LoraError naming key and file."""
    value = obj.get(key)
    if value is None:
        return default
    if not check(value):
        raise LoraError(f"{where}: {key} must be {expected}, not {type_name(value)} {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


__all__ = ["MAX_DEPTH", "MAX_CONFIG_BYTES", "MAX_INDEX_BYTES", "loads", "load_file", "field", "is_int",
           "is_number", "type_name", "depth"]
