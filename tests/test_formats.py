"""PEFT, diffusers and ComfyUI/kohya outputs, loaded by the real libraries (or, for the kohya/Wan2GP
form, by its documented semantics), against the native LoRA reference."""

import json
import logging
import re
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longcat_lora import LoraError, convert, load_lora
from longcat_lora.model.adapter import Naming
from longcat_lora.model.naming import Scheme
from conftest import DIMS, cli
from linear_bag import LinearBag
from reference import lora_delta, official_delta, rel_err, worst

FORMATS = ["longcat", "fastvideo", "peft", "diffusers", "kohya", "wanvideo"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _no_key_warnings(w, handler):
    msgs = [str(x.message) for x in w] + handler.messages
    bad = [m for m in msgs if re.search(r"missing|unexpected", m, re.I)]
    assert not bad, bad


def load_in_real_peft(adapter_dir, dims):
    """A LinearBag(dims) (seed 0) with the PEFT adapter directory loaded by real PEFT; any warning about
    missing or unexpected keys fails the test. Returns (the PeftModel, the base state dict)."""
    from peft import PeftModel

    torch.manual_seed(0)
    model = LinearBag(dims)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    handler = _Records()
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            pm = PeftModel.from_pretrained(model, str(adapter_dir))
    finally:
        logging.getLogger().removeHandler(handler)
    _no_key_warnings(w, handler)
    return pm, base


def load_in_real_diffusers(path, dims):
    """A diffusers PeftAdapterMixin model holding a LinearBag(dims) (seed 0) with the LoRA file loaded by
    real diffusers (`load_lora_adapter(prefix="transformer")`); key warnings fail the test.
    Returns (the model, the base state dict)."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.loaders import PeftAdapterMixin

    class TinyTransformer(ModelMixin, ConfigMixin, PeftAdapterMixin):
        @register_to_config
        def __init__(self, depth: int = 48):
            super().__init__()
            bag = LinearBag(dims)
            self.blocks, self.final_layer = bag.blocks, bag.final_layer

    torch.manual_seed(0)
    model = TinyTransformer()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    handler = _Records()
    for name in ("diffusers", "peft", ""):
        logging.getLogger(name).addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            model.load_lora_adapter(str(path), prefix="transformer", use_safetensors=True)
    finally:
        for name in ("diffusers", "peft", ""):
            logging.getLogger(name).removeHandler(handler)
    _no_key_warnings(w, handler)
    return model, base


def _check_layers(model, ref: dict[str, torch.Tensor], base: dict[str, torch.Tensor], prefix=""):
    """Each adapted layer's output == base(x) + x @ dW_ref^T, <= 1e-5 relative in fp32."""
    g = torch.Generator().manual_seed(0)
    worst_err = worst_delta = 0.0
    for name, dW in ref.items():
        layer = model.get_submodule(prefix + name)
        x = torch.randn(5, dW.shape[1], generator=g)
        with torch.no_grad():
            got = layer(x)
        W, b = base[name + ".weight"].double(), base.get(name + ".bias")
        want = x.double() @ (W + dW).T + (b.double() if b is not None else 0)
        worst_err = max(worst_err, rel_err(want, got.double()))
        lora_part = got.double() - (x.double() @ W.T + (b.double() if b is not None else 0))
        worst_delta = max(worst_delta, rel_err(x.double() @ dW.T, lora_part))
    assert worst_err <= 1e-5, worst_err
    assert worst_delta <= 1e-3, worst_delta  # the LoRA term itself, after fp32 cancellation against W x
    return worst_err


@pytest.fixture
def mixed_rank_native(native, tmp_path):
    """A refinement LoRA whose modules are not all of one rank or scale (so patterns are needed)."""
    src = native("refinement", rank=4, alpha_scale=0.3, dtype=torch.float32, name="base.safetensors")
    sd = load_file(src)
    p = "lora___lorahyphen___blocks___lorahyphen___2___lorahyphen___ffn___lorahyphen___w2"
    sd[f"{p}.lora_down.weight"] = torch.randn(7, DIMS.ffn) * 0.1
    sd[f"{p}.lora_up.weight"] = torch.randn(DIMS.hidden, 7) * 0.1
    sd[f"{p}.alpha_scale"] = torch.tensor(1.25)
    path = str(tmp_path / "mixed.safetensors")
    save_file(sd, path)
    return path


def test_peft_directory_loads_in_real_peft(mixed_rank_native, tmp_path):
    out = tmp_path / "adapter"
    cli("convert", mixed_rank_native, out, "--to", "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_rslora"] is False
    assert cfg["rank_pattern"]["blocks.0.attn.qkv"] == 12 and cfg["rank_pattern"]["blocks.2.ffn.w2"] == 7
    assert cfg["rank_pattern"]["final_layer.adaLN_modulation.1"] == 8
    assert cfg["alpha_pattern"]["blocks.2.ffn.w2"] == 7 * 1.25
    assert "final_layer.adaLN_modulation.1" in cfg["target_modules"] and len(cfg["target_modules"]) == 386
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all(re.match(r"^base_model\.model\..+\.lora_[AB]\.weight$", k) for k in keys) and len(keys) == 772
    pm, base = load_in_real_peft(out, DIMS)
    # PEFT resolved the patterns as intended: the 6-way adaLN of a block is not confused with the final one
    assert pm.base_model.model.blocks[0].adaLN_modulation[1].r["default"] == 24
    assert pm.base_model.model.final_layer.adaLN_modulation[1].r["default"] == 8
    _check_layers(pm.base_model.model, official_delta(mixed_rank_native), base)


def test_diffusers_file_loads_in_real_diffusers(mixed_rank_native, tmp_path):
    out = tmp_path / "lora.safetensors"
    cli("convert", mixed_rank_native, out, "--to", "diffusers")
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert meta["transformer.r"] == 4 and meta["transformer.rank_pattern"]["blocks.2.ffn.w2"] == 7
    assert all(k.startswith("transformer.") for k in meta)
    assert all(re.match(r"^transformer\..+\.lora_[AB]\.weight$", k) for k in keys)
    model, base = load_in_real_diffusers(out, DIMS)
    _check_layers(model, official_delta(mixed_rank_native), base)


def kohya_delta(path: str) -> dict[str, torch.Tensor]:
    """The kohya / ComfyUI / Wan2GP semantics: dW = alpha / rank * up @ down."""
    sd = load_file(path)
    assert all(k.endswith((".weight", ".alpha")) for k in sd)  # Wan2GP rejects anything else
    out = {}
    for k in sd:
        if k.endswith(".lora_down.weight"):
            m = k[: -len(".lora_down.weight")]
            down, up = sd[k].double(), sd[m + ".lora_up.weight"].double()
            alpha = float(sd[m + ".alpha"]) if m + ".alpha" in sd else down.shape[0]
            out[m.removeprefix("diffusion_model.")] = alpha / down.shape[0] * (up @ down)
    return out


def test_kohya_file_semantics(mixed_rank_native, tmp_path):
    out = str(tmp_path / "comfy.safetensors")
    cli("convert", mixed_rank_native, out, "--to", "kohya")
    sd = load_file(out)
    assert all(k.startswith("diffusion_model.") for k in sd)
    assert sd["diffusion_model.blocks.0.attn.qkv.lora_down.weight"].shape == (12, DIMS.hidden)
    up = sd["diffusion_model.blocks.0.attn.qkv.lora_up.weight"]
    assert up.shape == (3 * DIMS.hidden, 12) and up[:DIMS.hidden, 4:].abs().max() == 0  # block-diagonal
    assert sd["diffusion_model.blocks.0.attn.qkv.alpha"].shape == ()
    assert worst(official_delta(mixed_rank_native), kohya_delta(out)) < 1e-7


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_round_trip_bit_exact(native, tmp_path, fmt, dtype):
    src = native("refinement", rank=4, dtype=dtype, alpha_scale=0.5)
    out, back = str(tmp_path / f"x.{fmt}"), str(tmp_path / "back.safetensors")
    convert(src, out, fmt)
    convert(out, back, "longcat")
    a, b = load_file(src), load_file(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for other in FORMATS:  # any form to any form stays exact
        o2 = str(tmp_path / f"y.{other}")
        convert(out, o2, other)
        # the weight change each target runtime applies (independent readers) is the native one
        assert worst(official_delta(src), lora_delta(o2)) <= 1e-15, (fmt, other)


def test_split_parts_with_different_ranks_and_alphas(tmp_path):
    """FastVideo LoRA trained with rank 16 on to_q, 8 on to_v and different alphas (no to_k)."""
    g = torch.Generator().manual_seed(3)
    h = DIMS.hidden
    sd = {"blocks.1.self_attn.to_q.lora_A": torch.randn(16, h, generator=g),
          "blocks.1.self_attn.to_q.lora_B": torch.randn(h, 16, generator=g),
          "blocks.1.self_attn.to_q.lora_alpha": torch.tensor(8.0),
          "blocks.1.self_attn.to_v.lora_A": torch.randn(8, h, generator=g),
          "blocks.1.self_attn.to_v.lora_B": torch.randn(h, 8, generator=g),
          "blocks.1.self_attn.to_v.lora_alpha": torch.tensor(3.0),
          "blocks.1.cross_attn.to_k.lora_A": torch.randn(2, h, generator=g).to(torch.bfloat16),
          "blocks.1.cross_attn.to_k.lora_B": torch.randn(h, 2, generator=g).to(torch.bfloat16),
          "blocks.1.cross_attn.to_v.lora_A": torch.randn(4, h, generator=g),
          "blocks.1.cross_attn.to_v.lora_B": torch.randn(h, 4, generator=g),
          "blocks.1.cross_attn.to_v.lora_alpha": torch.tensor(1.0)}
    src = str(tmp_path / "fv.safetensors")
    save_file(sd, src)
    from reference import fastvideo_delta

    ref = fastvideo_delta(src)
    native = str(tmp_path / "native.safetensors")
    convert(src, native, "longcat")
    n = load_file(native)
    qkv = "lora___lorahyphen___blocks___lorahyphen___1___lorahyphen___attn___lorahyphen___qkv"
    assert n[f"{qkv}.lora_down.weight"].shape == (48, h)  # 3 blocks, padded to rank 16
    assert n[f"{qkv}.lora_up.blocks.1.weight"].abs().max() == 0  # to_k absent: a zero block
    assert worst(ref, official_delta(native)) < 1e-6
    for fmt in ("peft", "kohya", "diffusers", "fastvideo"):
        out = str(tmp_path / f"o.{fmt}")
        convert(native, out, fmt)
        assert worst(ref, lora_delta(out)) < 1e-6, fmt
    assert worst(ref, kohya_delta(str(tmp_path / "o.kohya"))) < 1e-6


def test_verify_across_formats_detects_perturbation(native, tmp_path):
    src = native("refinement", rank=4)
    cli("convert", src, tmp_path / "adapter", "--to", "peft")
    cli("verify", tmp_path / "adapter", src)
    sd = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    sd["base_model.model.blocks.9.adaLN_modulation.1.lora_B.weight"][70, 5] += 1e-3
    save_file(sd, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    p = cli("verify", tmp_path / "adapter", src, check=1)
    assert "blocks.9.adaLN_modulation.1" in p.stdout


def _dit_inputs():
    g = torch.Generator().manual_seed(5)
    from longcat_lora.testing.dit import TINY

    return (torch.randn(1, TINY.in_channels, 2, 4, 4, generator=g), torch.tensor([300.0]),
            torch.randn(1, 1, 6, TINY.caption_channels, generator=g))


def test_end_to_end_real_peft_and_diffusers_on_reference_dit(tmp_path):
    """The whole reference DiT with the adapter loaded by real PEFT / real diffusers vs the official
    LoRA semantics on the native file: <= 1e-5 relative in fp32, no key warnings."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.loaders import PeftAdapterMixin
    from peft import PeftModel

    from longcat_lora.testing.dit import TINY, LongCatDiT
    from longcat_lora.testing.fixtures import write_native_lora
    from longcat_lora.testing.official import disable_official_loras, enable_official_loras

    src = write_native_lora(str(tmp_path / "n.safetensors"), "refinement", dims=TINY.dims, rank=4,
                            dtype=torch.float32, alpha_scale=0.3, seed=9)
    convert(src, str(tmp_path / "adapter"), "peft")
    convert(src, str(tmp_path / "d.safetensors"), "diffusers")
    torch.manual_seed(0)
    model = LongCatDiT(TINY).eval()
    base_sd = model.state_dict()
    enable_official_loras(model, [(src, 1.0)])
    with torch.no_grad():
        want = model(*_dit_inputs())
    disable_official_loras(model)
    with torch.no_grad():
        plain = model(*_dit_inputs())
    assert rel_err(want, plain) > 1e-3

    handler = _Records()
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            pm = PeftModel.from_pretrained(model, str(tmp_path / "adapter"))
            with torch.no_grad():
                got_peft = pm(*_dit_inputs())

            class DiffusersDiT(LongCatDiT, ModelMixin, ConfigMixin, PeftAdapterMixin):
                config_name = "config.json"

                @register_to_config
                def __init__(self, tiny: bool = True):
                    LongCatDiT.__init__(self, TINY)

            dm = DiffusersDiT().eval()
            dm.load_state_dict(base_sd)
            dm.load_lora_adapter(str(tmp_path / "d.safetensors"), prefix="transformer", use_safetensors=True)
            with torch.no_grad():
                got_diffusers = dm(*_dit_inputs())
    finally:
        logging.getLogger().removeHandler(handler)
    _no_key_warnings(w, handler)
    assert rel_err(want, got_peft) <= 1e-5
    assert rel_err(want, got_diffusers) <= 1e-5


def test_fastvideo_names_in_other_formats_map_to_longcat_modules(tmp_path):
    """A kohya/ComfyUI file written against FastVideo's split names still lands on attn.qkv rows."""
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(3, 64, generator=g), torch.randn(64, 3, generator=g)
    save_file({"diffusion_model.blocks.2.self_attn.to_v.lora_down.weight": A,
               "diffusion_model.blocks.2.self_attn.to_v.lora_up.weight": B,
               "diffusion_model.blocks.2.self_attn.to_v.alpha": torch.tensor(1.5)}, str(tmp_path / "k.safetensors"))
    with load_lora(str(tmp_path / "k.safetensors")) as a:
        m = a.modules["blocks.2.attn.qkv"]
        assert m.out_features == 192 and [p.rows for p in m.parts] == [(128, 192)]
        assert torch.allclose(m.delta()[128:], 0.5 * (B.double() @ A.double()))
    # an unknown name is kept as read, and never written: refused, or left out with skip_unmapped
    (tmp_path / "p").mkdir()
    save_file({"base_model.model.blocks.0.self_attn.to_qkv.lora_A.weight": A,
               "base_model.model.blocks.0.self_attn.to_qkv.lora_B.weight": B,
               "base_model.model.blocks.0.ffn.w1.lora_A.weight": A.clone(),
               "base_model.model.blocks.0.ffn.w1.lora_B.weight": torch.randn(176, 3, generator=g)},
              str(tmp_path / "p" / "adapter_model.safetensors"))
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 3, "lora_alpha": 3}))
    with load_lora(str(tmp_path / "p")) as a:
        assert a.modules["blocks.0.self_attn.to_qkv"].naming is Naming.UNKNOWN
    with pytest.raises(LoraError, match=r"1 modules are not modules of LongCat-Video or LongCat-Video-Avatar .*"
                                        r"\(blocks.N.self_attn.\* is a module path in FastVideo's and the wrapper's "
                                        r"\(Wan-style\) naming, but 'to_qkv' is no layer there\).*: blocks.0.self_attn.to_qkv$"):
        convert(str(tmp_path / "p"), str(tmp_path / "again"), "peft")
    assert not (tmp_path / "again").exists()
    assert convert(str(tmp_path / "p"), str(tmp_path / "again"), "peft", skip_unmapped=True) == ["blocks.0.self_attn.to_qkv"]
    with load_lora(str(tmp_path / "again")) as a:
        assert list(a.modules) == ["blocks.0.ffn.w1"]


