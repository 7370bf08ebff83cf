"""`merge --device cuda` against the CPU path and the correctly rounded reference; skipped where no CUDA
device exists.

The staged device code itself (pinned buffers, streams, events, ring of slots) also runs with
device="cpu" in tests/test_merge.py; this file checks what only a GPU can: the real streams and the
GPU's own float64 arithmetic, which must give the CPU's bytes exactly. Needs torch, safetensors and
pytest only (run by benchmarks/gpu_check.sh).
"""

import os

import pytest
import torch
from safetensors.torch import load_file

import longcat_lora as L
import longcat_lora.apply.merge_compute as mc
from longcat_lora.testing.dit import TINY
from longcat_lora.testing.fixtures import write_base_checkpoint, write_native_lora

from rounding_reference import merge_reference, native_terms, same_bits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _load_dir(path):
    sd = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(path, f)))
    return sd


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_cuda")
    bases = {dt: write_base_checkpoint(str(d / f"base_{dt}"), TINY, "longcat", shards=3, dtype=t)
             for dt, t in (("f32", torch.float32), ("bf16", torch.bfloat16))}
    ref = write_native_lora(str(d / "ref.safetensors"), "refinement", dims=TINY.dims, rank=4, dtype=torch.float32,
                            alpha_scale=0.5, seed=11)
    cfg = write_native_lora(str(d / "cfg.safetensors"), "cfg_step", dims=TINY.dims, rank=3, dtype=torch.bfloat16,
                            alpha_scale=0.3, seed=12)
    return d, bases, [(ref, 0.8), (cfg, -0.6)]


@pytest.mark.parametrize("base, dtype", [("f32", "keep"), ("f32", "bf16"), ("bf16", "keep"), ("f32", "fp16")])
def test_cuda_merge_gives_the_cpu_bytes(setup, tmp_path, base, dtype):
    d, bases, loras = setup
    a, b = str(tmp_path / "cpu"), str(tmp_path / "cuda")
    L.merge_checkpoint(bases[base], a, loras, dtype=dtype, device="cpu")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed by the caller: float64 sums ignore it
    try:
        report = L.merge_checkpoint(bases[base], b, loras, dtype=dtype, device="cuda")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    assert report.device == "cuda"
    sa, sb, base_sd = _load_dir(a), _load_dir(b), _load_dir(bases[base])
    assert sa.keys() == sb.keys() == base_sd.keys()
    checked = 0
    for k in sorted(sa):
        assert same_bits(sa[k], sb[k]), k
        m = k.removesuffix(".weight")
        if k.endswith(".weight") and m in native_terms(loras[0][0]) and checked < 20:
            assert same_bits(sb[k], merge_reference(base_sd[k], loras, m, sb[k].dtype)), k
            checked += 1
    assert checked == 20


def test_cuda_nonfinite_is_refused_and_auto_picks_cuda_for_big_merges(setup, tmp_path, monkeypatch):
    d, bases, loras = setup
    out = tmp_path / "o"
    with pytest.raises(L.LoraError, match=r"merging gives non-finite values in .* \(as F16\)"):
        L.merge_checkpoint(bases["f32"], str(out), [(loras[0][0], 1e30)], dtype="fp16", device="cuda")
    assert not out.exists()
    assert L.merge_checkpoint(bases["f32"], str(tmp_path / "small"), loras).device == "cpu"  # below the threshold
    monkeypatch.setattr(mc, "AUTO_CUDA_GFLOP", 0.0)
    assert L.merge_checkpoint(bases["f32"], str(tmp_path / "big"), loras).device == "cuda"
