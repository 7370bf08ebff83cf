"""Every class of bad input: exit 2, one line on stderr naming the file, no traceback, no output."""

import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from conftest import cli

P = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
W1 = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___ffn___lorahyphen___w1"


def good_qkv(r=2, n=3, inp=8, h=4):
    return {f"{P}.lora_down.weight": torch.randn(n * r, inp),
            **{f"{P}.lora_up.blocks.{i}.weight": torch.randn(h, r) for i in range(n)},
            f"{P}.alpha_scale": torch.tensor(0.5)}


def write_sd(path, sd):
    save_file(sd, str(path))
    return str(path)


def _cases(tmp):
    cases = {}

    def st(name, sd):
        cases[name] = write_sd(tmp / f"{name}.safetensors", sd)

    p = tmp / "pickled.pt"
    torch.save({"a": torch.zeros(2)}, str(p))
    cases["torch_pickle_zip"] = str(p)
    p = tmp / "pickled_renamed.safetensors"
    p.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    cases["raw_pickle_named_safetensors"] = str(p)
    p = tmp / "text.safetensors"
    p.write_text("hello, this is not a tensor file at all")
    cases["text"] = str(p)
    p = tmp / "empty.safetensors"
    p.write_bytes(b"")
    cases["empty"] = str(p)
    good = write_sd(tmp / "good.safetensors", good_qkv())
    data = open(good, "rb").read()
    p = tmp / "truncated.safetensors"
    p.write_bytes(data[: len(data) - 10])
    cases["truncated"] = str(p)
    p = tmp / "badjson.safetensors"
    p.write_bytes(struct.pack("<Q", 10) + b"{not json}" + b"\0" * 16)
    cases["corrupt_header"] = str(p)
    p = tmp / "hugeheader.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    cases["header_length_past_end"] = str(p)
    p = tmp / "trailing_junk.safetensors"
    p.write_bytes(data + b"junk0000")
    cases["trailing_bytes"] = str(p)
    sd = good_qkv(); sd[f"{P}.lora_up.blocks.01.weight"] = torch.randn(4, 2); st("duplicate_up_block", sd)  # noqa: E702
    st("no_lora_tensors", {"foo": torch.zeros(3), "bar": torch.ones(2, 2)})
    st("base_checkpoint", {"blocks.0.attn.qkv.weight": torch.zeros(12, 4), "blocks.0.attn.qkv.bias": torch.zeros(12)})
    st("mixed_formats", {**good_qkv(), "blocks.0.self_attn.to_q.lora_A": torch.zeros(2, 8),
                         "blocks.0.self_attn.to_q.lora_B": torch.zeros(4, 2)})
    st("stray_tensor", {**good_qkv(), f"{P}.lora_mid.weight": torch.zeros(2, 2)})
    st("unknown_key", {**good_qkv(), "something_else": torch.zeros(2, 2)})
    sd = good_qkv(); del sd[f"{P}.lora_down.weight"]; st("missing_down", sd)  # noqa: E702
    sd = {f"{W1}.lora_down.weight": torch.randn(2, 8), f"{W1}.alpha_scale": torch.tensor(0.5)}
    st("missing_up", sd)
    sd = good_qkv(); del sd[f"{P}.lora_up.blocks.1.weight"]; st("missing_up_block", sd)  # noqa: E702
    sd = good_qkv(); sd[f"{P}.lora_down.weight"] = torch.randn(7, 8); st("inconsistent_rank", sd)  # noqa: E702
    sd = good_qkv(); sd[f"{P}.lora_up.blocks.2.weight"] = torch.randn(5, 2); st("inconsistent_shapes", sd)  # noqa: E702
    sd = good_qkv(); sd[f"{P}.lora_down.weight"] = torch.randn(48); st("one_d_weight", sd)  # noqa: E702
    sd = good_qkv(); sd[f"{P}.lora_down.weight"] = torch.ones(6, 8, dtype=torch.int32); st("integer_weight", sd)  # noqa: E702
    sd = good_qkv(); sd[f"{P}.alpha_scale"] = torch.tensor([0.5, 0.5]); st("non_scalar_alpha", sd)  # noqa: E702
    sd = good_qkv(); sd[f"{P}.alpha_scale"] = torch.tensor(float("nan")); st("nan_alpha", sd)  # noqa: E702
    sd = good_qkv(); sd[f"{P}.alpha_scale"] = torch.tensor(float("inf")); st("inf_alpha", sd)  # noqa: E702
    sd = {"blocks.0.self_attn.to_q.lora_A": torch.randn(2, 8), "blocks.0.self_attn.to_q.lora_B": torch.randn(4, 2),
          "blocks.0.self_attn.to_q.lora_alpha": torch.ones(2)}
    st("fastvideo_non_scalar_alpha", sd)
    sd = {"blocks.0.self_attn.to_q.lora_A": torch.randn(2, 8), "blocks.0.self_attn.to_q.lora_B": torch.randn(4, 3)}
    st("fastvideo_rank_mismatch", sd)
    sd = {"blocks.0.self_attn.to_q.lora_A": torch.randn(2, 8), "diffusion_model.blocks.0.self_attn.to_q.lora_A": torch.randn(2, 8),
          "blocks.0.self_attn.to_q.lora_B": torch.randn(4, 2)}
    st("fastvideo_duplicate_layer", sd)
    sd = {"blocks.0.self_attn.to_q.lora_A": torch.randn(2, 8), "blocks.0.self_attn.to_q.lora_B": torch.randn(4, 2),
          "blocks.0.self_attn.to_k.lora_A": torch.randn(2, 8), "blocks.0.self_attn.to_k.lora_B": torch.randn(6, 2)}
    st("fastvideo_split_sizes_disagree", sd)
    sd = {"blocks.0.self_attn.to_q.lora_A": torch.randn(2, 8)}
    st("fastvideo_missing_B", sd)
    return cases


