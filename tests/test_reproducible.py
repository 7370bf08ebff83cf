"""Same bytes on every machine (issue 21): each merged element is the correctly rounded value of the exact
`W + sum strength * scale * up @ down`, so the output depends only on the inputs.

Checked against an independent reference (tests/rounding_reference.py: float64 with a rigorous bound,
Fractions where the bound cannot decide) over bf16, fp16 and fp32 bases and outputs, strengths that are
not powers of two, two LoRAs of different dtypes, and weights built so that the sum nearly cancels; and
the bytes are shown not to depend on the number of chunk workers, the chunk size, torch's thread count,
the order of the rank sums (a hook permutes and splits every LoRA part), the BLAS and vector kernels
(environment settings in a subprocess), or the staged (CUDA) code path.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import longcat_lora as L
from longcat_lora.apply import merge as merge_mod, merge_compute as mc
from longcat_lora.apply.exact import Term

from rounding_reference import merge_reference, merged, merged_fractions, native_terms, same_bits

H, F = 64, 176
SEP = "___lorahyphen___"
MODULES = {  # module -> (out, in, up blocks)
    "blocks.0.attn.qkv": (3 * H, H, 3),
    "blocks.0.cross_attn.kv_linear": (2 * H, H, 2),
    "blocks.0.ffn.w2": (H, F, 1),
}
STRENGTHS = (0.7, -0.35)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def _native(path, rank, dtype, alpha_scale, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m, (out, inp, n) in MODULES.items():
        key = "lora" + SEP + m.replace(".", SEP)
        sd[key + ".lora_down.weight"] = (torch.randn(n * rank, inp, generator=g) * spread).to(dtype)
        ups = [(torch.randn(out // n, rank, generator=g) * 0.1).to(dtype) for _ in range(n)]
        if n == 1:
            sd[key + ".lora_up.weight"] = ups[0]
        else:
            sd.update({f"{key}.lora_up.blocks.{i}.weight": u for i, u in enumerate(ups)})
        sd[key + ".alpha_scale"] = torch.tensor(alpha_scale, dtype=torch.float32)
    save_file(sd, str(path))
    return str(path)


def _base(path, dtype, loras, seed=1):
    """A single-file base: the adapted weights, one untouched weight and a bias. The first 16 rows of qkv
    nearly cancel the LoRAs' change (W = -round(dW) + a few ulps), so the exact sums are tiny there."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m, (out, inp, _) in MODULES.items():
        w = torch.randn(out, inp, generator=g) * 0.02
        if m.endswith("qkv"):
            dw = sum(s * merged(torch.zeros(out, inp, dtype=torch.float64),
                                [(r0, r1, u, d, 1.0, sc) for r0, r1, u, d, sc in native_terms(p)[m]],
                                torch.float64) for p, s in loras)
            w[:16] = (-dw[:16]).to(dtype).float()
            w[:16] += torch.randint(-2, 3, (16, inp), generator=g) * w[:16].abs() * 2 ** -9
        sd[m + ".weight"] = w.to(dtype)
    sd["blocks.0.attn.proj.weight"] = (torch.randn(H, H, generator=g) * 0.02).to(dtype)
    sd["blocks.0.attn.qkv.bias"] = torch.zeros(3 * H, dtype=dtype)
    save_file(sd, str(path))
    return str(path)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("repro")
    a = _native(d / "a.safetensors", 8, torch.bfloat16, 0.5, seed=5)
    b = _native(d / "b.safetensors", 5, torch.float32, 0.3, seed=6, spread=3.0)
    loras = list(zip((a, b), STRENGTHS))
    bases = {k: _base(d / f"base_{k}.safetensors", t, loras) for k, t in DTYPES.items()}
    return d, bases, loras