# ------------------------------------------------------------------ the format interface and registry

# key -> the one format that owns it (None: no format's), spelled out from each format's documented keys
OWNERS = {
    "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv.lora_down.weight": "longcat",
    "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___ffn___lorahyphen___w1.alpha_scale": "longcat",
    "lora___lorahyphen___x.lora_A": "longcat",  # the native prefix decides, whatever the suffix
    "lora___lorahyphen___x.alpha": "longcat",
    "blocks.0.self_attn.to_q.lora_A": "fastvideo",
    "diffusion_model.blocks.0.ffn.w1.lora_B.weight": "fastvideo",
    "blocks.0.ffn.w1.lora_alpha": "fastvideo",
    "base_model.model.blocks.0.attn.qkv.lora_A.weight": "peft",
    "base_model.model.blocks.0.attn.qkv.lora_alpha": "peft",
    "transformer.blocks.0.attn.qkv.lora_B.weight": "diffusers",
    "diffusion_model.blocks.0.attn.qkv.lora_down.weight": "kohya",
    "blocks.0.attn.qkv.lora_up.weight": "kohya",
    "transformer.blocks.0.attn.qkv.alpha": "kohya",
    "diffusion_model.blocks.0.self_attn.q.lora_down.weight": "kohya",  # the wrapper's names: kohya keys
    "lora_unet_blocks_0_attn_qkv.lora_up.weight": "kohya",
    "blocks.0.attn.qkv.lora_A.default.weight": "diffsynth",  # a PEFT adapter-name segment
    "pipe.dit.blocks.0.attn.qkv.lora_B.weight": "diffsynth",
    "dit.blocks.0.attn.qkv.alpha": "diffsynth",
    "blocks.0.attn.qkv.weight": None,
    "blocks.0.attn.qkv.lora_A.bias": None,
    "transformer.blocks.0.attn.qkv.weight": None,
    "blocks.0.attn.qkv.lora_alphas": None,
}


