"""`merge` into ComfyUI-WanVideoWrapper's checkpoints (bf16 and fp8 "scaled") and `merge --layout wanvideo`
(repacking an official checkpoint), end to end through the CLI, against independent references: the
wrapper's names from tests/reference.py's own table, merged values from rounding_reference (float64 with a
bound, Fractions where it cannot decide), fp8 codes from fp8_reference (a table search written from the
formats' definitions). Bad input and faults (SIGTERM / SIGKILL mid-write, disk full, an input cut while
read) on the new outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import longcat_lora as L
import longcat_lora.apply.merge as merge_mod
import longcat_lora.apply.merge_compute as mc
from longcat_lora.apply.fp8 import E4M3, E5M2, round_fp8
from longcat_lora.testing.dit import TINY, TINY_AVATAR, AvatarConfig
from longcat_lora.testing.fixtures import (official_specs, write_base_checkpoint, write_native_lora,
                                           write_wanvideo_checkpoint)

import fp8_reference as F8
from conftest import cli
from reference import WANVIDEO_LAYERS, WANVIDEO_PARAMS
from rounding_reference import merge_reference, merged, native_terms, round_exact_f64, same_bits
from test_faults import ENOSPC, ENV, MAIN, SHRINK, SLOW, child, one_error_line, temps

STRENGTHS = (("ref", 0.8), ("cfg", -0.6))
FP8_RE = re.compile(r"(^|\.)(self_attn|cross_attn)\.[qkvo]\.weight$|\.ffn\.w[123]\.weight$"
                    r"|\.audio_cross_attn\.(q_linear|kv_linear|proj)\.weight$")
# LongCat-Video-Avatar 1.5's audio projection at the tiny width (Whisper-like: fewer blocks, more channels)
TINY_AVATAR_15 = AvatarConfig(**{f: getattr(TINY_AVATAR, f) for f in AvatarConfig.__dataclass_fields__
                                 if f not in ("audio_blocks", "audio_channels")}, audio_blocks=1, audio_channels=10)


# ----------------------------------------------------------------------------- helpers


def ref_outputs(name: str, shape: tuple) -> list[tuple[str, tuple[int, int] | None]] | None:
    """The wrapper's tensor(s) for an official tensor, from reference.py's own table: [(name, rows)]
    (rows of the official tensor; None for all); None where the wrapper has no such tensor."""
    module, leaf = name.rsplit(".", 1)
    m = re.match(r"^blocks\.(\d+)\.(.+)$", module)
    template, i = (f"blocks.{{i}}.{m.group(2)}", m.group(1)) if m else (module, None)
    if template in WANVIDEO_LAYERS:
        outs = WANVIDEO_LAYERS[template]
    elif template in WANVIDEO_PARAMS:
        if WANVIDEO_PARAMS[template] is None:
            return None
        outs = (WANVIDEO_PARAMS[template],)
    else:
        raise AssertionError(f"the reference table does not know {name}")
    h = shape[0] // len(outs)
    return [(o.format(i=i) + "." + leaf, (j * h, (j + 1) * h) if len(outs) > 1 else None) for j, o in enumerate(outs)]


def load_all(path) -> dict[str, torch.Tensor]:
    """Every tensor of a file or a sharded folder, read with the real safetensors library."""
    files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))
                                                   if f.endswith(".safetensors")]
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def header(path) -> list[tuple[str, str, list]]:
    """(name, dtype, shape) in file order."""
    raw = open(path, "rb").read(8)
    n = struct.unpack("<Q", raw)[0]
    h = json.loads(open(path, "rb").read(8 + n)[8:])
    h.pop("__metadata__", None)
    return [(k, v["dtype"], v["shape"]) for k, v in sorted(h.items(), key=lambda kv: kv[1]["data_offsets"][0])]


# Values are checked against the references in these blocks (and outside blocks); every other tensor's
# layout, dtype and untouched bytes everywhere (the references cost far more than the merge).
CHECKED = {0, 47}


def checked(name: str) -> bool:
    m = re.match(r"^blocks\.(\d+)\.", name)
    return m is None or int(m.group(1)) in CHECKED


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def fused_terms(loras, module: str, lo: int | None = None, hi: int | None = None):
    """rounding_reference terms (r0, r1, up, down, strength, scale) of native LoRAs on `module`, restricted to
    rows lo:hi of it and relative to lo (a split layer's share)."""
    out = []
    for path, s in loras:
        for r0, r1, up, down, scale in native_terms(path).get(module, []):
            a, b = (r0, r1) if lo is None else (max(r0, lo), min(r1, hi))
            if a < b:
                base = 0 if lo is None else lo
                out.append((a - base, b - base, up[a - r0:b - r0], down, s, scale))
    return out


def wan_module(oname: str) -> tuple[str, int, int] | None:
    """(official module, rows lo, hi) a wrapper weight stands for, from the reference table; None if not a Linear."""
    module = oname.rsplit(".", 1)[0]
    m = re.match(r"^blocks\.(\d+)\.(.+)$", module)
    template, i = (f"blocks.{{i}}.{m.group(2)}", m.group(1)) if m else (module, None)
    for off, outs in WANVIDEO_LAYERS.items():
        if template in outs:
            return off.format(i=i), outs.index(template), len(outs)
    return None


def deq(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """An fp8 weight's exact values (float64): codes decoded by the reference, times the scale broadcast
    over blocks of the weight."""
    v = torch.from_numpy(F8.decode(t.view(torch.uint8).numpy(), "e4m3fn" if t.dtype == torch.float8_e4m3fn else "e5m2"))
    rows, cols = v.shape
    s = s.double()
    if s.numel() == 1:
        return v * s.reshape(())
    if s.dim() == 1:
        return v * s[:, None]
    R, C = s.shape
    return v * s.repeat_interleave(rows // R, 0).repeat_interleave(cols // C, 1)


def blocks_of(s: torch.Tensor, shape) -> tuple[int, int]:
    rows, cols = shape
    if s.numel() == 1:
        return rows, cols
    if s.dim() == 1:
        return 1, cols
    return rows // s.shape[0], cols // s.shape[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("wanvideo")
    loras = {"ref": write_native_lora(str(d / "ref.safetensors"), "refinement", dims=TINY.dims, rank=4,
                                      dtype=torch.float32, alpha_scale=0.5, seed=11),
             "cfg": write_native_lora(str(d / "cfg.safetensors"), "cfg_step", dims=TINY.dims, rank=3,
                                      dtype=torch.bfloat16, alpha_scale=0.3, seed=12)}
    official = write_base_checkpoint(str(d / "official"), TINY, "longcat", shards=3, dtype=torch.bfloat16)
    wv = write_wanvideo_checkpoint(str(d / "wv_bf16.safetensors"), TINY)
    args = [a for k, s in STRENGTHS for a in ("--lora", f"{loras[k]}:{s}")]
    return {"d": d, "loras": loras, "pairs": [(loras[k], s) for k, s in STRENGTHS], "official": official, "wv": wv,
            "args": args}


def repacked_with_loras(setup) -> str:
    """The official fixture repacked with the LoRAs through the CLI (bf16), made once for the module."""
    path = setup["d"] / "repacked_bf16.safetensors"
    if not path.exists():
        cli("merge", setup["official"], path, "--layout", "wanvideo", *setup["args"])
    return str(path)


# ----------------------------------------------------------------------------- the fp8 quantizer


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_fp8_rounding_matches_the_independent_quantizer_and_torch(fmt):
    """Every code, every midpoint, values just either side of them, random values over every binade,
    subnormals and zero, both signs: our bit-level rounding equals the reference's table search, and
    torch's own cast (in range), bit for bit; ties are flagged exactly at the midpoints."""
    name = "e4m3fn" if fmt is E4M3 else "e5m2"
    grid = np.array(sorted({abs(F8.decode_one(c, name)) for c in range(256)} - {np.inf}))
    grid = grid[np.isfinite(grid)]
    mids = (grid[:-1] + grid[1:]) / 2
    g = np.random.default_rng(0)
    rand = np.exp2(g.uniform(np.log2(grid[1]) - 4, np.log2(grid[-1]), 20000)) * g.uniform(1, 2, 20000)
    vals = np.concatenate([grid, mids, np.nextafter(mids.astype(np.float32), np.float32(0)).astype(np.float64),
                           np.nextafter(mids.astype(np.float32), np.float32(np.inf)).astype(np.float64), rand, [0.0]])
    vals = vals[vals <= grid[-1]].astype(np.float32)
    vals = np.concatenate([vals, -vals])
    y = torch.from_numpy(vals)
    q = round_fp8(y, fmt)
    ours = ((q.code | ((y.view(torch.int32) < 0).to(torch.int32) << 7)).to(torch.uint8)).numpy()
    want = F8.quantize(vals.astype(np.float64), name)
    assert np.array_equal(ours, want)
    assert np.array_equal(q.tie.numpy(), F8.is_midpoint(vals.astype(np.float64), name))
    assert np.array_equal(ours, y.to(fmt.torch_dtype).view(torch.uint8).numpy())  # torch agrees in range
    assert q.steps == 0.5 and np.array_equal(F8.decode(np.arange(256), name)[:fmt.max_code + 1],
                                                          fmt.values)


# ----------------------------------------------------------------------------- the name map


@pytest.mark.parametrize("kind", ["longcat", "avatar", "avatar15"])
def test_repack_lands_every_official_tensor_once_under_the_wrappers_name(setup, tmp_path, kind):
    """Every official tensor lands exactly once, renamed or split by rows as the independent table says,
    its bytes unchanged; nothing else is written. Avatar (1.0 and 1.5 sizes): the keys the wrapper's
    loader looks for to detect it are there."""
    config = {"longcat": TINY, "avatar": TINY_AVATAR, "avatar15": TINY_AVATAR_15}[kind]
    naming_ = "longcat" if kind == "longcat" else "avatar"
    official = setup["official"] if kind == "longcat" else write_base_checkpoint(str(tmp_path / "official"), config,
                                                                                 naming_, shards=2)
    out = tmp_path / "wan.safetensors"
    p = cli("merge", official, out, "--layout", "wanvideo")
    specs = official_specs(config, naming_)
    assert re.search(rf"repacked {len(specs)} tensors into the wrapper's layout \(\d+ split by rows", p.stdout)
    got = load_all(str(out))
    src = load_all(official)
    expect = {}
    for name, shape in specs:
        for oname, rows in ref_outputs(name, shape):
            assert oname not in expect, oname  # lands once
            expect[oname] = src[name] if rows is None else src[name][rows[0]:rows[1]]
    assert set(got) == set(expect)
    assert len(header(out)) == len(expect)
    for k, v in expect.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and raw(got[k]) == raw(v), k
    if kind != "longcat":
        assert {"multitalk_audio_proj.proj1.weight", "blocks.0.audio_cross_attn.q_norm.weight",
                "blocks.0.audio_modulation.1.weight", "blocks.0.norm_x.weight"} <= set(got)
        assert got["multitalk_audio_proj.proj1.weight"].shape[1] == config.dims.audio_proj_in


# ----------------------------------------------------------------------------- bf16 checkpoints


def test_merge_into_wanvideo_bf16_and_repack_with_loras_agree_with_the_reference(setup, tmp_path):
    """A LoRA merged into the wrapper's bf16 checkpoint: split q/k/v and k/v take their rows of the fused
    module's change, each element the correctly rounded exact sum; untouched tensors byte-identical. Repacking
    the official checkpoint with the same LoRAs gives the same file, byte for byte."""
    merged_file = tmp_path / "merged.safetensors"
    p = cli("merge", setup["wv"], merged_file, *setup["args"])
    assert "weights changed" in p.stdout
    assert open(merged_file, "rb").read() == open(repacked_with_loras(setup), "rb").read()
    base, got = load_all(setup["wv"]), load_all(str(merged_file))
    assert header(merged_file) == header(setup["wv"])
    changed = 0
    for k, v in base.items():
        found = wan_module(k) if k.endswith(".weight") else None
        terms = None
        if found is not None:
            module, j, n = found
            h = v.shape[0]
            terms = fused_terms(setup["pairs"], module, j * h, (j + 1) * h)
        if not terms:
            assert raw(got[k]) == raw(v), k
            continue
        changed += raw(got[k]) != raw(v)
        if checked(k):
            assert same_bits(got[k], merged(v.double(), terms, torch.bfloat16)), k
    assert changed == 48 * 11 + 2  # per block q k v o, q k v (cross_attn.o: no LoRA), w1 w2 w3, modulation; the head's two


# ----------------------------------------------------------------------------- fp8 checkpoints


# (one scale per tensor: the repack, prefix and same-bytes tests merge into such files)
FP8_CASES = [("e4m3fn", "row", "weight_scale"), ("e5m2", "row2d", "scale_weight"), ("e4m3fn", "block", "scale_weight")]


@pytest.mark.parametrize("fmt, scale, scale_name", FP8_CASES)
def test_merge_into_fp8_scaled_checkpoint(setup, tmp_path, fmt, scale, scale_name):
    """The file's scheme is kept: every adapted fp8 weight requantized with fresh power-of-two scales of the
    same shape and dtype, its codes the exact merged value / scale rounded to nearest even (independent
    reference), the scales written where they were; everything else byte-identical."""
    base_path = write_wanvideo_checkpoint(str(tmp_path / "base.safetensors"), TINY, fp8=fmt, scale=scale,
                                          scale_name=scale_name)
    out = tmp_path / "merged.safetensors"
    p = cli("merge", base_path, out, *setup["args"])
    line = re.search(r"requantized (\d+) fp8 weights \(float8_(\w+), fresh power-of-two scales\); worst relative "
                     r"error (\S+) at (\S+) \(worst element (\S+) fp8 steps, at (\S+)\)", p.stdout)
    assert line, p.stdout
    assert int(line.group(1)) == 48 * 10 and line.group(2) == fmt and float(line.group(5)) <= 0.5
    assert header(out) == header(base_path)  # names, dtypes, shapes, order
    base, got = load_all(base_path), load_all(str(out))
    n_fp8 = 0
    for k, v in base.items():
        found = wan_module(k) if k.endswith(".weight") else None
        terms = fused_terms(setup["pairs"], found[0], found[1] * v.shape[0], (found[1] + 1) * v.shape[0]) if found else None
        if not terms:
            w = k[:-len(scale_name)] + "weight" if k.endswith("." + scale_name) else None
            wf = wan_module(w) if w else None
            if not (wf and fused_terms(setup["pairs"], wf[0], wf[1] * base[w].shape[0], (wf[1] + 1) * base[w].shape[0])):
                assert raw(got[k]) == raw(v), k  # untouched, the scales of unadapted fp8 weights included
            continue
        if v.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            assert not checked(k) or same_bits(got[k], merged(v.double(), terms, torch.bfloat16)), k
            continue
        s_name = k[:-len("weight")] + scale_name
        s_in = base[s_name]
        n_fp8 += 1
        assert got[k].dtype == v.dtype and got[s_name].dtype == s_in.dtype and got[s_name].shape == s_in.shape
        if not checked(k):
            continue
        codes, scales = F8.requantized(deq(v, s_in), terms, blocks_of(s_in, v.shape), fmt)
        assert got[k].dtype == v.dtype and np.array_equal(got[k].view(torch.uint8).numpy(), codes), k
        assert np.array_equal(got[s_name].double().numpy().reshape(-1), scales.reshape(-1)), s_name
    assert n_fp8 == 48 * 10  # every fp8 weight but cross_attn.o, which no published LoRA adapts
    assert raw(got["scaled_fp8"]) == raw(base["scaled_fp8"]) and got["scaled_fp8"].dtype == base["scaled_fp8"].dtype


def test_fp8_reported_errors_are_the_true_ones(setup, tmp_path):
    base_path = write_wanvideo_checkpoint(str(tmp_path / "base.safetensors"), TINY, fp8="e4m3fn", scale="row")
    report = L.merge_checkpoint(base_path, str(tmp_path / "o.safetensors"), setup["pairs"], device="cpu")
    base, got = load_all(base_path), load_all(str(tmp_path / "o.safetensors"))
    assert len(report.requantized) == 48 * 10
    for layer in ("blocks.7.self_attn.k", "blocks.30.ffn.w2", "blocks.0.cross_attn.v"):
        w = layer + ".weight"
        module, j, n = wan_module(w)
        h = base[w].shape[0]
        w32 = merged(deq(base[w], base[layer + ".scale_weight"]), fused_terms(setup["pairs"], module, j * h, (j + 1) * h),
                     torch.float32).double()
        err = deq(got[w], got[layer + ".scale_weight"]) - w32
        r = report.requantized[layer]
        assert r.rel == pytest.approx(float(err.norm() / w32.norm()), rel=1e-9)
        assert 0.4 < r.steps <= 0.5


def _tie_case(tmp_path) -> tuple[str, str]:
    """An fp8 layer whose merged float32 values land exactly on midpoints of the fp8 grid while the exact
    sums do not (and one exact tie): rounding the float32 value again would go the wrong way."""
    rows, cols = 4, 8
    w = torch.zeros(rows, cols)
    w[0, 0] = 448.0  # pins the new scale at 2**0
    w[0, 1], w[0, 2], w[0, 3], w[0, 4], w[0, 5], w[0, 6] = 1.0, 1.125, -1.125, 1.0, 1.0, 1.125
    base = str(tmp_path / "tie.safetensors")
    save_file({"blocks.0.ffn.w1.weight": w.to(torch.float8_e4m3fn), "blocks.0.ffn.w1.scale_weight": torch.tensor(1.0),
               "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, base)
    up = torch.zeros(rows, 2)
    up[0] = 1.0
    down = torch.zeros(2, cols)
    # dW: 1/16 + 2**-40 (x just above the midpoint 1.0625), 1/16 - 2**-40 (1.1875 - tiny), -1/16 + 2**-40,
    # 1/16 exactly (a true tie, 1.0625: to even, 1.0), 1/16 + 2**-60 (float64 cannot tell: exact sums decide),
    # 1/16 - 2**-60
    down[0, 1:7] = torch.tensor([1 / 16, 1 / 16, -1 / 16, 1 / 16, 1 / 16, 1 / 16])
    down[1, 1:7] = torch.tensor([2.0 ** -40, -2.0 ** -40, 2.0 ** -40, 0.0, 2.0 ** -60, -2.0 ** -60])
    enc = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___ffn___lorahyphen___w1"
    lora = str(tmp_path / "tie_lora.safetensors")
    save_file({f"{enc}.lora_down.weight": down, f"{enc}.lora_up.weight": up, f"{enc}.alpha_scale": torch.tensor(1.0)},
              lora)
    return base, lora


def test_fp8_ties_are_decided_by_the_exact_sum(tmp_path):
    base, lora = _tie_case(tmp_path)
    out = tmp_path / "o.safetensors"
    cli("merge", base, out, "--lora", lora)
    got = load_all(str(out))
    codes = got["blocks.0.ffn.w1.weight"].view(torch.uint8)[0].tolist()
    vals = F8.decode(np.array(codes), "e4m3fn").tolist()
    assert float(got["blocks.0.ffn.w1.scale_weight"]) == 1.0
    assert vals[:7] == [448.0, 1.125, 1.125, -1.125, 1.0, 1.125, 1.125]  # rounding the float32 value: 1.0, 1.25,
    # -1.25, 1.0, 1.0, 1.25
    w32 = load_all(str(cli_out := tmp_path / "f32.safetensors")) if cli("merge", base, tmp_path / "f32.safetensors",
                                                                         "--lora", lora, "--dtype", "fp32") else None
    f = w32["blocks.0.ffn.w1.weight"][0, 1:7].tolist()
    assert f == [1.0625, 1.1875, -1.1875, 1.0625, 1.0625, 1.1875] and cli_out.exists()  # the midpoints themselves
    assert set(w32) == {"blocks.0.ffn.w1.weight"}  # the scheme's tensors are gone with it


@pytest.mark.parametrize("dtype", ["bf16"])  # (fp32: the ties test)
def test_dequantized_fp8_checkpoint_is_a_plain_one(setup, tmp_path, dtype):
    """--dtype writes what the wrapper loads as non-scaled: no scales, no marker, no fp8; each fp8 weight
    its exact dequantized value (+ the LoRAs) rounded once."""
    base_path = write_wanvideo_checkpoint(str(tmp_path / "base.safetensors"), TINY, fp8="e4m3fn", scale="row")
    out = tmp_path / "plain.safetensors"
    p = cli("merge", base_path, out, "--lora", f"{setup['loras']['cfg']}:0.9", "--dtype", dtype)
    assert "dequantized 528 fp8 weights" in p.stdout and "no scaled_fp8 marker" in p.stdout
    tdt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    base, got = load_all(base_path), load_all(str(out))
    assert set(got) == {k for k in base if not k.endswith(".scale_weight") and k != "scaled_fp8"}
    assert all(v.dtype == tdt for v in got.values())
    pairs = [(setup["loras"]["cfg"], 0.9)]
    for k, v in got.items():
        b = base[k]
        if b.dtype == torch.float8_e4m3fn and checked(k):
            exact = deq(b, base[k[:-len("weight")] + "scale_weight"])
            module, j, n = wan_module(k)
            terms = fused_terms(pairs, module, j * b.shape[0], (j + 1) * b.shape[0])
            want = merged(exact, terms, tdt) if terms else torch.from_numpy(round_exact_f64(exact.numpy(), tdt)).to(tdt)
            assert same_bits(v, want), k
        elif b.dtype != torch.float8_e4m3fn and not (wan_module(k) and fused_terms(pairs, wan_module(k)[0])):
            assert torch.equal(v, b.to(tdt)), k


def _shard_fp8(single: str, folder, moved: dict[str, int]) -> str:
    """The fp8 file as three shards with an index, tensors moved to the shards `moved` says."""
    sd = load_all(single)
    order = [k for k, _, _ in header(single)]
    third = len(order) // 3
    where = {k: min(i // third, 2) for i, k in enumerate(order)}
    where.update(moved)
    os.makedirs(folder)
    names = {k: f"model-{i + 1:05d}-of-00003.safetensors" for k, i in where.items()}
    for i in range(3):
        save_file({k: sd[k] for k in order if where[k] == i}, os.path.join(folder, f"model-{i + 1:05d}-of-00003.safetensors"))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 1}, "weight_map": names}, f)
    return str(folder)


def test_sharded_fp8_scales_in_other_shards_than_their_weights(setup, tmp_path):
    """A scale in an earlier shard than its weight is computed there and again with its weight (the two must
    agree); one in a later shard waits for it. Same tensors as the single-file merge; the index kept; a
    dequantized copy's index loses the scales and the marker."""
    single = write_wanvideo_checkpoint(str(tmp_path / "single.safetensors"), TINY, fp8="e4m3fn", scale="row")
    early, late = "blocks.40.self_attn.q", "blocks.2.ffn.w3"
    folder = _shard_fp8(single, tmp_path / "sharded", {early + ".scale_weight": 0, early + ".weight": 2,
                                                       late + ".weight": 0, late + ".scale_weight": 2})
    computed = []
    real = mc.CpuStages.compute

    def watch(self, job, slot):
        computed.append((job.label, job.scale_only))
        return real(self, job, slot)

    mp = pytest.MonkeyPatch()
    mp.setattr(mc.CpuStages, "compute", watch)
    try:
        L.merge_checkpoint(single, str(tmp_path / "one.safetensors"), setup["pairs"], device="cpu")
        n_single = len(computed)
        L.merge_checkpoint(folder, str(tmp_path / "out"), setup["pairs"], device="cpu")
    finally:
        mp.undo()
    assert computed[n_single:].count((early + ".weight", True)) == 1 and len(computed) - n_single == n_single + 1
    one, out = load_all(str(tmp_path / "one.safetensors")), load_all(str(tmp_path / "out"))
    assert set(one) == set(out) and all(raw(one[k]) == raw(out[k]) for k in one)
    assert json.load(open(tmp_path / "out" / "model.safetensors.index.json")) == \
        json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    L.merge_checkpoint(folder, str(tmp_path / "plain"), setup["pairs"], dtype="bf16", device="cpu")
    idx = json.load(open(tmp_path / "plain" / "model.safetensors.index.json"))
    plain = load_all(str(tmp_path / "plain"))
    assert set(idx["weight_map"]) == set(plain) and not any(k.endswith("scale_weight") for k in plain)
    assert "scaled_fp8" not in plain and idx["metadata"]["total_size"] == sum(v.numel() * 2 for v in plain.values())


# ----------------------------------------------------------------------------- repacking


def test_repack_fp8_e4m3fn_scaled(setup, tmp_path):
    """The block attention / FFN weights become float8_e4m3fn with one float32 power-of-two scale each
    (shape [], right after the weight), the scaled_fp8 marker at the end, everything else as in the bf16
    repack; the codes are the exact merged values / scale, rounded to nearest even."""
    plain = repacked_with_loras(setup)
    for with_lora in (False, True):
        out = tmp_path / f"fp8_{with_lora}.safetensors"
        p = cli("merge", setup["official"], out, "--layout", "wanvideo", "--dtype", "fp8_e4m3fn_scaled",
                *(setup["args"] if with_lora else []))
        assert "528 weights float8_e4m3fn, one power-of-two scale each" in p.stdout
        head = header(out)
        names = [k for k, _, _ in head]
        assert head[-1] == ("scaled_fp8", "F8_E4M3", [0])
        fp8 = [k for k, dt, _ in head if dt == "F8_E4M3" and k != "scaled_fp8"]
        assert fp8 == [k for k in names if FP8_RE.search(k)] and len(fp8) == 48 * 11
        for k in fp8:
            assert names[names.index(k) + 1] == k[:-len("weight")] + "scale_weight"
        got, bf16, src = load_all(str(out)), load_all(str(plain)), load_all(setup["official"])
        assert set(got) == set(bf16) | {k[:-len("weight")] + "scale_weight" for k in fp8} | {"scaled_fp8"}
        pairs = setup["pairs"] if with_lora else []
        for k in got:
            if k in fp8 and checked(k):
                module, j, n = wan_module(k)
                fused = src[module + ".weight"]
                h = fused.shape[0] // n
                codes, scales = F8.requantized(fused[j * h:(j + 1) * h].double(), fused_terms(pairs, module, j * h, (j + 1) * h),
                                               (h, fused.shape[1]), "e4m3fn")
                assert np.array_equal(got[k].view(torch.uint8).numpy(), codes), k
                s = got[k[:-len("weight")] + "scale_weight"]
                assert s.dtype == torch.float32 and s.shape == () and float(s) == float(scales.reshape(()))
            elif k not in fp8 and k != "scaled_fp8" and not k.endswith("scale_weight") and (with_lora or not wan_module(k)):
                assert raw(got[k]) == raw(bf16[k]), k  # as in the bf16 repack (with LoRAs: those with LoRAs)


def test_repack_int8_folder(setup, tmp_path):
    """The official INT8 folder, dequantized exactly (LoRAs added before the one rounding); its plain
    tensors renamed byte for byte; keeping INT8 is refused (the wrapper cannot load it)."""
    from test_merge_int8 import int8_state_dict, write_int8_base

    sd = int8_state_dict()
    base = write_int8_base(tmp_path / "base_model_int8", sd)
    with pytest.raises(L.LoraError, match="INT8 weights; the wrapper cannot load them"):
        L.merge_checkpoint(base, str(tmp_path / "x.safetensors"), [], layout="wanvideo")
    assert not (tmp_path / "x.safetensors").exists()
    out = tmp_path / "wan.safetensors"
    p = cli("merge", base, out, "--layout", "wanvideo", "--dtype", "bf16", *setup["args"])
    assert "INT8 weights dequantized" in p.stdout
    got = load_all(str(out))
    for name, shape in official_specs(TINY):
        module = name.rsplit(".", 1)[0]
        for oname, rows in ref_outputs(name, shape):
            if not checked(oname):
                assert oname in got
            elif module + ".weight_int8" in sd and name.endswith(".weight"):
                exact = sd[module + ".weight_int8"].double() * sd[module + ".weight_scale"].double()[:, None]
                lo, hi = rows or (0, exact.shape[0])
                want = merged(exact[lo:hi], fused_terms(setup["pairs"], module, lo, hi), torch.bfloat16)
                assert same_bits(got[oname], want), oname
            elif name == "final_layer.linear.weight":
                assert same_bits(got[oname], merge_reference(sd[name], setup["pairs"], module, torch.bfloat16))
            else:
                v = sd[name] if rows is None else sd[name][rows[0]:rows[1]]
                assert raw(got[oname]) == raw(v.to(torch.bfloat16)), oname


# ----------------------------------------------------------------------------- same bytes, any way computed


def test_fp8_bytes_do_not_depend_on_chunks_workers_or_stages(tmp_path, monkeypatch):
    """The same bytes with one worker, with three and chunks of three rows, and through the device stages
    (run on the CPU): fp8 merges and fp8 repacks (4 blocks: this is about the arithmetic)."""
    small = dataclasses.replace(TINY, depth=4)
    base_path = write_wanvideo_checkpoint(str(tmp_path / "base.safetensors"), small, fp8="e4m3fn", scale="tensor")
    official = write_base_checkpoint(str(tmp_path / "official"), small, "longcat", shards=2)
    pairs = [(write_native_lora(str(tmp_path / "l.safetensors"), "refinement", dims=small.dims, rank=4,
                                dtype=torch.float32, seed=5), 0.7)]
    outs = []
    runs = [lambda jobs, device: mc.CpuStages(merge_mod.DEPTH, workers=1),
            lambda jobs, device: mc.CpuStages(merge_mod.DEPTH, workers=3, chunk_elements=3 * TINY.hidden_size),
            lambda jobs, device: mc.DeviceStages(jobs, "cpu", merge_mod.DEPTH)]
    for k, stages in enumerate(runs):
        monkeypatch.setattr(merge_mod, "_stages", stages)
        a, b = tmp_path / f"m{k}.safetensors", tmp_path / f"r{k}.safetensors"
        L.merge_checkpoint(base_path, str(a), pairs, device="cpu")
        L.merge_checkpoint(official, str(b), pairs, layout="wanvideo", dtype="fp8_e4m3fn_scaled", device="cpu")
        outs.append((open(a, "rb").read(), open(b, "rb").read()))
    assert outs[0] == outs[1] == outs[2]


# ----------------------------------------------------------------------------- bad input


def _bad_cases(setup, tmp_path):
    wv8 = write_wanvideo_checkpoint(str(tmp_path / "wv8.safetensors"), TINY, fp8="e4m3fn", scale="row")
    sd = load_all(wv8)
    lora = setup["loras"]["cfg"]
    s = "blocks.3.ffn.w2.scale_weight"

    def edited(name, **changes):
        d = dict(sd)
        for k, v in changes.items():
            k = k.replace("__", ".")
            if v is None:
                d.pop(k)
            else:
                d[k] = v
        path = str(tmp_path / f"{name}.safetensors")
        save_file(d, path)
        return path

    rows = sd[s].shape[0]
    yield "no_scale", [edited("no_scale", **{s.replace(".", "__"): None}), "--lora", lora], \
        "fp8 weight 'blocks.3.ffn.w2.weight' has no scale"
    yield "scale_shape", [edited("scale_shape", **{s.replace(".", "__"): torch.ones(3)}), "--lora", lora], \
        "scale 'blocks.3.ffn.w2.scale_weight' is F32 [3]; for the fp8 weight 'blocks.3.ffn.w2.weight'"
    for what, value in (("zero", 0.0), ("negative", -0.5), ("nan", float("nan")), ("inf", float("inf"))):
        v = sd[s].clone()
        v[5] = value
        yield f"scale_{what}", [edited(f"scale_{what}", **{s.replace(".", "__"): v}), "--lora", lora], \
            f"scale 'blocks.3.ffn.w2.scale_weight' element 5 is {value!r}; every scale must be positive and finite"
    yield "two_scales", [edited("two_scales", **{"blocks__3__ffn__w2__weight_scale": sd[s].clone()}), "--lora", lora], \
        "has two scales"
    yield "scale_on_bf16", [edited("scale_on_bf16", **{"blocks__3__modulation__1__scale_weight": torch.tensor(1.0)}),
                            "--lora", lora], "scale 'blocks.3.modulation.1.scale_weight' belongs to no fp8 weight"
    wv = load_all(setup["wv"])
    mixed = dict(wv)
    mixed.pop("blocks.5.self_attn.k.weight")
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    yield "mixed", [str(tmp_path / "mixed.safetensors"), "--lora", lora], \
        "has blocks.5.self_attn.q.weight" if False else "has blocks.5.self_attn.q, blocks.5.self_attn.v but not blocks.5.self_attn.k"
    both = dict(wv)
    both["blocks.5.attn.qkv.weight"] = torch.zeros(3 * 64, 64, dtype=torch.bfloat16)
    save_file(both, str(tmp_path / "both.safetensors"))
    yield "two_layouts", [str(tmp_path / "both.safetensors"), "--lora", lora], \
        "has both blocks.5.attn.qkv and blocks.5.self_attn.q, blocks.5.self_attn.k, blocks.5.self_attn.v"
    wide = write_native_lora(str(tmp_path / "wide.safetensors"), "cfg_step",
                             dims=TINY.dims.__class__(hidden=32, ffn=96, adaln=32, final_out=16, depth=48), rank=2)
    yield "lora_shape", [setup["wv"], "--lora", wide], "LoRA modules do not fit base"
    yield "lora_shape_fp8", [wv8, "--lora", wide], "LoRA modules do not fit base"
    tiny = dict(sd)
    w = "blocks.3.ffn.w2"
    tiny[w + ".weight"] = torch.full(sd[w + ".weight"].shape, 2.0 ** -9).to(torch.float8_e4m3fn)
    tiny[w + ".scale_weight"] = torch.full((rows,), 2.0 ** -20, dtype=torch.float16)
    lora_small = write_native_lora(str(tmp_path / "small.safetensors"), "cfg_step", dims=TINY.dims, rank=2,
                                   dtype=torch.float32, alpha_scale=1e-12)
    save_file(tiny, str(tmp_path / "f16scale.safetensors"))
    yield "scale_dtype_range", [str(tmp_path / "f16scale.safetensors"), "--lora", lora_small], \
        "'blocks.3.ffn.w2.weight' block [0, 0]: a scale of 2**-37 is outside what F16 holds exactly"
    avatar = write_base_checkpoint(str(tmp_path / "avatar_prenorm"), TINY_AVATAR, "avatar", shards=1,
                                   audio_prenorm=True)
    yield "prenorm", [avatar, "--layout", "wanvideo"], \
        "tensor blocks.0.pre_audio_crs_attn_norm.weight has no counterpart in ComfyUI-WanVideoWrapper's model"
    extra = dict(wv)
    extra["not_a_parameter.weight"] = torch.zeros(2)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    yield "unknown", [str(tmp_path / "extra.safetensors"), "--layout", "wanvideo"], \
        "tensor not_a_parameter.weight is not a parameter the naming table knows"
    yield "fp8_repack", [wv8, "--layout", "wanvideo"], "holds scaled fp8 weights, so it is in the wrapper's layout"
    yield "fp8_without_layout", [setup["wv"], "--lora", lora, "--dtype", "fp8_e4m3fn_scaled"], \
        "--dtype fp8_e4m3fn_scaled writes the wrapper's layout: give --layout wanvideo"
    yield "no_lora", [setup["wv"]], "give at least one --lora"


# Runs the real CLI's main() on each case in one child process (one interpreter start for all): prints
# one JSON line per case, its exit code and what it wrote to stderr.
MANY = r"""
import contextlib, io, json, sys
from longcat_lora.commands.cli import main
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    print(json.dumps([code, err.getvalue()]), flush=True)
"""


def test_bad_input_exits_2_with_one_line_and_writes_nothing(setup, tmp_path):
    cases = list(_bad_cases(setup, tmp_path))
    argvs = [["merge", str(args[0]), str(tmp_path / f"out_{name}.safetensors"), *map(str, args[1:])]
             for name, args, _ in cases]
    p = subprocess.run([sys.executable, "-c", MANY, json.dumps(argvs)], capture_output=True, text=True, env=ENV,
                       timeout=600)
    results = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert len(results) == len(cases), p.stderr
    for (name, _, says), (code, err) in zip(cases, results):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (name, code, err)
        assert says in lines[0], (name, lines[0])
        assert not (tmp_path / f"out_{name}.safetensors").exists(), name
    assert temps(tmp_path) == []


# ----------------------------------------------------------------------------- faults


@pytest.mark.parametrize("what", ["fp8", "repack"])
def test_sigterm_and_sigkill_mid_write(setup, tmp_path, what):
    if what == "fp8":
        base = write_wanvideo_checkpoint(str(tmp_path / "base.safetensors"), TINY, fp8="e4m3fn", scale="row")
        args = ["merge", base, tmp_path / "out.safetensors", *setup["args"]]
    else:
        args = ["merge", setup["official"], tmp_path / "out.safetensors", "--layout", "wanvideo", "--dtype",
                "fp8_e4m3fn_scaled", *setup["args"]]
    for sig in (signal.SIGTERM, signal.SIGKILL) if what == "repack" else (signal.SIGTERM,):
        p = subprocess.Popen([sys.executable, "-c", "import sys\n" + SLOW + MAIN, *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            assert p.stdout.readline().strip() == "WRITING"
            assert len(temps(tmp_path)) == 1
            p.send_signal(sig)
            _, err = p.communicate(timeout=60)
        finally:
            p.kill()
        assert not (tmp_path / "out.safetensors").exists()
        if sig == signal.SIGTERM:
            assert p.returncode == 143 and err.strip() == "longcat-lora: terminated" and temps(tmp_path) == []
        else:
            assert p.returncode == -9 and len(temps(tmp_path)) == 1  # nothing runs after SIGKILL: its temp stays
    if what == "repack":
        cli(*args)  # the next run reclaims the dead writer's temp and writes OUT
        assert temps(tmp_path) == [] and (tmp_path / "out.safetensors").exists()


def test_disk_full_and_input_cut_while_read_name_the_file(setup, tmp_path):
    wv8 = write_wanvideo_checkpoint(str(tmp_path / "wv8.safetensors"), TINY, fp8="e4m3fn", scale="row")
    for args, out in ((["merge", wv8, tmp_path / "o1.safetensors", *setup["args"]], tmp_path / "o1.safetensors"),
                      (["merge", setup["official"], tmp_path / "o2.safetensors", "--layout", "wanvideo", "--dtype",
                        "fp8_e4m3fn_scaled"], tmp_path / "o2.safetensors")):
        line = one_error_line(child(ENOSPC, *args))
        assert line == f"longcat-lora: error: {out}: No space left on device", line
        assert not out.exists() and temps(tmp_path) == []
    shard = os.path.join(setup["official"], "diffusion_pytorch_model-00002-of-00003.safetensors")
    for victim, base, mode, extra in ((wv8, wv8, "pread", setup["args"]),
                                      (shard, setup["official"], "copy", ["--layout", "wanvideo"])):
        d = tmp_path / f"cut_{mode}_{os.path.basename(base)}"
        d.mkdir()
        b = shutil.copytree(base, d / "base") if os.path.isdir(base) else shutil.copy(base, d / "base.safetensors")
        v = os.path.join(b, os.path.basename(victim)) if os.path.isdir(b) else b
        out = d / "out.safetensors"
        p = child(SHRINK, "merge", b, out, *extra, env={"VICTIM": v, "MODE": mode})
        line = one_error_line(p)
        cut = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("CUT ")]
        assert len(cut) == 1, p.stdout
        _, name, nbytes = cut[0]
        assert line.startswith(f"longcat-lora: error: {v}: changed or truncated while being read (tensor {name!r}: "
                               f"expected "), line
        assert not out.exists() and temps(d) == []


def test_repack_output_is_a_file_and_overwrite_replaces_only_a_file(setup, tmp_path):
    out = tmp_path / "wan.safetensors"
    cli("merge", setup["official"], out, "--layout", "wanvideo")
    first = out.read_bytes()
    (tmp_path / "adir").mkdir()
    argvs = [["merge", str(setup["official"]), str(out), "--layout", "wanvideo"],
             ["merge", str(setup["official"]), str(tmp_path / "adir"), "--layout", "wanvideo", "--overwrite"]]
    p = subprocess.run([sys.executable, "-c", MANY, json.dumps(argvs)], capture_output=True, text=True, env=ENV)
    (c1, e1), (c2, e2) = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert c1 == 2 and "already exists (pass --overwrite to replace it)" in e1 and e1.count("\n") == 1
    assert c2 == 2 and "exists and is a directory; --overwrite replaces only a regular file" in e2
    cli("merge", setup["official"], out, "--layout", "wanvideo", *setup["args"], "--overwrite")
    assert out.read_bytes() != first and out.read_bytes() == open(repacked_with_loras(setup), "rb").read()
    assert temps(tmp_path) == [] and os.listdir(tmp_path / "adir") == []


def test_comfyui_prefixed_checkpoint_is_merged_under_its_prefix(setup, tmp_path):
    """ComfyUI saves every tensor under `model.diffusion_model.` (the wrapper strips it when loading): the
    same merge, the same bytes, under the same names; a repack of such a file is refused."""
    base_path = write_wanvideo_checkpoint(str(tmp_path / "base.safetensors"), TINY, fp8="e4m3fn", scale="tensor")
    plain = tmp_path / "plain.safetensors"
    L.merge_checkpoint(base_path, str(plain), [(setup["loras"]["cfg"], 1.0)], device="cpu")
    sd = load_all(base_path)
    pre = str(tmp_path / "prefixed.safetensors")
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, pre)
    out = tmp_path / "out.safetensors"
    p = cli("merge", pre, out, "--lora", setup["loras"]["cfg"])
    assert "requantized 480 fp8 weights" in p.stdout  # 10 per block: q k v o, q k v, w1 w2 w3
    a, b = load_all(str(plain)), load_all(str(out))
    assert set(b) == {"model.diffusion_model." + k for k in a}
    assert all(raw(b["model.diffusion_model." + k]) == raw(v) for k, v in a.items())
    pre16 = str(tmp_path / "prefixed_bf16.safetensors")
    save_file({"model.diffusion_model." + k: v for k, v in load_all(setup["wv"]).items()}, pre16)
    with pytest.raises(L.LoraError, match=r"named under 'model.diffusion_model.' \(a ComfyUI checkpoint\).*without "
                                          r"layout='wanvideo'"):
        L.merge_checkpoint(pre16, str(tmp_path / "x.safetensors"), [], layout="wanvideo")
