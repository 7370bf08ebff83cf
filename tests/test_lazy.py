"""Laziness, proved by counting reads: `load_lora` reads headers and scalars only, in every format, and a
conversion reads each big tensor a known number of times (once; a standard layer's lora_B twice, since its
diagonal blocks are found from its values before the output's header can be written).

Also the NaN/Inf read policy: refused while an adapter is written (unless allowed), never outside.
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import longcat_lora as L
from longcat_lora.io import reader, writer
from longcat_lora.model.adapter import LoraAdapter, LoraModule, Part
from longcat_lora.model.sources import NonFinite, TensorSource, folded
from longcat_lora.testing.dit import TINY
from longcat_lora.testing.fixtures import write_native_lora

FORMATS = ("longcat", "fastvideo", "peft", "diffusers", "kohya")
SCALAR_SHAPES = ((), (1,))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The same refinement-layout LoRA (fp32, alpha_scale 0.3) in every format; format -> path."""
    d = tmp_path_factory.mktemp("lazy")
    src = write_native_lora(str(d / "native.safetensors"), "refinement", dims=TINY.dims, rank=4,
                            dtype=torch.float32, alpha_scale=0.3)
    paths = {"longcat": src}
    for fmt in FORMATS[1:]:
        paths[fmt] = str(d / (fmt if fmt == "peft" else f"{fmt}.safetensors"))
        L.convert(src, paths[fmt], fmt)
    return paths


@pytest.fixture
def reads(monkeypatch):
    """tensor name -> bytes taken from an input: read by the reader (pread) or copied by the writer."""
    count: collections.Counter[str] = collections.Counter()
    pread, copy_run = reader.SafeFile._pread, writer._copy_run

    def counting_pread(self, name, start, buf):
        count[name] += buf.nbytes
        return pread(self, name, start, buf)

    def counting_copy(parts, fd):
        for p in parts:
            count[p.name] += p.nbytes
        return copy_run(parts, fd)

    monkeypatch.setattr(reader.SafeFile, "_pread", counting_pread)
    monkeypatch.setattr(writer, "_copy_run", counting_copy)
    return count


