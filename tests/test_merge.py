"""`merge` / merge_checkpoint: sharded bases in both namings, against apply_lora on the reference DiT."""

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import longcat_lora as L
from longcat_lora.testing.dit import TINY, LongCatDiT, LongCatDiTSplit
from longcat_lora.testing.fixtures import write_base_checkpoint, write_native_lora
import longcat_lora.apply.merge as merge_mod
from longcat_lora.commands.cli import parse_lora_arg
from longcat_lora.apply.merge_compute import AUTO_CUDA_GFLOP, DeviceStages, resolve_device
from longcat_lora.apply.pipeline import Pipeline
from longcat_lora.io.reader import SafeFile

from conftest import cli
from test_faults import ENV, MAIN, temps
from reference import fastvideo_delta, half_ulp, official_delta, rel_err
from rounding_reference import merge_reference, native_terms, same_bits

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _load_dir(path):
    sd = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(path, f)))
    return sd


def _inputs():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(1, TINY.in_channels, 2, 4, 4, generator=g), torch.tensor([400.0]),
            torch.randn(1, 1, 5, TINY.caption_channels, generator=g))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    bases = {n: write_base_checkpoint(str(d / f"base_{n}"), TINY, n, shards=3, dtype=torch.float32)
             for n in ("longcat", "fastvideo")}
    os.makedirs(os.path.join(bases["longcat"], "scheduler"))
    with open(os.path.join(bases["longcat"], "scheduler", "scheduler_config.json"), "w") as f:
        f.write("{}")
    ref = write_native_lora(str(d / "ref.safetensors"), "refinement", dims=TINY.dims, rank=4, dtype=torch.float32,
                            alpha_scale=0.5, seed=11)
    cfg = write_native_lora(str(d / "cfg.safetensors"), "cfg_step", dims=TINY.dims, rank=3,
                            dtype=torch.bfloat16, alpha_scale=0.3, seed=12)
    L.convert(cfg, str(d / "cfg_fv.safetensors"), "fastvideo")
    L.convert(ref, str(d / "ref_peft"), "peft")
    return d, bases, {"ref": ref, "cfg": cfg, "cfg_fv": str(d / "cfg_fv.safetensors"), "ref_peft": str(d / "ref_peft")}


@pytest.mark.parametrize("naming", ["longcat", "fastvideo"])
def test_merged_checkpoint_reproduces_apply_lora(setup, naming):
    d, bases, loras = setup
    out = str(d / f"merged_{naming}")
    p = cli("merge", bases[naming], out, "--lora", f"{loras['ref_peft']}:0.8", "--lora", f"{loras['cfg_fv']}:-1.2",
            "--lora", loras["cfg"] + ":0.5")
    assert "weights changed" in p.stdout
    Model = LongCatDiT if naming == "longcat" else LongCatDiTSplit
    base_sd, merged_sd = _load_dir(bases[naming]), _load_dir(out)
    live = Model(TINY).eval()
    live.load_state_dict(base_sd)
    L.apply_lora(live, loras["ref"], 0.8)
    L.apply_lora(live, loras["cfg"], -1.2)
    L.apply_lora(live, loras["cfg_fv"], 0.5)
    merged = Model(TINY).eval()
    merged.load_state_dict(merged_sd)
    with torch.no_grad():
        want, got = live(*_inputs()), merged(*_inputs())
        L.remove_lora(live)
        plain = live(*_inputs())
    assert rel_err(want, plain) > 1e-3
    assert rel_err(want, got) <= 1e-5
    # untouched tensors bit-identical; LoRA-touched ones changed; same shard names and index
    touched = {k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])}
    assert touched and all(k.endswith(".weight") for k in touched)
    assert not any("norm" in k or "embed" in k for k in touched)
    assert base_sd.keys() == merged_sd.keys()
    assert sorted(os.listdir(out)) == sorted(os.listdir(bases[naming]))
    assert json.load(open(os.path.join(out, INDEX))) == json.load(open(os.path.join(bases[naming], INDEX)))
    for shard in os.listdir(out):
        if shard.endswith(".safetensors"):
            with safe_open(os.path.join(out, shard), "pt") as a, safe_open(os.path.join(bases[naming], shard), "pt") as b:
                assert set(a.keys()) == set(b.keys())
    if naming == "longcat":
        assert open(os.path.join(out, "scheduler", "scheduler_config.json")).read() == "{}"