def test_each_key_has_at_most_one_owner_and_detection_asks_the_formats():
    from longcat_lora.formats import FORMATS, Format
    from longcat_lora.formats.registry import detect, owner

    assert list(FORMATS) == ["longcat", "fastvideo", "peft", "diffusers", "kohya", "wanvideo", "diffsynth"]
    assert [f.name for f in FORMATS.values() if f.fallback] == ["fastvideo", "kohya"]  # keys without a prefix
    for key, want in OWNERS.items():
        got = owner(key)
        assert (got and got.name) == want, key
        for fallback in (False, True):  # exclusive within each kind
            assert sum(f.owns_key(key) for f in FORMATS.values() if f.fallback is fallback) <= 1, key
        if want:
            assert detect([key, "stray.weight"], "f.safetensors").name == want
    assert all(isinstance(f, Format) and f.directory == (f.name == "peft") for f in FORMATS.values())
    with pytest.raises(LoraError, match=r"^f: mixed formats in one file: kohya \('a.alpha'\) and fastvideo "
                                        r"\('b.lora_A'\)$"):
        detect(["a.alpha", "b.lora_A", "c.lora_B"], "f")
    with pytest.raises(LoraError, match=r"^f: no LoRA tensors found \(e.g. 'x.y'\)$"):
        detect(["x.y"], "f")
    with pytest.raises(LoraError, match=r"^f: looks like a base model checkpoint"):
        detect(["blocks.0.attn.qkv.weight"], "f")
    with pytest.raises(LoraError, match=r"^f: holds no tensors$"):
        detect([], "f")


