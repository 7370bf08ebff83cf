"""The real CLI end to end (subprocess): inspect, convert, verify, demo."""

import json
import os

import torch
from safetensors.torch import load_file, save_file

from conftest import cli


def test_inspect_json_refinement(native):
    src = native("refinement", rank=4, dtype=torch.bfloat16, alpha_scale=0.5)
    r = json.loads(cli("inspect", src, "--json").stdout)
    assert r["format"] == "longcat" and r["looks_like"] == "refinement-like"
    assert r["keys"] == 1543 and r["modules"] == 386
    assert r["file_size"] == os.path.getsize(src)
    assert r["ranks"] == {"4": 771} and r["alpha_scales"] == {"0.5": 771} and r["alphas"] == {"2.0": 771}
    assert r["dtypes"] == {"BF16": 1543}
    assert r["up_blocks"]["attn.qkv"] == {"3": 48} and r["up_blocks"]["adaLN_modulation.1"] == {"6": 48}
    assert r["up_blocks"]["final_layer.adaLN_modulation.1"] == {"2": 1}
    assert all(v == "0-47" for v in r["coverage"].values()) and len(r["coverage"]) == 8
    assert r["dims"]["hidden"] == 64 and r["dims"]["ffn"] == 176
    assert any("all covered" in f for f in r["findings"])
    assert any("every module's shape is consistent" in f for f in r["findings"])
    # 48*(8*4*64... ) parameter count from the file's 2-D tensors
    assert r["parameters"] == sum(v.numel() for v in load_file(src).values() if v.dim() == 2)


def test_inspect_text_cfg_step_and_findings(native, tmp_path):
    src = native("cfg_step", rank=4)
    out = cli("inspect", src).stdout
    assert "cfg_step-like" in out and "1,152" in out and "336" in out
    sd = load_file(src)
    drop = [k for k in sd if "___7___" in k and "ffn" in k]
    for k in drop:
        del sd[k]
    bad = "lora___lorahyphen___blocks___lorahyphen___3___lorahyphen___attn___lorahyphen___proj"
    sd[f"{bad}.lora_down.weight"] = torch.randn(4, 32)
    sd[f"{bad}.lora_up.weight"] = torch.randn(64, 4)
    sd["lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___audio___lorahyphen___q.lora_down.weight"] = torch.randn(4, 8)
    sd["lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___audio___lorahyphen___q.lora_up.weight"] = torch.randn(8, 4)
    path = str(tmp_path / "partial.safetensors")
    save_file(sd, path)
    r = json.loads(cli("inspect", path, "--json").stdout)
    f = " | ".join(r["findings"])
    assert "ffn.w1: blocks 7 not covered (covers 0-6, 8-47)" in f
    assert "1 modules have unexpected shapes: blocks.3.attn.proj [64, 32] (expected [64, 64])" in f
    assert "1 modules are not modules of LongCat-Video or LongCat-Video-Avatar in any naming known here" in f
    assert "blocks.0.audio.q" in f
    assert r["looks_like"] == "other"
    assert any("no alpha_scale" in n for n in r["notes"])


def test_inspect_official_sizes_are_recognised(tmp_path):
    p = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___ffn___lorahyphen___w2"
    save_file({f"{p}.lora_down.weight": torch.zeros(2, 11008, dtype=torch.bfloat16),
               f"{p}.lora_up.weight": torch.zeros(4096, 2, dtype=torch.bfloat16),
               f"{p}.alpha_scale": torch.tensor(0.5)}, str(tmp_path / "w2.safetensors"))
    r = json.loads(cli("inspect", tmp_path / "w2.safetensors", "--json").stdout)
    assert any("match the official LongCat-Video DiT" in f for f in r["findings"])
    assert any("blocks 1-47 not covered" in f for f in r["findings"])


def test_inspect_every_format_and_truncated_alpha_note(native, tmp_path):
    src = native("refinement", rank=4)
    for fmt in ("fastvideo", "peft", "diffusers", "kohya"):
        out = tmp_path / fmt
        cli("convert", src, out, "--to", fmt)
        r = json.loads(cli("inspect", out, "--json").stdout)
        assert r["format"] == fmt and r["modules"] == 386 and r["looks_like"] == "refinement-like"
        assert r["up_blocks"]["adaLN_modulation.1"] == {"6": 48}
    save_file({"blocks.0.ffn.w1.lora_A": torch.randn(6, 64), "blocks.0.ffn.w1.lora_B": torch.randn(176, 6),
               "blocks.0.ffn.w1.lora_alpha": torch.tensor(1.8)}, str(tmp_path / "t.safetensors"))
    r = json.loads(cli("inspect", tmp_path / "t.safetensors", "--json").stdout)
    assert any("truncates" in n and "1.8 -> 1" in n for n in r["notes"])


def test_convert_round_trip_cli_bit_exact(native, tmp_path):
    src = native("refinement", rank=4, dtype=torch.bfloat16)
    p = cli("convert", src, tmp_path / "fv.safetensors", "--to", "fastvideo")
    assert "wrote" in p.stdout
    cli("convert", tmp_path / "fv.safetensors", tmp_path / "back.safetensors", "--to", "longcat")
    a, b = load_file(src), load_file(str(tmp_path / "back.safetensors"))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    # the FastVideo file of a refinement LoRA: 48*(3+1+1+2+3+1) + 2 layers, 3 keys each
    assert len(load_file(str(tmp_path / "fv.safetensors"))) == 3 * (48 * 11 + 2)


def test_verify_exit_codes_and_worst_location(native, tmp_path):
    src = native("refinement", rank=4)
    cli("convert", src, tmp_path / "fv.safetensors", "--to", "fastvideo")
    p = cli("verify", src, tmp_path / "fv.safetensors")
    assert "equivalent" in p.stdout and "0.000e+00" in p.stdout
    sd = load_file(str(tmp_path / "fv.safetensors"))
    sd["blocks.17.cross_attn.to_v.lora_B"][3, 1] += 1e-3
    save_file(sd, str(tmp_path / "perturbed.safetensors"))
    p = cli("verify", src, tmp_path / "perturbed.safetensors", check=1)
    assert "NOT equivalent" in p.stdout and "blocks.17.cross_attn.kv_linear" in p.stdout
    cli("verify", src, tmp_path / "perturbed.safetensors", "--rtol", "0.5")
    # a module missing on one side is a mismatch
    del sd["blocks.3.ffn.w2.lora_A"], sd["blocks.3.ffn.w2.lora_B"], sd["blocks.3.ffn.w2.lora_alpha"]
    sd["blocks.17.cross_attn.to_v.lora_B"][3, 1] -= 1e-3
    save_file(sd, str(tmp_path / "missing.safetensors"))
    p = cli("verify", src, tmp_path / "missing.safetensors", check=1)
    assert "only in" in p.stdout and "blocks.3.ffn.w2" in p.stdout


def test_demo_runs():
    p = cli("demo")
    assert "OK" in p.stdout and "fastvideo -> longcat" in p.stdout
