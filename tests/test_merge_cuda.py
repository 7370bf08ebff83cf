"""`merge --device cuda` against the CPU path and a float64 reference; skipped where no CUDA device exists.

The staged device code itself (pinned buffers, streams, events, ring of slots) also runs with
device="cpu" in tests/test_merge.py; this file checks what only a GPU can: the real streams and the
GPU's own fp32 arithmetic. Needs torch, safetensors and pytest only (run by benchmarks/gpu_check.sh).
"""

import os

import pytest
import torch
from safetensors.torch import load_file

import longcat_lora as L
import longcat_lora.apply.merge_compute as mc
from longcat_lora.testing.dit import TINY
from longcat_lora.testing.fixtures import write_base_checkpoint, write_native_lora

from reference import half_ulp, official_delta

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
def test_cuda_merge_matches_cpu_within_one_output_rounding(setup, tmp_path, base, dtype):
    d, bases, loras = setup
    a, b = str(tmp_path / "cpu"), str(tmp_path / "cuda")
    L.merge_checkpoint(bases[base], a, loras, dtype=dtype, device="cpu")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed by the caller: the merge must not use it
    try:
        report = L.merge_checkpoint(bases[base], b, loras, dtype=dtype, device="cuda")
        assert torch.get_float32_matmul_precision() == "high"  # restored
    finally:
        torch.set_float32_matmul_precision(before)
    assert report.device == "cuda"
    sa, sb, base_sd = _load_dir(a), _load_dir(b), _load_dir(bases[base])
    assert sa.keys() == sb.keys() == base_sd.keys()
    deltas = [(official_delta(p), s) for p, s in loras]
    same = total = 0
    for k in sa:
        x, y = sa[k], sb[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        m = k.removesuffix(".weight")
        if not any(m in dd for dd, _ in deltas):
            assert torch.equal(x, y), k  # untouched: the same bytes
            continue
        # one output rounding apart at most (two roundings of nearly the same fp32 value)
        xd, yd = x.double(), y.double()
        assert ((xd - yd).abs() <= 2 * half_ulp(torch.maximum(xd.abs(), yd.abs()), x.dtype)).all(), k
        same += int((x == y).sum())
        total += x.numel()
        # and the GPU result itself within one rounding of the float64 reference (plus fp32 arithmetic)
        w = base_sd[k].double()
        want = w + sum(s * dd[m] for dd, s in deltas if m in dd)
        bound = half_ulp(want, x.dtype) * (1 + 2 ** -10) + 2e-7 * (w.abs() + want.abs()) + 7 * 0.1 * 2 ** -24
        assert ((yd - want).abs() <= bound).all(), k
    assert total > 0 and same / total > 0.99  # nearly every element is bit-identical


def test_cuda_nonfinite_is_refused_and_auto_picks_cuda_for_big_merges(setup, tmp_path, monkeypatch):
    d, bases, loras = setup
    out = tmp_path / "o"
    with pytest.raises(L.LoraError, match=r"merging gives non-finite values in .* \(as F16\)"):
        L.merge_checkpoint(bases["f32"], str(out), [(loras[0][0], 1e30)], dtype="fp16", device="cuda")
    assert not out.exists()
    assert L.merge_checkpoint(bases["f32"], str(tmp_path / "small"), loras).device == "cpu"  # below the threshold
    monkeypatch.setattr(mc, "AUTO_CUDA_GFLOP", 0.0)
    assert L.merge_checkpoint(bases["f32"], str(tmp_path / "big"), loras).device == "cuda"
