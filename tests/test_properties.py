"""Property tests over random LoRA structures: native -> X -> native is exact for every format X."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from longcat_lora import convert
from longcat_lora.model.naming import TABLE, DitDims

from reference import official_delta, worst

SEP = "___lorahyphen___"
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@st.composite
def structures(draw):
    hidden = draw(st.sampled_from([12, 24]))
    dims = DitDims(hidden=hidden, ffn=2 * hidden, adaln=draw(st.sampled_from([6, 8])), final_out=4, depth=3)
    kinds = draw(st.lists(st.sampled_from([k for k in TABLE if k.fastvideo]), min_size=1, max_size=5, unique_by=lambda k: k.kind))
    dtype = draw(st.sampled_from(DTYPES))
    modules = []
    for k in kinds:
        out, inp = k.shape(dims)
        blocks = draw(st.lists(st.integers(0, dims.depth - 1), min_size=1, max_size=2, unique=True)) if k.per_block else [None]
        for i in blocks:
            ns = [n for n in (1, 2, 3, 4, 6) if out % n == 0]
            n = draw(st.sampled_from(ns))
            r = draw(st.integers(1, 5))
            scale = draw(st.sampled_from([0.5, 0.25, 1.0, 0.3, 2.0 / 3, 1.5, -0.75]))
            modules.append((k.longcat.format(i=i), out, inp, n, r, scale))
    return dtype, modules, draw(st.integers(0, 2**31 - 1))


def write(path, dtype, modules, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, out, inp, n, r, scale in modules:
        p = "lora" + SEP + name.replace(".", SEP)
        sd[f"{p}.lora_down.weight"] = torch.randn(n * r, inp, generator=g).to(dtype)
        if n == 1:
            sd[f"{p}.lora_up.weight"] = torch.randn(out, r, generator=g).to(dtype)
        else:
            for i in range(n):
                sd[f"{p}.lora_up.blocks.{i}.weight"] = torch.randn(out // n, r, generator=g).to(dtype)
        sd[f"{p}.alpha_scale"] = torch.tensor(scale, dtype=torch.float32)
    save_file(sd, path)
    return sd


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(structures())
def test_native_to_any_format_and_back(tmp_path_factory, case):
    dtype, modules, seed = case
    tmp = tmp_path_factory.mktemp("prop")
    src = str(tmp / "src.safetensors")
    sd = write(src, dtype, modules, seed)
    ref = official_delta(src)
    for fmt in ("longcat", "peft", "diffusers", "kohya", "fastvideo", "wanvideo"):
        out, back = str(tmp / f"out.{fmt}"), str(tmp / f"back.{fmt}.safetensors")
        convert(src, out, fmt)
        convert(out, back, "longcat")
        b = load_file(back)
        assert worst(ref, official_delta(back)) < 1e-6, fmt
        aligned = all(n % _splits(name) == 0 for name, _, _, n, _, _ in modules)
        integral = all(_int_alpha(scale, r, n // _splits(name)) for name, _, _, n, r, scale in modules)
        positive = all(scale > 0 for *_, scale in modules)  # kohya-form alphas are positive: -B carries a sign
        if fmt in ("kohya", "wanvideo") and not positive:
            assert worst(ref, official_delta(back)) == 0.0, fmt  # the same change exactly (signs moved)
        elif (fmt not in ("fastvideo", "wanvideo") or (aligned and (integral or fmt == "wanvideo"))):
            assert sd.keys() == b.keys(), fmt
            for k in sd:
                assert sd[k].dtype == b[k].dtype and torch.equal(sd[k], b[k]), (fmt, k)


def _splits(module: str) -> int:
    for k in TABLE:
        if module.endswith(k.longcat.split("}")[-1].lstrip(".")) and (k.per_block == module.startswith("blocks.")):
            return len(k.fastvideo)
    raise AssertionError(module)


def _int_alpha(scale: float, r: int, blocks_per_layer: int) -> bool:
    s = float(torch.tensor(scale, dtype=torch.float32))
    a = s * r * blocks_per_layer
    return a == int(a) and int(a) != 0 and math.isclose(int(a) / (r * blocks_per_layer), s, rel_tol=0, abs_tol=0)
