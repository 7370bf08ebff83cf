"""The numpy arithmetic of resize / combine: stored bytes to floats and back (bfloat16 included), the
core decomposition, one BLAS thread per worker, and that neither command loads torch.

torch is the independent reference for the dtype conversions (its casts are what every other path of
the project and its users' loaders use); numpy's float64 SVD for the decompositions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from longcat_lora.algebra.cells import core_svd
from longcat_lora.io.dtypes import FLOAT_MAX, decode, encode, rounded
from longcat_lora.model.naming import DitDims
from longcat_lora.threads import single_threaded

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _awkward_values(dtype: np.dtype, n: int = 20000) -> np.ndarray:
    """Random magnitudes over the whole float32 range plus the cases rounding gets wrong: ties to even
    in both directions, values just above / below a tie, subnormals, signed zeros, the largest finite."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal(n) * 10.0 ** rng.integers(-44, 38, n)
    ties = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -8 + 2 ** -20, 1 + 2 ** -8 - 2 ** -20,
                     1 + 2 ** -11, 1 + 3 * 2 ** -11, 2 ** -140, -(2 ** -133), 1e-45, 0.0, -0.0, 3.3e38, -3.38e38,
                     65504.0, 65519.0, 6e-8, 2 ** -24])
    return np.concatenate([x, ties]).astype(dtype)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
@pytest.mark.parametrize("src", [np.float32, np.float64])
def test_encode_rounds_like_torch_and_decode_reads_it_back(dtype, src):
    x = _awkward_values(src)
    with np.errstate(over="ignore"):
        keep = np.abs(x) <= FLOAT_MAX[dtype]  # beyond the range is the caller's check (FLOAT_MAX)
    x = x[keep].reshape(1, -1)
    t = torch.from_numpy(x)
    if dtype == "BF16" and src is np.float64:
        t = t.float()  # torch rounds float64 to bfloat16 through float32, and so does encode
    want = t.to(TORCH[dtype]).contiguous().view(torch.uint8).numpy().reshape(1, -1)
    got = encode(x, dtype)
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want), int((got != want).sum())
    stored, values = rounded(x, dtype)  # the bytes and what they read back as, in x's dtype
    assert np.array_equal(stored, want) and values.dtype == x.dtype
    assert np.array_equal(values, decode(want, dtype, np.empty(x.shape, x.dtype)))
    for out_dtype in (np.float32, np.float64):
        back = decode(got, dtype, np.empty(x.shape, out_dtype))
        ref = torch.from_numpy(want.reshape(-1).copy()).view(TORCH[dtype]).to(
            torch.float32 if out_dtype == np.float32 else torch.float64).numpy().reshape(x.shape)
        if dtype == "F64" and out_dtype == np.float32:
            assert np.array_equal(back, x.astype(np.float64).astype(np.float32)), "float64 read into float32 rounds"
        else:
            assert np.array_equal(back, ref)


def test_encode_keeps_nan_a_nan_and_rows_as_rows():
    x = np.array([[1.0, np.nan], [np.inf, -2.5]], np.float32)
    got = encode(x, "BF16").view(np.uint16)
    assert got.shape == (2, 2)
    assert got[0, 0] == 0x3F80 and got[1, 1] == 0xC020 and got[1, 0] == 0x7F80
    assert (got[0, 1] & 0x7F80) == 0x7F80 and (got[0, 1] & 0x7F) != 0  # a NaN, not an Inf
    values = rounded(x, "BF16")[1]
    assert np.isnan(values[0, 1]) and values[1, 0] == np.inf and values[1, 1] == -2.5
    wide = np.arange(12, dtype=np.float64).reshape(3, 4)
    assert encode(wide, "F32").shape == (3, 16) and encode(wide.T, "F16").shape == (4, 6)
    assert np.array_equal(decode(encode(wide.T, "F16"), "F16", np.empty((4, 3))), wide.T)


