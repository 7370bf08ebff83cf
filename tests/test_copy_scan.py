"""The one-pass copy: ranges copied unchanged are coalesced into one kernel copy and scanned for NaN/Inf
by a second thread in the same pass (`io.writer._Copier`), each byte scanned once.

Expected bytes and refusals come from the inputs (the bytes written, the bit patterns planted), never
from the code under test: the output must equal the input's bytes, and a planted Inf/NaN must be refused
naming the tensor it was planted in, wherever it lies relative to the scan's pieces.
"""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
import pytest
import torch

import longcat_lora as L
import longcat_lora.io.writer as st
from longcat_lora.errors import LoraError
from longcat_lora.io.reader import FileRange, nonfinite_check
from longcat_lora.testing.fixtures import write_native_lora

from conftest import DIMS

# dtype -> (numpy unsigned view, largest finite bits, +Inf bits, a NaN's bits, sign bit)
BITS = {"F16": (np.uint16, 0x7BFF, 0x7C00, 0x7E00, 0x8000),
        "BF16": (np.uint16, 0x7F7F, 0x7F80, 0x7FC0, 0x8000),
        "F32": (np.uint32, 0x7F7FFFFF, 0x7F800000, 0x7FC00000, 0x80000000),
        "F64": (np.uint64, 0x7FEFFFFFFFFFFFFF, 0x7FF0000000000000, 0x7FF8000000000000, 1 << 63)}
PIECE = 64  # scan piece in bytes for these tests (a multiple of every item size), so runs span many


def _input(path, dtype: str, counts: list[int], plant: dict[tuple[int, int], int] | None = None):
    """A raw file of len(counts) adjacent tensors of random finite items (the largest finite magnitude
    at both ends of each), with bit patterns planted at (tensor, item); returns the tensors' FileRanges'
    (offset, nbytes) and the file's bytes."""
    u, big, _, _, sign = BITS[dtype]
    rng = np.random.default_rng(7)
    arrays = []
    for k, n in enumerate(counts):
        a = rng.integers(0, big, n, dtype=u, endpoint=True)  # finite: magnitude bits <= the largest finite
        a |= rng.integers(0, 2, n, dtype=u) * u(sign)
        a[0], a[-1] = big, u(sign) | u(big)
        for (t, i), bits in (plant or {}).items():
            if t == k:
                a[i] = bits
        arrays.append(a)
    data = b"".join(a.tobytes() for a in arrays)
    path.write_bytes(b"HEAD" + data)  # an offset, as a header would put
    where, off = [], 4
    for a in arrays:
        where.append((off, a.nbytes))
        off += a.nbytes
    return where, data


def _write(tmp_path, src, dtype: str, where, checked=True, name="out.bin"):
    """Write every range (tensors t0, t1, ...) through write_safetensors; returns the output's data bytes."""
    fd = os.open(src, os.O_RDONLY)
    item = np.dtype(BITS[dtype][0]).itemsize

    def refuse(name):
        def r():
            raise LoraError(f"refused {name}")
        return r

    def entry(k, off, n):
        check = nonfinite_check(dtype, refuse(f"t{k}")) if checked else None
        rng = FileRange(fd, off, n, str(src), f"t{k}", check)
        return st.Entry(f"t{k}", dtype, (n // item,), lambda: rng)

    try:
        out = tmp_path / name
        st.write_safetensors(str(out), [entry(k, off, n) for k, (off, n) in enumerate(where)])
        raw = out.read_bytes()
        (hlen,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + hlen])
        assert [header[f"t{k}"]["data_offsets"][1] - header[f"t{k}"]["data_offsets"][0]
                for k in range(len(where))] == [n for _, n in where]
        return raw[8 + hlen:]
    finally:
        os.close(fd)


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(st, "SCAN_CHUNK", PIECE)


@pytest.mark.parametrize("dtype", list(BITS))
def test_finite_run_is_copied_byte_for_byte_and_scanned_once(tmp_path, small_pieces, monkeypatch, dtype):
    counts = [37, 64, 5, 200]  # pieces end inside tensors and at their ends
    where, data = _input(tmp_path / "in.bin", dtype, counts)
    seen = []
    real = st.range_pieces

    def counting(r, buf):
        for piece in real(r, buf):
            seen.append((r.name, piece.size))
            yield piece

    calls = []
    real_cfr = os.copy_file_range

    def cfr(*a):
        calls.append(a[2])
        return real_cfr(*a)

    monkeypatch.setattr(st, "range_pieces", counting)
    monkeypatch.setattr(os, "copy_file_range", cfr)
    assert _write(tmp_path, tmp_path / "in.bin", dtype, where) == data
    item = np.dtype(BITS[dtype][0]).itemsize
    for k, n in enumerate(counts):  # every byte scanned once, in pieces of whole items
        sizes = [s for name, s in seen if name == f"t{k}"]
        assert sum(sizes) == n * item and all(s % item == 0 and s <= PIECE for s in sizes)
    assert calls == [len(data)]  # four adjacent tensors: one kernel copy


def test_a_gap_between_ranges_splits_the_copy(tmp_path, monkeypatch):
    where, data = _input(tmp_path / "in.bin", "F32", [10, 10, 10])
    calls = []
    real_cfr = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a[2]) or real_cfr(*a))
    picked = [where[0], where[2]]  # tensor 1 left out: the input is not contiguous there
    assert _write(tmp_path, tmp_path / "in.bin", "F32", picked) == data[:40] + data[80:]
    assert calls == [40, 40]