def test_merge_math_fp32_cast_once_and_dtype_option(setup):
    d, bases, loras = setup
    out = str(d / "merged_bf16")
    L.merge_checkpoint(bases["longcat"], out, [(loras["ref"], 0.8), (loras["cfg_fv"], 0.5)], dtype="bf16")
    base_sd, merged_sd = _load_dir(bases["longcat"]), _load_dir(out)
    # independent float64 references: the native file by the official formula, the FastVideo file as
    # FastVideo's loader reads it
    dW = 0.8 * official_delta(loras["ref"])["blocks.5.attn.qkv"] + 0.5 * fastvideo_delta(loras["cfg_fv"])["blocks.5.attn.qkv"]
    W = base_sd["blocks.5.attn.qkv.weight"].double()
    want = W + dW
    got = merged_sd["blocks.5.attn.qkv.weight"].double()
    # cast once: within half a bf16 ulp of the exact value (plus float32 arithmetic)
    assert ((got - want).abs() <= half_ulp(want, torch.bfloat16) * (1 + 2 ** -10) + 2e-7 * (W.abs() + dW.abs())).all()
    assert all(v.dtype == torch.bfloat16 for v in merged_sd.values())
    assert torch.equal(merged_sd["x_embedder.proj.weight"], base_sd["x_embedder.proj.weight"].to(torch.bfloat16))
    idx = json.load(open(os.path.join(out, INDEX)))
    assert idx["metadata"]["total_size"] == sum(v.numel() * 2 for v in merged_sd.values())


def test_single_file_base_and_exact_fp32_merge(setup, tmp_path):
    d, bases, loras = setup
    sd = _load_dir(bases["longcat"])
    single = str(tmp_path / "dit.safetensors")
    save_file(sd, single)
    out = str(tmp_path / "merged.safetensors")
    L.merge_checkpoint(single, out, [(loras["ref"], 1.0)])
    m = load_file(out)
    dW = official_delta(loras["ref"])["final_layer.adaLN_modulation.1"]
    want = sd["final_layer.adaLN_modulation.1.weight"].double() + dW
    assert torch.allclose(m["final_layer.adaLN_modulation.1.weight"].double(), want, rtol=0, atol=1e-7)
    assert torch.equal(m["blocks.0.attn.q_norm.weight"], sd["blocks.0.attn.q_norm.weight"])


