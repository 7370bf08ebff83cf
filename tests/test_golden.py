"""Golden outputs: the exact bytes every conversion and merge writes, recorded as SHA-256.

The inputs are generated deterministically (seeded fixtures); each is converted to every format and
merged into a small sharded base in both namings. The conversion digests were recorded before the code
was restructured (issue 9); the merge digests when merges became correctly rounded (issue 21: before,
they depended on the CPU's BLAS kernels, and an AMD machine wrote other bytes than the Intel one that
recorded them). None may change, on any machine: a change that alters one output byte fails here.
Regenerate only for a deliberate change of output, and say why in the commit:

    PYTHONPATH=src python tests/test_golden.py > /tmp/golden.txt   # prints the table below
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile

import pytest
import torch

import longcat_lora as L
from longcat_lora.testing.dit import TINY
from longcat_lora.testing.fixtures import write_base_checkpoint, write_native_lora

FORMATS = ("longcat", "fastvideo", "peft", "diffusers", "kohya", "wanvideo")
# (layout, dtype, rank, alpha_scale): both layouts, bf16 and fp32, integral and non-integral alpha
INPUTS = {
    "cfg_bf16": ("cfg_step", torch.bfloat16, 4, 0.5),
    "cfg_f32_a03": ("cfg_step", torch.float32, 6, 0.3),
    "ref_bf16_a03": ("refinement", torch.bfloat16, 6, 0.3),
    "ref_f32": ("refinement", torch.float32, 4, 0.5),
}
MERGES = {  # name -> (base naming, base dtype, LoRAs with strengths, --dtype)
    "merge_lc_keep": ("longcat", torch.float32, (("ref_f32", 0.8), ("cfg_bf16", -0.5)), "keep"),
    "merge_lc_bf16": ("longcat", torch.float32, (("ref_bf16_a03", 1.0),), "bf16"),
    "merge_fv_keep": ("fastvideo", torch.bfloat16, (("cfg_f32_a03", 0.7), ("ref_f32.peft", 1.0)), "keep"),
}


def _digest(path: str) -> str:
    """SHA-256 of a file, or of a directory's files (names and contents, sorted, recursively)."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for f in sorted(files):
                p = os.path.join(root, f)
                h.update(os.path.relpath(p, path).encode() + b"\0")
                h.update(_digest(p).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def produce(work: str) -> dict[str, str]:
    """Write every golden input and output under `work`; name -> SHA-256."""
    out: dict[str, str] = {}
    paths: dict[str, str] = {}
    for name, (layout, dtype, rank, scale) in INPUTS.items():
        src = write_native_lora(os.path.join(work, f"{name}.safetensors"), layout, dims=TINY.dims, rank=rank,
                                dtype=dtype, alpha_scale=scale, seed=len(name))
        paths[name] = src
        out[name] = _digest(src)
        for fmt in FORMATS:
            dst = os.path.join(work, f"{name}.{fmt}" + ("" if fmt == "peft" else ".safetensors"))
            L.convert(src, dst, fmt)
            paths[f"{name}.{fmt}"] = dst
            out[f"{name}.{fmt}"] = _digest(dst)
    bases = {}
    for naming_, dtype in {(m[0], m[1]) for m in MERGES.values()}:
        b = os.path.join(work, f"base_{naming_}_{str(dtype).split('.')[-1]}")
        bases[naming_, dtype] = write_base_checkpoint(b, TINY, naming_, shards=2, dtype=dtype, seed=3)
        out[os.path.basename(b)] = _digest(b)
    for name, (naming_, dtype, loras, out_dtype) in MERGES.items():
        dst = os.path.join(work, name)
        L.merge_checkpoint(bases[naming_, dtype], dst, [(paths[p], s) for p, s in loras], dtype=out_dtype)
        out[name] = _digest(dst)
    return out


GOLDEN = {
    # conversions recorded before the restructuring of issue 9 (the kohya rows under their old name, comfyui:
    # issue 18 gave that name to the wanvideo form, whose rows were recorded then); merges at issue 21
    'base_fastvideo_bfloat16': 'd4eeb7cf0b5882046d1594885c69f664cc10db85fa6307ee80b046944720eed2',
    'base_longcat_float32': 'e0f375ce350377c78aac05518f3d5b8daced8fd384cfe1b613db20e0f9e0b37d',
    'cfg_bf16': 'b3728941b6296f81133a103f4cdf7c729c107c50bd541fe2818c6f61a2367b24',
    'cfg_bf16.diffusers': '66438656cd0c68e7f032c9ac971df8f3188b5b2f6f499b8c59bf7c851387f4c7',
    'cfg_bf16.fastvideo': 'e80d7fdaf1407940c587176d91a9cf9f0af66be2cede9842761c5195be7e0b07',
    'cfg_bf16.kohya': 'e7e3231c2a9eff261f6a535fd52a0303617aa74a47c53c5d91ea0a98be8999a7',
    'cfg_bf16.longcat': '05b5fdf7c1c8844b39e957d7dfcd00a1be6ccec4ebacd6e27322ffc130364145',
    'cfg_bf16.peft': '1cd4782a865318862c0b3770dbaba749b537c190937b9d3ab8c0e0b2d839444c',
    'cfg_bf16.wanvideo': '3f155594f5e2f4c5a1b13b051cd7612359135976e4cd9e41d9b4606d2ffd2d7e',
    'cfg_f32_a03': 'f2f5625faf78a71fd9a662b25fb66aa119990b0faafa738b335a5676c9f7cdb3',
    'cfg_f32_a03.diffusers': '034d031afd60b94d68e33a8f68772c52667f97c31a97f84897ad554523061a09',
    'cfg_f32_a03.fastvideo': '1eef75b5f4679a673895493a359a72c7360e01f4e0ad68e61c0c79a710410e94',
    'cfg_f32_a03.kohya': '560637797ba79d561856761f99887053095ecd60f028665010b553b3c3143ffe',
    'cfg_f32_a03.longcat': '0df5e721af72b7e052eefbbcddf74c31a255f0c156d5d0962101f5699e42bc65',
    'cfg_f32_a03.peft': 'ba47f5c3dde96f830fc150c9bea1de58f744e3622edc0a32d51d65ab14aa55fa',
    'cfg_f32_a03.wanvideo': 'a8f82fd72e3b78b6bb220215537f1de99233e9e6013f7de28a75abbd2960fbd6',
    'merge_fv_keep': 'bfb08d03d02078a5c3d3a9fe82958badc993b69c14c2cd2baddab112f5a5f759',
    'merge_lc_bf16': '5c08596b11ecc5a22c2f0e538eff3a09c827491299ce2a298782849d2aa22d15',
    'merge_lc_keep': 'ebb7f0ead7cbd41f06019ad60a47584beced4de7700ec39a04219c96afbb2969',
    'ref_bf16_a03': '33800cd5f0c5f03478d5e8388c74ed78edb360872d833add79f11829d16bf0ea',
    'ref_bf16_a03.diffusers': '424c6ecab91ffedd935337d1b86c07f2397b0e95da743bb5e2b91e97ada56136',
    'ref_bf16_a03.fastvideo': '5f5f78483e40dd3c465c534ad39d99ac405307f333d528e69abe2b4bac2ef408',
    'ref_bf16_a03.kohya': '79c742757380a11ae1865910930782ddb819ea81157c35d36799faa1e674109b',
    'ref_bf16_a03.longcat': 'e2b59b2b44d80f548c8b5fee608f678055989d5b77193f4a78cb36e36b29a2ae',
    'ref_bf16_a03.peft': '067c1e1c1fd9a5ac0e17aa3f63e577169ac93847e880c6d062eb6aaa89e91dcf',
    'ref_bf16_a03.wanvideo': '4d7e490d03e13870d7554883999cdbb3670dd27cd81b6d814657cbb2f7524216',
    'ref_f32': '1dbf315eeccf1858b76fc21b8f58b84d3198a19ed42f9bb01ebd7ccfd2c212ac',
    'ref_f32.diffusers': 'f4e3b6f4608d1fa690b51929a2f1446bc14930e19b39a058d19fc1c78f948ef6',
    'ref_f32.fastvideo': 'e3a1fa02c68e9beaffccf37ab26628b54908e91878f5e650a54b1612e1c25fe5',
    'ref_f32.kohya': 'eb9743840389a01bcb633a9d2f686874e5694714174616f8e3efa304f38b3a6b',
    'ref_f32.longcat': 'd294a4f4832a1918674d19e120555392fd767cfc4f50e9edd4827136786e913d',
    'ref_f32.peft': '5f01eabb7cf26802ae2ba6ffe41bfe2bd11fe3ca1be6766ad32664f552adbb81',
    'ref_f32.wanvideo': '37ebbccaebb6108426564196e8a7a41deee961c0a0588ca04fbe5d624d610064',
}


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    return produce(str(tmp_path_factory.mktemp("golden")))


def test_golden_table_is_complete():
    names = {*INPUTS, *(f"{i}.{f}" for i in INPUTS for f in FORMATS), *MERGES}
    assert names <= GOLDEN.keys()


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_output_bytes_unchanged(produced, name):
    assert produced[name] == GOLDEN[name], f"{name}: output bytes changed"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        for k, v in sorted(produce(d).items()):
            print(f"    {k!r}: {v!r},")
    sys.exit(0)