def test_decode_fills_a_strided_view_and_nothing_around_it():
    vals = np.arange(-6, 6, dtype=np.float32).reshape(3, 4) / 4
    raw = encode(vals, "BF16")
    buf = np.full((3, 10), 7.0, np.float32)
    decode(raw, "BF16", buf[:, 3:7])
    assert np.array_equal(buf[:, 3:7], vals)
    assert (buf[:, :3] == 7).all() and (buf[:, 7:] == 7).all()
    with pytest.raises(ValueError):
        decode(raw, "I8", np.empty((3, 4), np.float32))


def _with_spectrum(s: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(s)
    q1, _ = np.linalg.qr(rng.standard_normal((n, n)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q1 * s) @ q2.T


@pytest.mark.parametrize("spectrum", ["decaying", "clustered", "rank deficient"])
def test_core_svd_fast_path_agrees_with_the_svd(spectrum):
    n, keep = 64, 20
    s = {"decaying": 0.8 ** np.arange(n),
         "clustered": np.repeat([3.0, 2.0, 1.0, 0.5], n // 4),
         "rank deficient": np.concatenate([np.linspace(2, 1, 30), np.zeros(n - 30)])}[spectrum]
    core = _with_spectrum(s)
    want = np.linalg.svd(core, compute_uv=False)
    for fast in (False, True):
        uc, got, vc = core_svd(core, keep, fast)
        assert got.shape == (n,) and uc.shape == (n, keep) and vc.shape == (n, keep)
        assert np.all(np.diff(got) <= 1e-12)
        if fast:  # s^2 from an eigendecomposition: absolute error ~1e-14 s_max^2 (see core_svd)
            assert np.allclose(got ** 2, want ** 2, rtol=0, atol=1e-13 * want[0] ** 2)
            assert np.allclose(got[:keep], want[:keep], rtol=1e-10)
        else:
            assert np.allclose(got, want, rtol=0, atol=1e-12 * want[0])
        assert np.allclose(uc.T @ uc, np.eye(keep), atol=1e-12)
        # U S Vc^T is the projection of the core on the kept left vectors: the best rank-`keep` part
        proj = uc @ (uc.T @ core)
        assert np.allclose((uc * got[:keep]) @ vc.T, proj, atol=1e-12 * want[0])
        tail = float(np.sum(want[keep:] ** 2))
        assert np.linalg.norm(core - proj) ** 2 == pytest.approx(tail, rel=1e-9, abs=1e-24)


def test_core_svd_fast_path_gives_zero_vectors_for_zero_singular_values():
    core = np.zeros((5, 5))
    core[0, 1] = 2.0
    uc, s, vc = core_svd(core, 3, True)
    assert s.tolist() == pytest.approx([2.0, 0, 0, 0, 0])
    assert np.isfinite(vc).all() and (vc[:, 1:] == 0).all()
    assert np.allclose((uc * s[:3]) @ vc.T, core)


def _blas_threads() -> int:
    from threadpoolctl import threadpool_info

    return min(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")


def test_single_threaded_limits_blas_until_the_last_user_leaves_whichever_thread_that_is():
    """The last user out restores OpenBLAS's process-wide setting even when another thread set it
    (threadpoolctl alone would ignore that thread's change)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):
        assert _blas_threads() == 2
        inside, release = threading.Event(), threading.Event()
        seen = []

        def other() -> None:
            with single_threaded():
                inside.set()
                release.wait(10)
                seen.append(_blas_threads())

        t = threading.Thread(target=other)
        with single_threaded():
            assert _blas_threads() == 1
            t.start()
            assert inside.wait(10)
        assert _blas_threads() == 1  # the first user left, the other is still inside: nothing restored yet
        release.set()
        t.join(10)
        assert seen == [1]
        assert _blas_threads() == 2
        with single_threaded():  # and a later user can limit it again
            assert _blas_threads() == 1
        assert _blas_threads() == 2


def test_single_threaded_restores_after_an_error():
    torch.set_num_threads(2)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):
        with pytest.raises(RuntimeError):
            with single_threaded():
                assert (_blas_threads(), torch.get_num_threads()) == (1, 1)
                raise RuntimeError("x")
        assert (_blas_threads(), torch.get_num_threads()) == (2, 2)


def test_resize_combine_and_convert_never_load_torch(tmp_path):
    """resize, combine (exact with a folded strength, and compressed) and conversions of a combined file
    (float32 up blocks beside bf16 downs, folded or widened on the way) are numpy only: torch's start-up
    costs more than their arithmetic. Checked in a fresh interpreter, through the real CLI entry."""
    from longcat_lora.testing.fixtures import write_native_lora

    lora = str(tmp_path / "in.safetensors")
    write_native_lora(lora, "cfg_step", dims=DitDims(hidden=32, ffn=96, adaln=16, final_out=8, depth=4), rank=8)
    code = f"""
import contextlib, io, json, sys
from longcat_lora.commands.cli import main
runs = [["resize", {lora!r}, {str(tmp_path / 'r.safetensors')!r}, "--energy", "0.9"],
        ["combine", {str(tmp_path / 'c.safetensors')!r}, "--lora", {lora!r}, "--lora", {lora + ':0.7'!r}],
        ["combine", {str(tmp_path / 'k.safetensors')!r}, "--lora", {lora!r}, "--lora", {lora + ':0.7'!r},
         "--rank", "4", "--to", "peft"],
        ["convert", {str(tmp_path / 'c.safetensors')!r}, {str(tmp_path / 'f.safetensors')!r}, "--to", "fastvideo"],
        ["convert", {str(tmp_path / 'c.safetensors')!r}, {str(tmp_path / 'p')!r}, "--to", "peft"]]
codes = []
for argv in runs:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            codes.append(0)
        except SystemExit as e:
            codes.append(e.code or 0)
print(json.dumps([codes, "torch" in sys.modules]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": SRC})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[0, 0, 0, 0, 0], False]


# ---------------------------------------------------------------- adversarial factors (review findings)

_PROJ = "lora___lorahyphen___blocks___lorahyphen___{i}___lorahyphen___attn___lorahyphen___proj"


def _write_proj_modules(path: str, mods: list[tuple[np.ndarray, np.ndarray]], dtype: torch.dtype) -> None:
    """A native file of attn.proj modules (one up block each, alpha_scale 1) with the given factors."""
    from safetensors.torch import save_file

    d = {}
    for i, (up, down) in enumerate(mods):
        b = _PROJ.format(i=i)
        d[b + ".lora_up.weight"] = torch.from_numpy(np.ascontiguousarray(up)).to(dtype)
        d[b + ".lora_down.weight"] = torch.from_numpy(np.ascontiguousarray(down)).to(dtype)
        d[b + ".alpha_scale"] = torch.tensor(1.0, dtype=dtype)
    save_file(d, path)


def _true_errors(src: str, out: str) -> list[float]:
    """||dW_out - dW_in||_F / ||dW_in||_F per module, materialised in float64 from the files alone."""
    from safetensors.torch import load_file

    def changes(path: str) -> dict[str, np.ndarray]:
        t = load_file(path)
        res = {}
        for k in t:
            if k.endswith(".lora_up.weight"):
                b = k.removesuffix(".lora_up.weight")
                up, down = t[k].double().numpy(), t[b + ".lora_down.weight"].double().numpy()
                res[b] = float(t[b + ".alpha_scale"].double()) * up @ down
        return res

    a, b = changes(src), changes(out)
    return [float(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(a[k])) for k in sorted(a)]


def _resize_json(src: str, out: str, *flags: str) -> list[float]:
    p = subprocess.run([sys.executable, "-m", "longcat_lora", "resize", src, out, *flags, "--json"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": SRC})
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["modules"]
    return [r["rel_error"] for r in sorted(rows, key=lambda r: int(r["module"].split(".")[1]))]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_unit_diagonal_but_ill_conditioned_factor_is_reported_truly(tmp_path, dtype):
    """A Kahan-like up factor: its Cholesky diagonal is all ones (a diagonal-ratio test passes it) but its
    condition number is ~1e4, so a float32 Gram loses its small direction: the report was 1.5% low."""
    rng = np.random.default_rng(9)
    r, m = 16, 256
    kahan = np.eye(r) - 0.9 * np.triu(np.ones((r, r)), 1)
    q, _ = np.linalg.qr(rng.standard_normal((m, r)))
    src = str(tmp_path / "kahan.safetensors")
    _write_proj_modules(src, [(0.05 * q @ kahan, rng.standard_normal((r, m)) / 16)], torch.bfloat16)
    out = str(tmp_path / "out.safetensors")
    reported = _resize_json(src, out, "--max-error", "0.05", "--dtype", dtype)
    assert reported == pytest.approx(_true_errors(src, out), rel=1e-5)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_tiny_factors_are_reported_truly(tmp_path, dtype):
    """Factors near 1e-21 (bf16 holds them): float32 products of their rounding errors underflow, which
    reported 0 error for a 2e-3 change (and 1.00016 for an fp16 output that underflows to zero)."""
    rng = np.random.default_rng(11)
    mods = [(rng.standard_normal((64, 8)) * sc, rng.standard_normal((8, 64)) * sc) for sc in (1e-20, 1e-21)]
    src = str(tmp_path / "tiny.safetensors")
    _write_proj_modules(src, mods, torch.bfloat16)
    out = str(tmp_path / "out.safetensors")
    reported = _resize_json(src, out, "--rank", "6", "--dtype", dtype)
    true = _true_errors(src, out)
    assert all(t > 1e-3 for t in true)
    assert reported == pytest.approx(true, rel=1e-5)


def test_float64_factors_beyond_float32_range_resize_to_bf16(tmp_path):
    """Finite float64 factors (1e40 and 1e-40, product about 1) were decoded into float32 for a bf16
    output, overflowed, and were refused as 'non-finite values'; float64 inputs work in float64."""
    rng = np.random.default_rng(5)
    src = str(tmp_path / "wide.safetensors")
    _write_proj_modules(src, [(rng.standard_normal((64, 8)) * 1e40, rng.standard_normal((8, 64)) * 1e-40)],
                        torch.float64)
    out = str(tmp_path / "out.safetensors")
    reported = _resize_json(src, out, "--rank", "4", "--dtype", "bf16")
    assert reported == pytest.approx(_true_errors(src, out), rel=1e-5)


def test_energy_one_keeps_exactly_the_nonzero_rank():
    """--energy 1 on a rank-deficient spectrum stops at the last nonzero value, whatever the rounding of
    the running sum (it compared a cumulative sum with a differently ordered total)."""
    from longcat_lora.algebra.lowrank import RankRule

    rng = np.random.default_rng(2)
    for _ in range(200):
        s = np.sort(rng.random(rng.integers(2, 40)))[::-1] * 10.0 ** rng.integers(-3, 3)
        nz = int(rng.integers(1, len(s) + 1))
        s[nz:] = 0.0
        assert RankRule(energy=1.0).choose(s) == nz


def test_mixed_dtype_exact_combine_never_loads_torch(tmp_path):
    """Inputs of different dtypes are widened (cast) and non-unit strengths folded in numpy too."""
    rng = np.random.default_rng(4)
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    _write_proj_modules(a, [(rng.standard_normal((32, 4)), rng.standard_normal((4, 32)))], torch.bfloat16)
    _write_proj_modules(b, [(rng.standard_normal((32, 4)), rng.standard_normal((4, 32)))], torch.float16)
    out = str(tmp_path / "c.safetensors")
    code = (f"import sys; from longcat_lora.algebra.combine import combine_loras; "
            f"combine_loras({out!r}, [({a!r}, 1.0), ({b!r}, 0.3)]); print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": SRC})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-1] == "False"
    from safetensors.torch import load_file

    t = load_file(out)
    base = _PROJ.format(i=0)
    ups, downs = t[base + ".lora_up.weight"].double(), t[base + ".lora_down.weight"].double()
    got = float(t[base + ".alpha_scale"].double()) * ups @ downs
    ta, tb = load_file(a), load_file(b)
    want = sum(f * x[base + ".lora_up.weight"].double() @ x[base + ".lora_down.weight"].double()
               for f, x in ((1.0, ta), (0.3, tb)))
    assert float((got - want).norm() / want.norm()) < 1e-7


@pytest.mark.parametrize("src_dtype", ["BF16", "F16", "F32", "F64"])
def test_cast_and_folded_match_torch_bit_for_bit(src_dtype):
    """Widening (cat_rows / placed of mixed dtypes) and folding a factor (scales, strengths) in numpy give
    the bytes torch's `.to()` and float64 product give, to F32 and F64, NaN/Inf refused only where asked."""
    from longcat_lora.model.sources import NonFinite, TensorSource, cast, folded

    g = torch.Generator().manual_seed(3)
    t = (torch.randn(7, 5, generator=g, dtype=torch.float64) * 3).to(TORCH[src_dtype])
    src = TensorSource(t)
    for wide in ("F32", "F64"):
        if TORCH[wide].itemsize < t.element_size():
            continue
        got = cast(src, wide).raw()
        want = t.to(TORCH[wide]).contiguous().view(torch.uint8).numpy().reshape(7, -1)
        assert cast(src, wide).dtype == wide and np.array_equal(got, want)
    with pytest.raises(ValueError):
        cast(src, "BF16" if src_dtype != "BF16" else "F16")
    for factor in (0.3, -1.7, 1 / 3):
        f = folded(src, factor)
        out = torch.float64 if src_dtype == "F64" else torch.float32
        want = (t.to(torch.float64) * factor).to(out).contiguous().view(torch.uint8).numpy().reshape(7, -1)
        assert f.dtype == ("F64" if src_dtype == "F64" else "F32") and np.array_equal(f.raw(), want)
    assert folded(src, 1.0) is src
    if src_dtype != "F64":
        big = TensorSource(torch.full((2, 2), 3e38, dtype=torch.float32))
        assert np.isinf(folded(big, 10.0).raw().view(np.float32)).all()  # not asked to refuse
        big.refuse_nonfinite = True
        with pytest.raises(NonFinite):
            folded(big, 10.0).raw()


def test_well_conditioned_cells_take_the_cholesky_route_in_the_precision_their_output_needs():
    """bf16/fp16 outputs of bf16/fp32 factors work in float32, float64 factors or wider outputs in
    float64; well conditioned factors of any magnitude float64 holds take the Cholesky route (transforms
    planned), not the slower QR one, and the plan is the SVD of the product."""
    from longcat_lora.algebra.cells import Cell, Term, Workspace, plan_cell, work_dtype
    from longcat_lora.algebra.lowrank import RankRule
    from longcat_lora.model.sources import TensorSource

    rng = np.random.default_rng(8)

    def cell(dtype: torch.dtype, scale: float) -> Cell:
        up = torch.from_numpy(rng.standard_normal((48, 6)) * scale).to(dtype)
        down = torch.from_numpy(rng.standard_normal((6, 40)) * scale).to(dtype)
        return Cell((0, 48), [Term(TensorSource(up), TensorSource(down), 0.5)])

    bf, f32, f64 = cell(torch.bfloat16, 1.0), cell(torch.float32, 1.0), cell(torch.float64, 1e-20)
    assert [work_dtype(d, c) for d, c in (("BF16", bf), ("F16", f32), ("BF16", f64), ("F32", bf), ("F64", bf))] \
        == [np.float32, np.float32, np.float64, np.float64, np.float64]
    assert work_dtype("BF16") == np.float32
    for c, out in ((bf, "BF16"), (f32, "F16"), (f64, "BF16"), (f64, "F64")):
        plan = plan_cell(c, RankRule(rank=3), Workspace(), "m", work_dtype(out, c), stored=3)
        assert plan.x is not None and plan.y is not None, (out, "took the QR route")
        t = c.terms[0]
        dw = 0.5 * t.up.load().double().numpy() @ t.down.load().double().numpy()
        want = np.linalg.svd(dw, compute_uv=False)
        assert np.allclose(plan.s[:6], want[:6], rtol=1e-5)


def test_rank_rules_count_energy_the_singular_values_never_captured():
    """extract passes the change's full squared norm: what its leading singular values miss counts as
    error (and against the energy share)."""
    from longcat_lora.algebra.lowrank import RankRule

    s = np.array([1.0, 0.0])
    assert RankRule(max_error=0.5).choose(s) == 1  # all energy in s[0]: rank 1 suffices
    assert RankRule(max_error=0.5).choose(s, total=4.0) == 2  # 3 of 4 never captured: no rank suffices
    assert RankRule(max_error=0.9).choose(s, total=4.0) == 1  # error sqrt(3/4) = 0.87 at rank 1
    assert RankRule(energy=0.2).choose(s, total=4.0) == 1 and RankRule(energy=0.3).choose(s, total=4.0) == 2


def test_factored_svd_refuses_factors_that_do_not_multiply():
    from longcat_lora.algebra.lowrank import factored_svd
    from longcat_lora.errors import LoraError

    for up, down in ((torch.ones(3, 2), torch.ones(3, 4)), (torch.ones(3), torch.ones(1, 4)),
                     (torch.ones(3, 1), torch.ones(1, 4, 1))):
        with pytest.raises(LoraError, match="do not multiply"):
            factored_svd(up, down)


def test_rank_above_a_modules_height_stores_the_height(tmp_path):
    """A module with fewer output rows (4) than its LoRA rank (8): --rank 6 keeps min(6, 4) = 4, the
    change exactly (full rank: only the output rounding is lost)."""
    from safetensors.torch import load_file

    rng = np.random.default_rng(12)
    src = str(tmp_path / "short.safetensors")
    _write_proj_modules(src, [(rng.standard_normal((4, 8)), rng.standard_normal((8, 32)))], torch.float32)
    out = str(tmp_path / "out.safetensors")
    reported = _resize_json(src, out, "--rank", "6")
    up = load_file(out)[_PROJ.format(i=0) + ".lora_up.weight"]
    assert tuple(up.shape) == (4, 4)
    true = _true_errors(src, out)
    assert true[0] < 1e-6 and reported == pytest.approx(true, rel=1e-3, abs=1e-9)


def test_rank_rules_at_their_edges():
    from longcat_lora.algebra.lowrank import RankRule, factored_svd

    assert RankRule(rank=3).choose(np.zeros(2)) == 0  # an exactly zero change keeps nothing
    assert RankRule(rank=3).choose(np.array([2.0, 0.0])) == 2
    assert RankRule(energy=0.5).choose(np.array([2.0])) == 1  # one value is a rank, not a zero change
    assert RankRule(max_error=0.0).choose(np.array([1.0, 0.0])) == 1  # an error of exactly 0 qualifies
    assert RankRule(max_error=0.0).choose(np.array([1.0, 1e-30])) == 2
    u, s, vh = factored_svd(torch.ones(3, 2), torch.ones(2, 4), k=0)
    assert u.shape == (3, 0) and vh.shape == (0, 4) and s.shape == (2,)


def test_fused_up_blocks_shorter_than_the_rank_keep_their_height(tmp_path):
    """adaLN's up blocks after the first start at row h: their height is rows[1] - rows[0], not the end
    row. With h = 4 < rank 8 < in_features 16, --rank 6 keeps 4 per block (the change exactly, fp32
    rounding aside)."""
    from longcat_lora.testing.fixtures import write_native_lora

    src = str(tmp_path / "in.safetensors")
    write_native_lora(src, "refinement", dims=DitDims(hidden=4, ffn=8, adaln=16, final_out=4, depth=1), rank=8,
                      dtype=torch.float32)
    out = str(tmp_path / "out.safetensors")
    p = subprocess.run([sys.executable, "-m", "longcat_lora", "resize", src, out, "--rank", "6", "--json"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": SRC})
    assert p.returncode == 0, p.stderr
    rows = {r["module"]: r for r in json.loads(p.stdout)["modules"]}
    assert rows["blocks.0.adaLN_modulation.1"]["part_ranks"] == [4] * 6
    assert rows["final_layer.adaLN_modulation.1"]["part_ranks"] == [4, 4]
    assert rows["blocks.0.attn.qkv"]["part_ranks"] == [4, 4, 4]
    assert max(r["rel_error"] for r in rows.values()) < 1e-6