def test_parse_lora_arg():
    assert parse_lora_arg("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)
    assert parse_lora_arg("dir:with:colons:-2") == ("dir:with:colons", -2.0)


def _copy_base(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_bad_bases_fail_cleanly(setup, tmp_path):
    d, bases, loras = setup
    lc = bases["longcat"]
    cases = {}
    b = _copy_base(lc, tmp_path / "missing_shard")
    os.remove(os.path.join(b, "diffusion_pytorch_model-00002-of-00003.safetensors"))
    cases["missing_shard"] = (b, "is missing")
    b = _copy_base(lc, tmp_path / "index_names_missing")
    idx = json.load(open(os.path.join(b, INDEX)))
    idx["weight_map"]["blocks.99.attn.qkv.weight"] = "diffusion_pytorch_model-00001-of-00003.safetensors"
    json.dump(idx, open(os.path.join(b, INDEX), "w"))
    cases["index_names_missing_tensor"] = (b, "does not hold it")
    b = _copy_base(lc, tmp_path / "pickled_shard")
    with open(os.path.join(b, "diffusion_pytorch_model-00003-of-00003.safetensors"), "wb") as f:
        pickle.dump({"x": 1}, f, protocol=4)
    cases["pickled_shard"] = (b, "never unpickled")
    b = _copy_base(lc, tmp_path / "shape_mismatch")
    shard = os.path.join(b, "diffusion_pytorch_model-00001-of-00003.safetensors")
    sd = load_file(shard)
    key = next(k for k in sd if k.endswith("attn.qkv.weight"))
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1)
    save_file(sd, shard)
    cases["shape_mismatch"] = (b, "do not fit")
    for name, (base, msg) in cases.items():
        out = tmp_path / f"out_{name}"
        before = sorted(os.listdir(tmp_path))
        p = cli("merge", base, out, "--lora", loras["ref"], check=2)
        assert msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, (name, p.stderr)
        assert not out.exists() and sorted(os.listdir(tmp_path)) == before, name
    # output inside / equal to base; existing output
    p = cli("merge", lc, os.path.join(lc, "sub"), "--lora", loras["ref"], check=2)
    assert "inside" in p.stderr
    p = cli("merge", lc, lc, "--lora", loras["ref"], "--overwrite", check=2)
    assert "same path" in p.stderr
    os.makedirs(tmp_path / "exists")
    p = cli("merge", lc, tmp_path / "exists", "--lora", loras["ref"], check=2)
    assert "--overwrite" in p.stderr
    p = cli("merge", tmp_path / "exists", tmp_path / "o2", "--lora", loras["ref"], check=2)
    assert "cannot tell which are the shards" in p.stderr


def test_unmapped_lora_modules(setup, tmp_path):
    d, bases, loras = setup
    sd = load_file(loras["cfg"])
    audio = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___audio_attn___lorahyphen___qkv"
    sd[f"{audio}.lora_down.weight"] = torch.randn(2, 64)
    sd[f"{audio}.lora_up.weight"] = torch.randn(192, 2)
    path = str(tmp_path / "avatar.safetensors")
    save_file(sd, path)
    p = cli("merge", bases["fastvideo"], tmp_path / "o", "--lora", path, check=2)
    assert "blocks.0.audio_attn.qkv" in p.stderr and not (tmp_path / "o").exists()
    p = cli("merge", bases["fastvideo"], tmp_path / "o", "--lora", path, "--skip-unmapped")
    assert "skipped" in p.stderr and "audio_attn" in p.stderr


def test_cuda_device_without_cuda_is_a_clean_error(setup, tmp_path):
    d, bases, loras = setup
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present (tests/test_merge_cuda.py compares it with the CPU path)")
    p = cli("merge", bases["longcat"], tmp_path / "o", "--lora", loras["ref"], "--device", "cuda", check=2)
    assert p.stderr.strip() == "longcat-lora: error: --device cuda: no CUDA device is available", p.stderr
    assert not (tmp_path / "o").exists()


# ---- the pipeline: order, bounds, errors, shutdown --------------------------------------------------

class _Recorder:
    """Stages that record what each stage saw and check the slot discipline as they go."""

    def __init__(self, depth, fail=None):
        self.depth, self.fail = depth, fail  # fail: (stage, job) that raises
        self.events, self.slot_in, self.slot_out = [], {}, {}
        self.lock = threading.Lock()

    def _log(self, stage, job, slot):
        with self.lock:
            self.events.append((stage, job))
        if self.fail == (stage, job):
            raise OSError(f"{stage} failed on {job}")

    def load(self, job, slot):
        assert self.slot_in.get(slot) is None, f"slot {slot} input overwritten before it was computed"
        self._log("load", job, slot)
        self.slot_in[slot] = job

    def compute(self, job, slot):
        assert self.slot_in[slot] == job and self.slot_out.get(slot) is None, (job, slot)
        time.sleep(0.002 * (job % 3))  # uneven stages
        self._log("compute", job, slot)
        self.slot_in[slot] = None
        self.slot_out[slot] = job

    def finish(self, job, slot):
        assert self.slot_out[slot] == job
        return np.array([job])

    def release(self, slot):
        self.slot_out[slot] = None


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_pipeline_runs_jobs_in_order_within_depth_slots(depth):
    rec = _Recorder(depth)
    got = []
    with Pipeline(list(range(12)), rec, depth) as pipe:
        for i in range(12):
            if i:
                rec.release((i - 1) % depth)  # the caller is done with job i-1 before taking job i
            got.append(int(pipe.take(i)[0]))
            time.sleep(0.001)
    assert got == list(range(12))
    for stage in ("load", "compute"):
        assert [j for s, j in rec.events if s == stage] == list(range(12))
    # never more than `depth` jobs loaded ahead of the last computed one
    loaded = computed = 0
    for s, _ in rec.events:
        loaded += s == "load"
        computed += s == "compute"
        assert loaded - computed <= depth
    assert not [t for t in threading.enumerate() if t.name.startswith("merge-")]
    with pytest.raises(RuntimeError, match="out of order"):
        Pipeline([0, 1], _Recorder(1), 1).take(-1)


@pytest.mark.parametrize("stage", ["load", "compute"])
def test_pipeline_error_reaches_the_caller_at_its_job_and_stops_the_threads(stage):
    rec = _Recorder(2, fail=(stage, 3))
    pipe = Pipeline(list(range(8)), rec, 2)
    try:
        for i in range(3):
            rec.release((i - 1) % 2) if i else None
            assert int(pipe.take(i)[0]) == i  # earlier jobs come out normally
        rec.release(0)
        with pytest.raises(OSError, match=f"{stage} failed on 3"):
            pipe.take(3)
    finally:
        pipe.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("merge-")]
    assert max(j for s, j in rec.events if s == "compute") <= 3  # nothing computed past the failure


