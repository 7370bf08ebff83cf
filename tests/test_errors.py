"""Messages that name an option: the library names its parameter (`skip_unmapped=True`), the CLI the flag
(`--skip-unmapped`), from the same structured error; the text around it (a user's path) is never changed."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from longcat_lora import LoraError, convert
from longcat_lora.algebra.resize import resize_lora
from longcat_lora.commands import cli
from longcat_lora.errors import NAME_ONLY, Param, UnmappedModulesError

SEP = "___lorahyphen___"
QKV = f"lora{SEP}blocks{SEP}0{SEP}attn{SEP}qkv"
AUDIO = f"lora{SEP}blocks{SEP}0{SEP}audio_attn{SEP}qkv"
SRC = Path(__file__).resolve().parents[1] / "src" / "longcat_lora"


def _lora(path: Path, *, nan: bool = False, audio: bool = False, up_scale: float = 1.0) -> str:
    g = torch.Generator().manual_seed(0)
    sd = {f"{QKV}.lora_down.weight": torch.randn(6, 8, generator=g),
          **{f"{QKV}.lora_up.blocks.{i}.weight": torch.randn(4, 2, generator=g) * up_scale for i in range(3)},
          f"{QKV}.alpha_scale": torch.tensor(0.5)}
    if nan:
        sd[f"{QKV}.lora_up.blocks.2.weight"][1, 1] = float("nan")
    if audio:
        sd |= {f"{AUDIO}.lora_down.weight": torch.randn(2, 8, generator=g),
               f"{AUDIO}.lora_up.weight": torch.randn(4, 2, generator=g), f"{AUDIO}.alpha_scale": torch.tensor(1.0)}
    save_file(sd, str(path))
    return str(path)


def _api(call) -> LoraError:
    with pytest.raises(LoraError) as e:
        call()
    return e.value


def _cli(argv: list[str], capsys) -> str:
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


def _case(tmp_path: Path, name: str):
    """(library call, the same request as CLI arguments, what the library says, what the CLI says)."""
    out = tmp_path / "out.safetensors"
    if name == "allow_nonfinite":
        src = _lora(tmp_path / "nan.safetensors", nan=True)
        return (lambda: convert(src, str(out), "fastvideo"), ["convert", src, out, "--to", "fastvideo"],
                "(pass allow_nonfinite=True to convert anyway)", "(pass --allow-nonfinite to convert anyway)")
    src = _lora(tmp_path / "in.safetensors", audio=name == "skip_unmapped")
    if name == "skip_unmapped":
        return (lambda: convert(src, str(out), "fastvideo"), ["convert", src, out, "--to", "fastvideo"],
                "(pass skip_unmapped=True to leave them out): blocks.0.audio_attn.qkv",
                "(pass --skip-unmapped to leave them out): blocks.0.audio_attn.qkv")
    if name == "exists":
        out.write_bytes(b"precious")
        return (lambda: convert(src, str(out), "fastvideo"), ["convert", src, out, "--to", "fastvideo"],
                f"{out}: already exists (pass overwrite=True to replace it)",
                f"{out}: already exists (pass --overwrite to replace it)")
    if name == "symlink":
        os.symlink(tmp_path / "elsewhere.safetensors", out)
        return (lambda: convert(src, str(out), "fastvideo", overwrite=True),
                ["convert", src, out, "--to", "fastvideo", "--overwrite"],
                f"{out}: is a symbolic link; overwrite=True never replaces a link",
                f"{out}: is a symbolic link; --overwrite never replaces a link")
    if name == "not_earlier_output":
        d = tmp_path / "peft"
        d.mkdir()
        (d / "notes.txt").write_text("mine")
        return (lambda: convert(src, str(d), "peft", overwrite=True), ["convert", src, d, "--to", "peft", "--overwrite"],
                "refusing to replace it (overwrite=True replaces only an earlier output of this command)",
                "refusing to replace it (--overwrite replaces only an earlier output of this command)")
    if name == "not_regular":
        out.mkdir()
        return (lambda: convert(src, str(out), "fastvideo", overwrite=True),
                ["convert", src, out, "--to", "fastvideo", "--overwrite"],
                f"{out}: exists and is a directory; overwrite=True replaces only a regular file",
                f"{out}: exists and is a directory; --overwrite replaces only a regular file")
    if name in ("rank", "energy", "max_error"):
        value, want = {"rank": (0, "an integer >= 1"), "energy": (1.5, "in (0, 1]"), "max_error": (1.0, "in [0, 1)")}[name]
        flag = "--" + name.replace("_", "-")
        return (lambda: resize_lora(src, str(out), **{name: value}), ["resize", src, out, flag, value],
                f"{name} must be {want}, got {value!r}",
                f"error: {flag} must be {want}, got {value!r}")
    assert name == "dtype"
    huge = _lora(tmp_path / "huge.safetensors", up_scale=1e12)
    return (lambda: resize_lora(huge, str(out), rank=1, dtype="fp16"), ["resize", huge, out, "--rank", 1, "--dtype", "fp16"],
            "the new factors overflow F16 (choose a wider dtype)", "the new factors overflow F16 (choose a wider --dtype)")


CASES = ["allow_nonfinite", "skip_unmapped", "exists", "symlink", "not_earlier_output", "not_regular", "dtype", "rank",
         "energy", "max_error"]


@pytest.mark.parametrize("name", CASES)
def test_library_names_the_parameter_and_the_cli_the_flag(name, tmp_path, capsys):
    call, argv, lib, flag = _case(tmp_path, name)
    e = _api(call)
    assert lib in str(e) and " --" not in str(e) and "(--" not in str(e)
    assert any(isinstance(p, Param) for p in e.parts)
    err = _cli(argv, capsys)
    assert flag in err and (lib not in err or lib in flag)  # (`rank must` lies inside `--rank must`)
    assert err.startswith("longcat-lora: error: ")


def test_unmapped_error_keeps_its_modules_and_content_errors_name_the_input(tmp_path):
    src = _lora(tmp_path / "in.safetensors", audio=True)
    e = _api(lambda: convert(src, str(tmp_path / "o.safetensors"), "fastvideo"))
    assert isinstance(e, UnmappedModulesError) and e.modules == ["blocks.0.audio_attn.qkv"]
    nan = _lora(tmp_path / "nan.safetensors", nan=True)
    e = _api(lambda: convert(nan, str(tmp_path / "o2.safetensors"), "longcat"))
    assert str(e) == (f"{nan}: module blocks.0.attn.qkv: non-finite values (NaN/Inf) in its LoRA weights "
                      "(pass allow_nonfinite=True to convert anyway)")


def test_a_path_that_looks_like_a_parameter_or_a_flag_is_shown_unchanged(tmp_path, capsys):
    src = _lora(tmp_path / "in.safetensors")
    out = tmp_path / "pass overwrite=True skip_unmapped=True --dtype.safetensors"
    out.write_bytes(b"precious")
    err = _cli(["convert", src, out, "--to", "longcat"], capsys)
    assert err == f"longcat-lora: error: {out}: already exists (pass --overwrite to replace it)\n"
    assert str(_api(lambda: convert(src, str(out), "longcat"))) == \
        f"{out}: already exists (pass overwrite=True to replace it)"


def test_param_spellings():
    e = LoraError("a ", Param("overwrite"), " b ", Param("dtype", NAME_ONLY), " c ", Param("dtype", "fp32"),
                  " d ", Param("strength", 0.5))
    assert str(e) == "a overwrite=True b dtype c dtype='fp32' d strength=0.5"
    assert e.render(cli.spell) == "a --overwrite b --dtype c --dtype fp32 d strength=0.5"
    assert str(e.prefixed("x.safetensors")) == "x.safetensors: " + str(e)
    assert e.prefixed("x.safetensors").render(cli.spell).endswith("--dtype fp32 d strength=0.5")
    assert str(LoraError("x.safetensors: y").prefixed("x.safetensors")) == "x.safetensors: y"
    u = UnmappedModulesError(("2 have no name (pass ", Param("skip_unmapped"), ")"), ["b", "a"]).prefixed("x")
    assert type(u) is UnmappedModulesError and u.modules == ["b", "a"]
    assert str(u) == "x: 2 have no name (pass skip_unmapped=True): b, a"


def test_every_parameter_a_message_names_has_a_real_flag():
    """The CLI's table covers every `Param("...")` in the library, and each flag exists on some command
    for that very parameter (argparse's dest)."""
    named = {n for p in SRC.rglob("*.py") for n in re.findall(r'Param\("(\w+)"', p.read_text())}
    assert {"allow_nonfinite", "skip_unmapped", "overwrite", "dtype", "rank", "energy", "max_error"} <= named
    assert named <= set(cli.FLAGS), named - set(cli.FLAGS)
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices.values()
    dests = {(a.dest, s) for p in subs for a in p._actions for s in a.option_strings}
    for name, flag in cli.FLAGS.items():
        assert (name, flag) in dests, (name, flag)