def _toy_format():
    """A sixth format written as a format module would be: `toy.<module>.down/.up/.alpha`, LongCat names."""
    from longcat_lora.formats import Format, WriteOptions
    from longcat_lora.formats import _common as c
    from longcat_lora.io.writer import write_safetensors
    from longcat_lora.model.adapter import LoraAdapter

    patterns = [(re.compile(rf"^toy\.(?P<layer>.+)\.{s}$"), role) for s, role in (("down", "a"), ("up", "b"),
                                                                                  ("alpha", "alpha"))]

    def read(sf) -> LoraAdapter:
        adapter = LoraAdapter({}, "toy", sf.path, files=[sf])
        for layer, keys in c.group_keys(sf, patterns, "toy LoRA").items():
            alpha = c.scalar(sf, keys.alpha)[0]
            c.add_standard_layer(adapter, sf, layer, keys, lambda r, alpha=alpha: alpha / r)
        return c.finish(adapter, sf.path)

    def write(adapter: LoraAdapter, path: str, opts: WriteOptions) -> None:
        entries, infos = c.layer_entries(adapter, opts, Scheme.LONGCAT, lambda m: f"toy.{m}.down",
                                         lambda m: f"toy.{m}.up", lambda scale, rank: scale * rank, "toy")
        entries += [c.scalar_entry(f"toy.{i.module}.alpha", i.alpha, "F64") for i in infos]
        write_safetensors(path, entries, c.metadata(adapter), opts.progress)

    return Format("toy", lambda key: key.startswith("toy."), read, write)


