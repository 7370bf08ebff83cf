"""Safetensors dtype names: item sizes, the torch dtypes they stand for, NaN/Inf bit tests, scalars, and
float arrays to and from stored bytes in numpy (bfloat16 included, which numpy lacks)."""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING

import numpy as np


if TYPE_CHECKING:
    import torch

# dtype name (safetensors spelling) -> item size in bytes. Torch is not needed to read or write files,
# and importing it costs more than copying a gigabyte, so it is only imported for arithmetic.
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
FLOATS = ("F16", "BF16", "F32", "F64")  # float dtypes a LoRA weight may have
INTS = ("I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64")
_BITS = {2: (np.uint16, np.int16), 4: (np.uint32, np.int32), 8: (np.uint64, np.int64)}
# |bits| at or above which a float is Inf or NaN
_NONFINITE = {"F16": 0x7C00, "BF16": 0x7F80, "F32": 0x7F800000, "F64": 0x7FF0000000000000}
_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
          "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, _TORCH[name])


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's raw bytes in memory order (flat uint8, little-endian): what a safetensors file stores."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def dtype_name(dtype: torch.dtype) -> str:
    s = str(dtype).removeprefix("torch.")
    for k, v in _TORCH.items():
        if v == s:
            return k
    raise ValueError(f"unsupported dtype {dtype}")


def nonfinite(raw: np.ndarray, dtype: str) -> bool:
    """True if raw little-endian float data holds an Inf or NaN (bit test, no conversion)."""
    if dtype not in _NONFINITE or raw.size == 0:
        return False
    u_t, s_t = _BITS[ITEMSIZE[dtype]]
    flat = raw.reshape(-1)
    t = _NONFINITE[dtype]
    sign = 1 << (8 * ITEMSIZE[dtype] - 1)
    # positive Inf/NaN: largest as signed ints; negative ones: largest as unsigned ints
    return int(flat.view(s_t).max()) >= t or int(flat.view(u_t).max()) >= (sign | t)


def decode_scalar(raw: bytes, dtype: str) -> float:
    a = np.frombuffer(raw, dtype=np.uint8)
    if dtype == "BF16":
        return float((a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)[0])
    table = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64}
    if dtype not in table:
        raise ValueError(dtype)
    return float(a.view(table[dtype])[0])


def encode_scalar(value: float, dtype: str) -> bytes:
    """Little-endian bytes of one value in a float dtype (round to nearest even; a value too large for
    the dtype becomes inf, silently: `representable` is how callers ask)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype == "BF16":
            u = int(np.array(value, dtype=np.float32).view(np.uint32))
            if math.isnan(value):
                bits = 0x7FC0
            else:
                bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
            return struct.pack("<H", bits)
        return np.array(value, dtype={"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]).tobytes()


_NP_FLOAT = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
# the largest finite value of each float dtype
FLOAT_MAX = {"BF16": 3.3895313892515355e38, "F16": 65504.0, "F32": float(np.finfo(np.float32).max),
             "F64": float(np.finfo(np.float64).max)}


def decode(raw: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """Fill `out` (float32 or float64, any strides) with the values of `raw`, the little-endian bytes of a
    float `dtype` array of out's shape; returns `out`.

    >>> decode(np.array([0x80, 0x3F], np.uint8), "BF16", np.empty(1, np.float32))
    array([1.], dtype=float32)
    """
    flat = np.ascontiguousarray(raw).reshape(-1)
    if dtype == "BF16":
        bits = flat.view(np.uint16).reshape(out.shape)
        if out.dtype == np.float32:  # the 16 bits are the high half of a float32: one shift, exact
            np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
        else:
            out[...] = np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)
    elif dtype in _NP_FLOAT:
        out[...] = flat.view(_NP_FLOAT[dtype]).reshape(out.shape)
    else:
        raise ValueError(f"not a float dtype: {dtype}")
    return out


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """The stored bytes of float array `x` [rows, cols] rounded (to nearest even) to `dtype`, as uint8
    [rows, cols * itemsize]. A bfloat16 result is rounded from float32 (as torch does); values beyond the
    dtype's range become inf, so callers check magnitudes first (`FLOAT_MAX`).

    >>> encode(np.array([[1.0, -2.0]]), "BF16").view(np.uint16)
    array([[16256, 49152]], dtype=uint16)
    """
    return rounded(x, dtype)[0]


def rounded(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(`encode(x, dtype)`, the values those bytes hold as an array of x's float dtype): what is stored
    and what it reads back as, in one pass.

    >>> rounded(np.array([[1.00390625]], np.float32), "BF16")[1]  # a tie: to the even neighbour, 1.0
    array([[1.]], dtype=float32)
    """
    rows = x.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype == "BF16":
            u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
            t = u >> 16  # round to nearest even on the low 16 bits, in place: t = (u + 0x7FFF + lsb) & ~0xFFFF
            t &= 1
            t += np.uint32(0x7FFF)
            t += u
            t &= np.uint32(0xFFFF0000)
            nan = np.isnan(x)
            if nan.any():
                t[nan] = 0x7FC00000
            bits = np.ascontiguousarray(t.view(np.uint16)[..., 1::2])  # the high halves (little-endian)
            back = t.view(np.float32)
            return bits.view(np.uint8).reshape(rows, -1), back if x.dtype == np.float32 else back.astype(x.dtype)
        stored = np.ascontiguousarray(x, dtype=_NP_FLOAT[dtype])
        return stored.view(np.uint8).reshape(rows, -1), stored.astype(x.dtype, copy=False)


def representable(value: float, dtype: str) -> bool:
    return decode_scalar(encode_scalar(value, dtype), dtype) == value