def test_each_bad_input_class_is_refused_cleanly(tmp_path):
    cases = _cases(tmp_path)
    assert len(cases) >= 27
    for name, path in cases.items():
        out = tmp_path / f"out-{name}"
        before = set(os.listdir(tmp_path))
        p = cli("convert", path, out, "--to", "fastvideo", check=None)
        assert p.returncode == 2, (name, p.returncode, p.stderr)
        err = p.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert err.startswith("longcat-lora: error: ") and "internal error" not in err, (name, err)
        assert os.path.basename(path) in err, (name, err)
        assert not out.exists() and set(os.listdir(tmp_path)) == before, name  # no output, no temp files


def test_inspect_refuses_bad_input_too(tmp_path):
    cases = _cases(tmp_path)
    for name in ("torch_pickle_zip", "truncated", "base_checkpoint", "missing_up_block", "nan_alpha"):
        p = cli("inspect", cases[name], check=2)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = cli("inspect", cases["torch_pickle_zip"], check=2)
    assert "never unpickled" in p.stderr
    p = cli("inspect", cases["base_checkpoint"], check=2)
    assert "base model checkpoint" in p.stderr


def test_nan_weights_refused_unless_allowed(native, tmp_path):
    sd = good_qkv()
    sd[f"{P}.lora_up.blocks.2.weight"][1, 1] = float("nan")
    src = write_sd(tmp_path / "nan.safetensors", sd)
    for to in ("fastvideo", "longcat", "peft", "kohya", "diffusers"):
        out = tmp_path / f"o.{to}"
        p = cli("convert", src, out, "--to", to, check=2)
        assert "non-finite" in p.stderr and "nan.safetensors" in p.stderr
        assert not out.exists()
    cli("convert", src, tmp_path / "ok.safetensors", "--to", "fastvideo", "--allow-nonfinite")
    assert (tmp_path / "ok.safetensors").exists()
    # Inf in the down matrix of a module that is copied byte-for-byte
    sd = good_qkv()
    sd[f"{P}.lora_down.weight"][0, 0] = float("-inf")
    src = write_sd(tmp_path / "inf.safetensors", sd)
    cli("convert", src, tmp_path / "o2", "--to", "fastvideo", check=2)
    rep = cli("inspect", src, "--json").stdout
    assert "lora_down.weight" in rep and "NaN/Inf" in rep