def test_a_new_format_is_one_module_and_one_registration(native, tmp_path, capsys):
    """Registering a format is all it takes for detection, load/save/convert and the CLI's --to to know it;
    its output holds the native LoRA's exact weight change (float64 reference from the native file)."""
    from longcat_lora.commands import cli as cli_module
    from longcat_lora.formats import FORMATS, Format, detect_format, register
    from longcat_lora.formats import registry

    src = native("cfg_step", rank=3)
    toy = _toy_format()
    try:
        assert register(toy) is toy and FORMATS["toy"] is toy
        with pytest.raises(ValueError, match="already registered"):
            register(toy)
        assert cli_module.main(["convert", src, str(tmp_path / "t.safetensors"), "--to", "toy"]) == 0
        assert detect_format(str(tmp_path / "t.safetensors")) == "toy"
        with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
            got = {}
            for k in f.keys():
                if k.endswith(".down"):
                    m = k[len("toy."):-len(".down")]
                    a, b = f.get_tensor(k).double(), f.get_tensor(f"toy.{m}.up").double()
                    got[m] = f.get_tensor(f"toy.{m}.alpha").item() / a.shape[0] * (b @ a)
        want = official_delta(src)
        assert set(got) == set(want) and worst(want, got) <= 1e-15
        convert(str(tmp_path / "t.safetensors"), str(tmp_path / "back.safetensors"), "longcat")
        back = official_delta(str(tmp_path / "back.safetensors"))
        assert worst(want, back) <= 1e-15
    finally:
        registry._REGISTRY.pop("toy", None)
    assert "toy" not in FORMATS
    with pytest.raises(LoraError, match=r"unknown output format 'toy' \(choose from longcat, fastvideo, peft, "
                                        r"diffusers, kohya, wanvideo, comfyui\)"):
        convert(src, str(tmp_path / "x"), "toy")
    with pytest.raises(TypeError, match="exactly for a directory format"):
        Format("bad", toy.owns_key, toy.read, toy.write, directory=True)
    with pytest.raises(TypeError, match="exactly for a directory format"):
        Format("bad", toy.owns_key, toy.read, toy.write, describe="a bad directory")


