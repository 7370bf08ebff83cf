"""Corrupted files never crash the CLI: every outcome is success or one clean error line (exit 2)."""

import json
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from longcat_lora.commands.cli import main

from reference import fastvideo_delta, load, official_delta, worst

P = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"


def _valid(path):
    save_file({f"{P}.lora_down.weight": torch.randn(6, 8), f"{P}.alpha_scale": torch.tensor(0.5),
               **{f"{P}.lora_up.blocks.{i}.weight": torch.randn(4, 2) for i in range(3)}}, path)
    return open(path, "rb").read()


def _relayout(raw: bytearray, data) -> bytearray:
    n = int.from_bytes(raw[:8], "little")
    header, body = json.loads(bytes(raw[8:8 + n])), bytes(raw[8 + n:])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    size = {k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in names}
    op = data.draw(st.sampled_from(["shift", "alias_last", "reshape", "resize"]))
    a = data.draw(st.sampled_from(names))
    if op == "shift":  # same size, other bytes: overlaps a neighbour and leaves a gap
        d = data.draw(st.sampled_from([-8, -4, 4, 8]))
        header[a]["data_offsets"] = [x + d for x in header[a]["data_offsets"]]
    elif op == "alias_last":  # the last tensor reads another one's bytes; the file ends where they do
        last = names[-1]
        partners = [k for k in names[:-1] if size[k] == size[last]]
        if partners:
            b = data.draw(st.sampled_from(partners))
            header[last]["data_offsets"] = list(header[b]["data_offsets"])
            body = body[:header[names[-2]]["data_offsets"][1]]
    elif op == "reshape":  # the same byte count under another shape
        header[a]["shape"] = list(reversed(header[a]["shape"])) or [1]
    else:  # the file longer or shorter than the header says
        d = data.draw(st.sampled_from([-4, -1, 1, 4]))
        body = body + bytes(d) if d > 0 else body[:d]
    text = json.dumps(header).encode()
    return bytearray(len(text).to_bytes(8, "little") + text + body)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_fail_cleanly(tmp_path_factory, capsys, data):
    tmp = tmp_path_factory.mktemp("fuzz")
    raw = bytearray(_valid(str(tmp / "valid.safetensors")))
    kind = data.draw(st.sampled_from(["flip", "truncate", "header", "splice", "layout"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "header":  # rewrite bytes inside the JSON header only
        n = int.from_bytes(raw[:8], "little")
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(8, 8 + n - 1))
            raw[i] = data.draw(st.sampled_from(list(b'{}[]":,0123456789-eE.abc ')))
    elif kind == "splice":
        raw = raw[:8] + data.draw(st.binary(min_size=0, max_size=64)) + raw[8:]
    else:  # a well-formed header whose layout lies: shifted, aliased (overlapping) or reshaped tensors
        raw = _relayout(raw, data)
    path = str(tmp / "mutant.safetensors")
    with open(path, "wb") as f:
        f.write(raw)
    capsys.readouterr()
    codes = []
    for args in (["inspect", path], ["convert", path, str(tmp / "out.safetensors"), "--to", "fastvideo"],
                 ["convert", path, str(tmp / "same.safetensors"), "--to", "longcat"]):
        code = main(args)
        err = capsys.readouterr().err
        assert code in (0, 2), (kind, code, err)
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and "internal error" not in err, err
        codes.append(code)
    assert [f for f in os.listdir(tmp) if f.endswith(".tmp")] == []
    for code, out in zip(codes[1:], ("out.safetensors", "same.safetensors")):
        assert os.path.exists(tmp / out) == (code == 0), (kind, codes)
    if 0 in codes:
        # Accepted: then it is a valid file, and we read what the safetensors library reads from it.
        # Silent acceptance of corruption (a tensor read from the wrong bytes, a truncated one) fails here.
        theirs = load(path)  # raises if the library refuses a file we accepted
        if codes[2] == 0:  # native -> native: the exact same tensors, bit for bit
            same = load(str(tmp / "same.safetensors"))
            assert same.keys() == theirs.keys(), kind
            for k, v in theirs.items():
                assert same[k].dtype == v.dtype and torch.equal(same[k].reshape(v.shape), v), (kind, k)
        if codes[1] == 0:  # the FastVideo form: the same weight change (exact unless a scale is folded)
            assert worst(official_delta(path), fastvideo_delta(str(tmp / "out.safetensors"))) < 1e-6, kind