def _digest(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_the_reference_agrees_with_fractions_everywhere(case):
    """The float64-with-bound reference is itself checked against Fractions on every element of one weight."""
    d, bases, loras = case
    base = load_file(bases["bf16"])["blocks.0.attn.qkv.weight"]
    terms = [(r0, r1, u, dn, s, sc) for p, s in loras for r0, r1, u, dn, sc in native_terms(p)["blocks.0.attn.qkv"]]
    for dt in (torch.bfloat16, torch.float32):
        assert same_bits(merged(base.double(), terms, dt), merged_fractions(base.double(), terms, dt))


@pytest.mark.parametrize("base, dtype", [("bf16", "keep"), ("fp16", "keep"), ("fp32", "keep"), ("fp32", "bf16"),
                                         ("fp32", "fp16"), ("bf16", "fp32"), ("fp64", "keep")])
def test_every_merged_element_is_correctly_rounded(case, tmp_path, base, dtype):
    from conftest import cli

    d, bases, loras = case
    out = tmp_path / "o.safetensors"
    cli("merge", bases[base], out, *[a for p, s in loras for a in ("--lora", f"{p}:{s}")], "--dtype", dtype,
        "--device", "cpu")
    got, src = load_file(str(out)), load_file(bases[base])
    want_dtype = DTYPES.get(dtype, DTYPES[base])
    tiny = 0
    for k, w in src.items():
        m = k.removesuffix(".weight")
        if m in MODULES and k.endswith(".weight"):
            want = merge_reference(w, loras, m, want_dtype)
            assert same_bits(got[k], want), (k, int((got[k] != want).sum()))
            if m.endswith("qkv"):  # the cancelling rows: results far below the base weights' size
                tiny = int((want[:16].double().abs() < 2 ** -9 * w[:16].double().abs()).sum())
        else:
            assert same_bits(got[k], w.to(want_dtype)), k
    assert tiny > 100


def test_float32_arithmetic_gets_the_cancelling_rows_wrong(case):
    """Guards the fixture: summing in float32 and casting (the merge before issue 21) misses the correctly
    rounded value in the cancelling rows, so the test above can tell the two apart."""
    d, bases, loras = case
    w = load_file(bases["bf16"])["blocks.0.attn.qkv.weight"]
    f32 = w.float()
    for p, s in loras:
        for r0, r1, u, dn, sc in native_terms(p)["blocks.0.attn.qkv"]:
            f32[r0:r1].addmm_(u.float(), dn.float(), alpha=s * sc)
    want = merge_reference(w, loras, "blocks.0.attn.qkv", torch.bfloat16)
    assert int((f32.to(torch.bfloat16) != want)[:16].sum()) > 0


def _merge(case, out, **kw) -> str:
    d, bases, loras = case
    L.merge_checkpoint(bases["bf16"], str(out), loras, device="cpu", **kw)
    return _digest(str(out))


def test_bytes_do_not_depend_on_workers_chunks_threads_or_summation_order(case, tmp_path, monkeypatch):
    ref = _merge(case, tmp_path / "ref.safetensors")
    digests = {}
    for workers in (1, 2, 4):
        for chunk in (None, H, 5 * H):  # default, one row, five rows per chunk
            with monkeypatch.context() as m:
                m.setattr(merge_mod, "_stages", lambda jobs, device, w=workers, c=chunk: mc.CpuStages(
                    merge_mod.DEPTH, workers=w, chunk_elements=c))
                digests[workers, chunk] = _merge(case, tmp_path / f"w{workers}_{chunk}.safetensors")
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            digests["threads", n] = _merge(case, tmp_path / f"t{n}.safetensors")
    finally:
        torch.set_num_threads(before)
    real = mc.Job.terms
    orders = []

    def reordered(self, *a, **k):
        """The same exact sum in another order: each part's rank permuted and split in two."""
        out = []
        for t in real(self, *a, **k):
            r = t.up.shape[1]
            perm = torch.randperm(r, generator=torch.Generator().manual_seed(r))
            up, down = t.up[:, perm], t.down[perm]
            h = max(1, r // 2)
            out += [Term(t.rows, up[:, :h].contiguous(), down[:h].contiguous(), t.strength, t.scale),
                    Term(t.rows, up[:, h:].contiguous(), down[h:].contiguous(), t.strength, t.scale)]
            orders.append(not torch.equal(t.up @ t.down, up[:, :h] @ down[:h] + up[:, h:] @ down[h:]))
        return out

    monkeypatch.setattr(mc.Job, "terms", reordered)
    digests["reordered"] = _merge(case, tmp_path / "reordered.safetensors")
    assert any(orders)  # the float64 sums really came out differently in that order
    monkeypatch.setattr(mc.Job, "terms", real)
    monkeypatch.setattr(merge_mod, "_stages", lambda jobs, device: mc.DeviceStages(jobs, "cpu", merge_mod.DEPTH))
    digests["staged"] = _merge(case, tmp_path / "staged.safetensors")
    assert set(digests.values()) == {ref}, {k: v == ref for k, v in digests.items()}


SETTINGS = [{}, {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
            {"ATEN_CPU_CAPABILITY": "default"}, {"MKL_CBWR": "COMPATIBLE"}, {"OMP_NUM_THREADS": "1"}]


PROBE = ("import torch, hashlib; g = torch.Generator().manual_seed(0); "
         "a, b = (torch.randn(s, dtype=torch.float64, generator=g) for s in ((300, 700), (700, 200))); "
         "print(hashlib.sha256((a @ b).numpy().tobytes()).hexdigest())")


def test_bytes_do_not_depend_on_the_blas_or_vector_kernels(case, tmp_path):
    """The CLI in subprocesses with MKL's instruction set and reproducibility mode, torch's vector kernels
    and threads forced. A float64 product in the same settings shows that some of them really change
    the BLAS's rounding (MKL_CBWR=COMPATIBLE does on every machine tried), while the merge's bytes do not."""
    d, bases, loras = case
    digests, gemms = [], set()
    for k, env in enumerate(SETTINGS):
        probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**os.environ, **env})
        gemms.add(probe.stdout)
        out = tmp_path / f"k{k}.safetensors"
        p = subprocess.run([sys.executable, "-m", "longcat_lora", "merge", bases["fp32"], str(out), "--dtype", "bf16",
                            *[a for path, s in loras for a in ("--lora", f"{path}:{s}")], "--device", "cpu"],
                           capture_output=True, text=True, env={**os.environ, **env})
        assert p.returncode == 0, (env, p.stderr)
        digests.append(_digest(str(out)))
    assert len(set(digests)) == 1, list(zip(SETTINGS, digests))
    assert len(gemms) > 1  # the settings did reach the BLAS: a plain float64 product differs between them


def test_runtime_merge_lora_is_correctly_rounded_too(case):
    """`merge_lora` on a live model uses the same arithmetic: its weights are the reference's bytes."""
    from torch import nn

    d, bases, loras = case
    sd = load_file(bases["bf16"])
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].attn = nn.Module()
    model.blocks[0].attn.qkv = nn.Linear(H, 3 * H, dtype=torch.bfloat16)
    model.blocks[0].ffn = nn.Module()
    model.blocks[0].ffn.w2 = nn.Linear(F, H, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.copy_(sd["blocks.0.attn.qkv.weight"])
        model.blocks[0].ffn.w2.weight.copy_(sd["blocks.0.ffn.w2.weight"])
    for path, s in loras:
        L.merge_lora(model, path, s, skip_missing=True)
    for m in ("blocks.0.attn.qkv", "blocks.0.ffn.w2"):
        # merged one LoRA at a time: each merge rounds once, so the reference does the same
        w = sd[m + ".weight"]
        for path, s in loras:
            w = merge_reference(w, [(path, s)], m, torch.bfloat16)
        assert same_bits(model.get_submodule(m).weight.detach(), w), m


# ------------------------------------------------------------------ the other commands that compute

def _run(args, env=None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "longcat_lora", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    assert p.returncode == 0, (args, env, p.stderr)
    return p


ALGEBRA_SETTINGS = [{}, {"MKL_CBWR": "COMPATIBLE"}, {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "262144"},
                    {"OPENBLAS_CORETYPE": "Sandybridge", "OPENBLAS_L2_SIZE": "262144"}, {"OMP_NUM_THREADS": "1"}]


def test_combine_at_unequal_strengths_is_byte_reproducible(case, tmp_path):
    """Exact combine folds strength x scale into the up blocks: one float64 product per element, rounded
    once (numpy elementwise, no BLAS): the same bytes whatever the BLAS or thread settings."""
    d, bases, loras = case
    digests = set()
    for k, env in enumerate(ALGEBRA_SETTINGS):
        out = tmp_path / f"c{k}.safetensors"
        _run(["combine", out, *[a for p, s in loras for a in ("--lora", f"{p}:{s}")]], env)
        digests.add(_digest(str(out)))
    assert len(digests) == 1


def test_resize_and_extract_are_reproducible_within_rounding(case, tmp_path):
    """resize (numpy's BLAS: thin products, Cholesky, eigendecompositions) and extract (torch: SVDs) go
    through LAPACK and BLAS kernels whose summation order the CPU decides: their outputs are
    reproducible within rounding, not bit for bit. Across kernels forced through the environment, the
    weight changes written agree to 1e-6 of their size (float32 factors), far inside the reported error."""
    from longcat_lora.testing.dit import TINY
    from longcat_lora.testing.fixtures import write_base_checkpoint

    from reference import official_delta, worst

    d, bases, loras = case
    a = loras[0][0]
    deltas = []
    for k, env in enumerate(ALGEBRA_SETTINGS):
        out = tmp_path / f"r{k}.safetensors"
        _run(["resize", a, out, "--rank", "6", "--dtype", "fp32"], env)
        deltas.append(official_delta(str(out)))
    assert max(worst(deltas[0], x) for x in deltas[1:]) <= 1e-6
    base = write_base_checkpoint(str(tmp_path / "base"), TINY, "longcat", shards=1, dtype=torch.float32, seed=2)
    tuned = str(tmp_path / "tuned")
    L.merge_checkpoint(base, tuned, [(L.testing.fixtures.write_native_lora(
        str(tmp_path / "l.safetensors"), "cfg_step", dims=TINY.dims, rank=2, dtype=torch.float32, seed=9), 1.0)])
    deltas = []
    for k, env in enumerate(ALGEBRA_SETTINGS[:3]):
        out = tmp_path / f"e{k}.safetensors"
        _run(["extract", base, tuned, out, "--rank", "2"], env)
        deltas.append(official_delta(str(out)))
    assert max(worst(deltas[0], x) for x in deltas[1:]) <= 1e-5