def test_two_formats_claiming_one_key_is_caught_not_decided_by_order(monkeypatch):
    """Claims are exclusive within each kind: a second prefixed format claiming native keys is a bug that
    detection reports, while a fallback format's claim yields to a prefixed one."""
    from longcat_lora.formats import FORMATS, Format
    from longcat_lora.formats import registry

    native_key = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv.lora_down.weight"
    greedy = Format("greedy", lambda key: key.endswith(".weight"), FORMATS["longcat"].read, FORMATS["longcat"].write)
    monkeypatch.setitem(registry._REGISTRY, "greedy", greedy)
    with pytest.raises(AssertionError, match=r"claimed by formats \['longcat', 'greedy'\]"):
        registry.owner(native_key)
    monkeypatch.setitem(registry._REGISTRY, "greedy", Format("greedy", greedy.owns_key, greedy.read, greedy.write,
                                                             fallback=True))
    assert registry.owner(native_key).name == "longcat"  # a fallback yields to a prefixed format
    assert registry.owner("blocks.0.attn.qkv.weight").name == "greedy"
    with pytest.raises(AssertionError, match=r"claimed by formats \['kohya', 'greedy'\]"):
        registry.owner("blocks.0.attn.qkv.lora_up.weight")  # two fallbacks


def test_kohya_file_without_alpha_has_scale_one(tmp_path):
    """kohya / ComfyUI: no `.alpha` means alpha = rank, scale 1 (mutation survivor: scale 0 went unnoticed)."""
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g)
    path = str(tmp_path / "k.safetensors")
    save_file({"diffusion_model.blocks.0.ffn.w1.lora_down.weight": down,
               "diffusion_model.blocks.0.ffn.w1.lora_up.weight": up}, path)
    want = kohya_delta(path)["blocks.0.ffn.w1"]
    assert rel_err(want, up.double() @ down.double()) == 0.0  # the reference's own reading: scale 1
    got = load_lora(path).modules["blocks.0.ffn.w1"].delta()
    assert rel_err(got, want) < 1e-15


@pytest.mark.parametrize("given", [dict(owns_path=str), dict(describe="x"), dict(replaceable=str),
                                   dict(owns_path=str, describe="x")])
def test_format_directory_fields_come_all_together(given):
    """A directory format gives owns_path, describe and replaceable, all three; a file format none."""
    from longcat_lora.formats.base import Format

    kw = dict(name="toy2", owns_key=lambda k: False, read=lambda sf: None, write=lambda a, p, o: None)
    with pytest.raises(TypeError, match="exactly"):
        Format(**kw, **given)
    with pytest.raises(TypeError, match="exactly"):
        Format(**kw, directory=True, **given)
    Format(**kw)  # a file format
    Format(**kw, directory=True, owns_path=str, describe="x", replaceable=str)