def _infos(adapter: LoraAdapter) -> dict[str, reader.TensorInfo]:
    (f,) = adapter.files
    return {k: f.info(k) for k in f.keys()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_reads_headers_and_scalars_only(inputs, reads, fmt):
    with L.load_lora(inputs[fmt]) as a:
        infos = _infos(a)
        scalars = {k: i.nbytes for k, i in infos.items() if i.shape in SCALAR_SHAPES}
        assert dict(reads) == scalars  # each scalar once, no matrix at all
        assert len(infos) - len(scalars) >= 2 * len(a.modules) > 0
        # shapes, ranks of the parts as given and their validation need no values either
        assert sum(p.rank for m in a.modules.values() for p in m.given) > 0
        assert dict(reads) == scalars


@pytest.mark.parametrize("to", FORMATS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_reads_each_big_tensor_a_known_number_of_times(inputs, reads, tmp_path, fmt, to):
    with L.load_lora(inputs[fmt]) as a:
        big = {k: i.nbytes for k, i in _infos(a).items() if i.shape not in SCALAR_SHAPES}
        reads.clear()
        L.save_lora(a, str(tmp_path / "out"), to)
        times = {k: reads[k] / n for k, n in big.items()}
        # a standard layer's B is read once to find its diagonal blocks and once to be written
        expected = {k: 2.0 if fmt != "longcat" and ("lora_B" in k or "lora_up" in k) else 1.0 for k in big}
        assert times == expected
        # parts are found once per adapter: a second conversion reads every big tensor once
        reads.clear()
        L.save_lora(a, str(tmp_path / "again"), to)
        assert {k: reads[k] / n for k, n in big.items()} == {k: 1.0 for k in big}


def test_parts_are_found_on_first_use_and_then_kept(inputs, reads):
    with L.load_lora(inputs["peft"]) as a:
        m = a.modules["blocks.0.attn.qkv"]
        assert [p.rows for p in m.given] == [(0, 3 * TINY.dims.hidden)]  # one standard layer, unread
        b_key = next(k for k in a.files[0].keys() if "blocks.0.attn.qkv.lora_B" in k)
        before = reads[b_key]
        parts = m.parts  # its block-diagonal B split back into the 3 native up blocks
        d = TINY.dims.hidden
        assert [p.rows for p in parts] == [(0, d), (d, 2 * d), (2 * d, 3 * d)] and m.ranks == [4, 4, 4]
        assert reads[b_key] - before == a.files[0].info(b_key).nbytes
        assert m.parts is parts and reads[b_key] - before == a.files[0].info(b_key).nbytes


def _native_with_nan(tmp_path) -> tuple[str, str]:
    src = write_native_lora(str(tmp_path / "n.safetensors"), "cfg_step", dims=TINY.dims, rank=4,
                            dtype=torch.float32, alpha_scale=0.5)
    tensors = load_file(src)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key][1, 2] = float("nan")
    bad = str(tmp_path / "nan.safetensors")
    save_file(tensors, bad, metadata={"format": "pt"})
    return bad, key


@pytest.mark.parametrize("to", ["longcat", "peft"])  # copied unread (scanned as copied) / read and placed
def test_nonfinite_refused_while_written_unless_allowed_and_never_outside(tmp_path, to):
    bad, key = _native_with_nan(tmp_path)
    with L.load_lora(bad) as a:
        with pytest.raises(L.LoraError, match=r"non-finite values \(NaN/Inf\) in its LoRA weights"):
            L.save_lora(a, str(tmp_path / "o1"), to)
        assert not os.path.exists(tmp_path / "o1")
        L.save_lora(a, str(tmp_path / "o2"), to, allow_nonfinite=True)
        # outside a write the policy is off again: merging and the runtime check what they compute
        stored = [s for m in a.modules.values() for p in m.parts for s in p.up.stored()]
        assert stored and not any(s.refuse_nonfinite for s in stored)
        m = next(m for m in a.modules.values() if any(torch.isnan(p.up.load()).any() for p in m.parts))
        assert int(torch.isnan(m.delta()).sum()) == m.in_features  # one NaN up entry spoils one row


def test_in_memory_nonfinite_and_fold_overflow_refused_while_written(tmp_path):
    down = TensorSource(torch.ones(2, 3, dtype=torch.float32))
    up = TensorSource(torch.tensor([[1.0, float("inf")], [0.0, 1.0]], dtype=torch.float32))
    a = LoraAdapter({"blocks.0.attn.proj": LoraModule("blocks.0.attn.proj", 2, 3, [Part((0, 2), down, up, 1.0)])})
    with pytest.raises(L.LoraError, match=r"non-finite values"):
        L.save_lora(a, str(tmp_path / "m.safetensors"), "peft")
    # a finite fp32 value times a factor beyond fp32's range: refused only while refusing
    big = folded(TensorSource(torch.full((2, 2), 3e38, dtype=torch.float32)), 10.0)
    assert bool(torch.isinf(big.load()).all())
    (leaf,) = list(big.stored())
    leaf.refuse_nonfinite = True
    with pytest.raises(NonFinite):
        big.load()


@pytest.mark.parametrize("to", FORMATS)
def test_native_down_matrices_are_copied_unread_into_every_format(inputs, reads, tmp_path, to, monkeypatch):
    """A fused module's down matrix goes back together from its parts' row slices as the one file range it
    is (copied by the kernel), never read and concatenated: counted apart from the copies."""
    preads: collections.Counter[str] = collections.Counter()
    pread = reader.SafeFile._pread

    def counting_pread(self, name, start, buf):
        preads[name] += buf.nbytes
        return pread(self, name, start, buf)

    monkeypatch.setattr(reader.SafeFile, "_pread", counting_pread)
    with L.load_lora(inputs["longcat"]) as a:
        downs = {k: i.nbytes for k, i in _infos(a).items() if k.endswith("lora_down.weight")}
        assert any(len(m.parts) == 3 for m in a.modules.values())  # fused qkv modules are there
        reads.clear()
        L.save_lora(a, str(tmp_path / "out"), to)
        assert {k: preads[k] for k in downs} == {k: 0 for k in downs}
        assert {k: reads[k] for k in downs} == downs  # each copied exactly once


@pytest.mark.parametrize("to", ["longcat", "peft", "fastvideo"])
def test_nonfinite_in_a_fused_down_is_refused_though_copied_unread(tmp_path, to):
    src = write_native_lora(str(tmp_path / "n.safetensors"), "cfg_step", dims=TINY.dims, rank=4,
                            dtype=torch.float32, alpha_scale=0.5)
    tensors = load_file(src)
    key = next(k for k in tensors if k.endswith("attn___lorahyphen___qkv.lora_down.weight"))
    tensors[key][9, 1] = float("-inf")  # the third part's rows (rank 4 each)
    bad = str(tmp_path / "inf.safetensors")
    save_file(tensors, bad, metadata={"format": "pt"})
    with L.load_lora(bad) as a:
        with pytest.raises(L.LoraError, match=r"non-finite values \(NaN/Inf\) in its LoRA weights"):
            L.save_lora(a, str(tmp_path / "o1"), to)
    assert not os.path.exists(tmp_path / "o1")