def _threads():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("merge-"))


def test_device_stages_on_cpu_agree_with_the_cpu_path_and_the_reference(setup, tmp_path, monkeypatch):
    """The staged (CUDA) code path, run with device="cpu": the same bytes as the chunked CPU path, and
    every merged element the correctly rounded exact sum (float64 with a bound, Fractions where needed)."""
    d, bases, loras = setup
    for dtype, tdt in (("bf16", torch.bfloat16), ("keep", torch.float32)):
        a, b = str(tmp_path / f"cpu_{dtype}"), str(tmp_path / f"staged_{dtype}")
        L.merge_checkpoint(bases["longcat"], a, [(loras["ref"], 0.8), (loras["cfg"], 0.5)], dtype=dtype,
                           device="cpu")
        with monkeypatch.context() as m:
            m.setattr(merge_mod, "_stages", lambda jobs, device: DeviceStages(jobs, "cpu", merge_mod.DEPTH))
            L.merge_checkpoint(bases["longcat"], b, [(loras["ref"], 0.8), (loras["cfg"], 0.5)], dtype=dtype,
                               device="cpu")
        sa, sb, base_sd = _load_dir(a), _load_dir(b), _load_dir(bases["longcat"])
        assert sa.keys() == sb.keys()
        changed = 0
        for k in sa:
            assert same_bits(sa[k], sb[k]), k
            m = k.removesuffix(".weight")
            if k.endswith(".weight") and m in native_terms(loras["ref"]):
                changed += 1
                if changed % 7 == 0:  # a sample of the weights against the reference (the rest: same bytes)
                    want = merge_reference(base_sd[k], [(loras["ref"], 0.8), (loras["cfg"], 0.5)], m, tdt)
                    assert same_bits(sb[k], want), (k, dtype)
            else:
                assert same_bits(sb[k], base_sd[k].to(tdt)), k
        assert changed > 100