def test_unmapped_modules_refused_or_skipped_with_a_list(tmp_path):
    """An Avatar audio module has no FastVideo name: refused there (or skipped and listed), held by the
    formats that name it."""
    audio = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___audio_cross_attn___lorahyphen___q_linear"
    sd = {**good_qkv(), f"{audio}.lora_down.weight": torch.randn(2, 8), f"{audio}.lora_up.weight": torch.randn(8, 2),
          f"{audio}.alpha_scale": torch.tensor(0.5)}
    src = write_sd(tmp_path / "avatar.safetensors", sd)
    p = cli("convert", src, tmp_path / "fv.safetensors", "--to", "fastvideo", check=2)
    assert "blocks.0.audio_cross_attn.q_linear" in p.stderr and "--skip-unmapped" in p.stderr
    assert "no name in FastVideo's naming" in p.stderr and p.stderr.count("\n") == 1
    assert not (tmp_path / "fv.safetensors").exists()
    p = cli("convert", src, tmp_path / "fv.safetensors", "--to", "fastvideo", "--skip-unmapped")
    assert "skipped" in p.stderr and "blocks.0.audio_cross_attn.q_linear" in p.stderr
    for to in ("peft", "wanvideo", "kohya"):  # formats that name it hold it
        out = tmp_path / to
        cli("convert", src, out, "--to", to)
        cli("convert", out, tmp_path / f"back_{to}.safetensors", "--to", "longcat")
        cli("verify", src, tmp_path / f"back_{to}.safetensors")


@pytest.mark.parametrize("to", ["longcat", "fastvideo", "peft", "diffusers", "kohya", "wanvideo"])
def test_a_module_of_no_longcat_model_is_never_written(tmp_path, to):
    """Issue 18: a module no naming of the table knows is refused by every writer (one line listing it,
    with what it resembles), and --skip-unmapped leaves it out and lists it; verify lists it as unknown."""
    odd = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkvx"
    sd = {**good_qkv(), f"{odd}.lora_down.weight": torch.randn(2, 8), f"{odd}.lora_up.weight": torch.randn(4, 2),
          f"{odd}.alpha_scale": torch.tensor(0.5)}
    src = write_sd(tmp_path / "odd.safetensors", sd)
    out = tmp_path / ("o" if to == "peft" else "o.safetensors")
    p = cli("convert", src, out, "--to", to, check=2)
    assert p.stderr.count("\n") == 1 and "not modules of LongCat-Video or LongCat-Video-Avatar" in p.stderr
    assert "blocks.N.attn.* is a module path in LongCat's naming, but 'qkvx' is no layer there" in p.stderr
    assert "blocks.0.attn.qkvx" in p.stderr and "--skip-unmapped" in p.stderr and not out.exists()
    p = cli("convert", src, out, "--to", to, "--skip-unmapped")
    assert "blocks.0.attn.qkvx" in p.stderr and out.exists()
    p = cli("verify", src, src)
    assert "unknown module" in p.stdout and "blocks.0.attn.qkvx" in p.stdout


def test_output_safety(native, tmp_path):
    src = native("cfg_step")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    p = cli("convert", src, out, "--to", "fastvideo", check=2)
    assert "--overwrite" in p.stderr and out.read_bytes() == b"precious"
    p = cli("convert", src, src, "--to", "longcat", "--overwrite", check=2)
    assert "same path" in p.stderr
    p = cli("convert", src, tmp_path / "nodir" / "x.safetensors", "--to", "fastvideo", check=2)
    assert "does not exist" in p.stderr
    cli("convert", src, out, "--to", "fastvideo", "--overwrite")
    assert out.stat().st_size > 1000
    p = cli("convert", tmp_path / "missing.safetensors", tmp_path / "y", "--to", "fastvideo", check=2)
    assert "no such file" in p.stderr


def test_failure_mid_write_leaves_nothing(tmp_path):
    """A NaN in the last module is found after earlier tensors were written: the temp file goes."""
    sd = good_qkv()
    late = "lora___lorahyphen___final_layer___lorahyphen___linear"
    sd[f"{late}.lora_down.weight"] = torch.randn(2, 8)
    sd[f"{late}.lora_up.weight"] = torch.full((4, 2), float("nan"))
    src = write_sd(tmp_path / "late.safetensors", sd)
    before = set(os.listdir(tmp_path))
    cli("convert", src, tmp_path / "o.safetensors", "--to", "fastvideo", check=2)
    assert set(os.listdir(tmp_path)) == before


def test_usage_errors_exit_2(tmp_path):
    assert cli("convert", "a", check=None).returncode == 2
    assert cli("convert", "a", "b", "--to", "nonsense", check=None).returncode == 2
    assert cli(check=None).returncode == 2