@pytest.mark.parametrize("dtype", list(BITS))
@pytest.mark.parametrize("what", ["+inf", "-inf", "nan", "-nan"])
@pytest.mark.parametrize("where_", ["first", "piece_end", "piece_start", "last"])
def test_nonfinite_anywhere_in_a_run_is_refused_naming_its_tensor(tmp_path, small_pieces, dtype, what, where_):
    u, _, inf, nan, sign = BITS[dtype]
    bits = {"+inf": inf, "-inf": sign | inf, "nan": nan, "-nan": sign | nan}[what]
    item = np.dtype(u).itemsize
    counts = [48, 3 * PIECE // item, 40]
    per_piece = PIECE // item
    t, i = {"first": (0, 0), "piece_end": (1, per_piece - 1), "piece_start": (1, 2 * per_piece),
            "last": (2, counts[2] - 1)}[where_]
    where, _ = _input(tmp_path / "in.bin", dtype, counts, {(t, i): bits})
    with pytest.raises(LoraError, match=rf"^refused t{t}$"):
        _write(tmp_path, tmp_path / "in.bin", dtype, where)
    # the same bytes unchecked are copied as they are (what allow_nonfinite=True does)
    assert _write(tmp_path, tmp_path / "in.bin", dtype, where, checked=False, name="ok.bin") == \
        (tmp_path / "in.bin").read_bytes()[4:]


def test_short_reads_in_the_scan_keep_pieces_whole(tmp_path, small_pieces, monkeypatch):
    """preadv returning 7 bytes at a time: pieces still hold whole 8-byte items, so a NaN is still found."""
    u, _, _, nan, _ = BITS["F64"]
    where, data = _input(tmp_path / "in.bin", "F64", [30, 30], {(1, 17): nan})
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real(fd, [memoryview(bufs[0])[:7]], off))
    with pytest.raises(LoraError, match="^refused t1$"):
        _write(tmp_path, tmp_path / "in.bin", "F64", where)
    where, data = _input(tmp_path / "in.bin", "F64", [30, 30])
    assert _write(tmp_path, tmp_path / "in.bin", "F64", where) == data


def test_input_truncated_before_the_copy_names_the_tensor(tmp_path, small_pieces):
    """Both the scan and the copy find the end; either way the error is the truncation naming the tensor."""
    where, _ = _input(tmp_path / "in.bin", "BF16", [100, 100])
    off, n = where[1]
    os.truncate(tmp_path / "in.bin", off + 50)
    src = re.escape(str(tmp_path / "in.bin"))
    with pytest.raises(LoraError, match=rf"^{src}: changed or truncated while being read \(tensor 't1': "
                                        rf"expected {n} bytes, got 50\)$"):
        _write(tmp_path, tmp_path / "in.bin", "BF16", where)


def test_convert_refuses_a_nan_found_mid_copy_and_leaves_nothing(tmp_path):
    """A NaN in the last copied tensor of a file whose copies run in large runs: refused naming its
    module, no output, no temp file; allowed, the copied bytes are the input's."""
    src = write_native_lora(str(tmp_path / "n.safetensors"), "cfg_step", dims=DIMS, rank=8,
                            dtype=torch.bfloat16, alpha_scale=0.5, seed=3)
    from safetensors.torch import load_file, save_file

    sd = load_file(src)
    down = sorted(k for k in sd if k.endswith(".lora_down.weight"))[-1]
    sd[down][-1, -1] = float("nan")
    bad = str(tmp_path / "bad.safetensors")
    save_file(sd, bad)
    out = tmp_path / "out.safetensors"
    module = down.removesuffix(".lora_down.weight")
    with pytest.raises(LoraError, match="non-finite") as e:
        L.convert(bad, str(out), "fastvideo")
    decoded = module.replace("lora___lorahyphen___", "").replace("___lorahyphen___", ".")
    assert decoded in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors", "n.safetensors"]
    L.convert(bad, str(out), "fastvideo", allow_nonfinite=True)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        copied = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_A")]
    assert any(t.isnan().any() for t in copied)