def test_nonfinite_merge_and_failing_read_leave_nothing_and_no_thread(setup, tmp_path, monkeypatch):
    d, bases, loras = setup
    out = tmp_path / "o"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(L.LoraError, match=r"merging gives non-finite values in .* \(as F16\)"):
            L.merge_checkpoint(bases["longcat"], str(out), [(loras["ref"], 1e30)], dtype="fp16")
    assert [str(w.message) for w in seen] == []  # (numpy's overflow warning would be a second stderr line)
    assert not out.exists() and os.listdir(tmp_path) == [] and _threads() == []
    # the CLI as users run it (the suite's `cli` silences Python warnings): one line
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    p = subprocess.run([sys.executable, "-m", "longcat_lora", "merge", bases["longcat"], str(out), "--lora",
                        f"{loras['ref']}:1e30", "--dtype", "fp16"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "non-finite" in p.stderr, p.stderr
    assert not out.exists() and os.listdir(tmp_path) == []
    calls = []
    real = SafeFile.read_into

    def failing(self, name, buf):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(5, "Input/output error", self.path)
        return real(self, name, buf)

    monkeypatch.setattr(SafeFile, "read_into", failing)
    with pytest.raises(OSError, match="Input/output error"):
        L.merge_checkpoint(bases["longcat"], str(out), [(loras["ref"], 1.0)])
    assert len(calls) >= 5 and not out.exists() and os.listdir(tmp_path) == [] and _threads() == []


SLOW = r"""
import time
import longcat_lora.apply.merge_compute as mc
orig = mc.CpuStages.compute
def compute(self, job, slot):
    print("COMPUTING", flush=True)
    time.sleep(0.3)
    return orig(self, job, slot)
mc.CpuStages.compute = compute
"""


def _foreground_signals() -> None:
    """The child as a foreground command gets them: a suite run as a background job (`make test &`) has
    SIGINT ignored, which children inherit and the CLI rightly keeps ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_pipeline_stops_promptly_and_leaves_nothing(setup, tmp_path, sig, code):
    d, bases, loras = setup
    out = tmp_path / "merged"
    p = subprocess.Popen([sys.executable, "-c", "import sys\n" + SLOW + MAIN, "merge", bases["longcat"], str(out),
                          "--lora", loras["ref"], "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV, preexec_fn=_foreground_signals)
    assert p.stdout.readline().strip() == "COMPUTING"
    time.sleep(0.5)
    t0 = time.perf_counter()
    p.send_signal(sig)
    p.wait(timeout=30)
    assert p.returncode == code, p.stderr.read()
    assert time.perf_counter() - t0 < 5  # the threads stop within a job, not at the end of the merge
    assert not out.exists() and temps(tmp_path) == []


def test_device_auto_and_errors_name_parameters(setup, tmp_path, monkeypatch):
    d, bases, loras = setup
    assert resolve_device("auto", 1e6) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu:0", 0.0) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", AUTO_CUDA_GFLOP) == "cuda"
    assert resolve_device("auto", AUTO_CUDA_GFLOP * 0.99) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 1e6) == "cpu"
    for kw, msg in (({"device": "cuda"}, "device='cuda': no CUDA device is available"),
                    ({"device": "meta"}, "device='meta': must be cpu, cuda, cuda:N or auto"),
                    ({"dtype": "int4"}, "dtype='int4': must be one of 'keep', 'bf16', 'fp16', 'fp32', 'fp8_e4m3fn_scaled'")):
        with pytest.raises(L.LoraError) as e:
            L.merge_checkpoint(bases["longcat"], str(tmp_path / "o"), [(loras["ref"], 1.0)], **kw)
        assert str(e.value) == msg and "--" not in str(e.value)
    with pytest.raises(L.LoraError, match="^loras is empty"):
        L.merge_checkpoint(bases["longcat"], str(tmp_path / "o"), [])
    assert not (tmp_path / "o").exists()
    # the default is auto; a small merge runs on the CPU and the summary line says so
    report = L.merge_checkpoint(bases["longcat"], str(tmp_path / "o"), [(loras["ref"], 1.0)])
    assert report.device == "cpu"
    p = cli("merge", bases["longcat"], tmp_path / "o2", "--lora", loras["ref"])
    assert " weights changed on cpu" in p.stdout
