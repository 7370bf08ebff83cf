"""Benchmark `longcat-lora extract`: wall time and peak RSS, and how well it recovers a known change.

Base: a LongCat DiT of full width (hidden 4096, ffn 11008) with 4 blocks, bf16, 2 shards (about 2.3 GB).
Tuned: the base plus a known rank-64 change on every up block of every LoRA-targetable Linear (rms 0.01,
half the weights' 0.02), plus Gaussian noise (rms 1e-5), stored in bf16 (whose rounding is more noise,
rms about 2.3e-5). Both are generated in child processes, streamed (this process never imports torch,
so the children's peak RSS is their own). Printed beside extract: `cp -r` of TUNED (same run), and the
recovered change's relative Frobenius error against the known rank-64 change, computed in a child that
reads the output with the safetensors library and regenerates the change from its seeds (target 1e-3).
Usage: python benchmarks/extract.py [--dir DIR | --keep DIR] [--rank 64] [--device cpu]
(--keep DIR: generate the checkpoints into DIR once and reuse them on later runs.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _util import run, settle  # noqa: E402

COMMON = """
import zlib, torch
from longcat_lora.model import naming
RANK, RMS, NOISE = {rank}, 0.01, 1e-5

def known(module, i, h, w):
    # the planted rank-RANK change of up block i of a module: A @ B with rms RMS (float32)
    g = torch.Generator().manual_seed(zlib.crc32(f"{{module}}/{{i}}".encode()))
    s = (RMS / RANK ** 0.5) ** 0.5
    return (torch.randn(h, RANK, generator=g) * s) @ (torch.randn(RANK, w, generator=g) * s)

def blocks(name):
    # (module, up blocks) for a LoRA-targetable weight name, else None
    module, leaf = naming.split_param(name)
    found = naming.kind_of(module)
    return (module, found[0].chunks) if found and leaf == "weight" else None
"""

GEN = COMMON + """
import json, os, shutil
from dataclasses import replace
from longcat_lora.testing.dit import DiTConfig
from longcat_lora.testing.fixtures import write_base_checkpoint
from longcat_lora.io.reader import SafeFile
from longcat_lora.io.writer import Entry, write_safetensors
c = replace(DiTConfig(), depth=4)
base, tuned = {base!r}, {tuned!r}
write_base_checkpoint(base, c, "longcat", shards=2, dtype=torch.bfloat16)
os.makedirs(tuned)

def changed(sf, name, module, n):
    w = sf.read(name).float()
    h = w.shape[0] // n
    for i in range(n):
        w[i * h:(i + 1) * h] += known(module, i, h, w.shape[1])
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ 1)
    w += torch.randn(w.shape, generator=g) * NOISE
    return w.to(torch.bfloat16).reshape(-1).view(torch.uint8).numpy()

for f in os.listdir(base):
    src, dst = os.path.join(base, f), os.path.join(tuned, f)
    if not f.endswith(".safetensors"):
        shutil.copy(src, dst)
        continue
    sf = SafeFile(src)
    entries = []
    for name in sorted(sf.keys(), key=lambda k: sf.info(k).start):
        info, b = sf.info(name), blocks(name)
        if b is None:
            entries.append(Entry(name, info.dtype, info.shape, lambda sf=sf, name=name: sf.read_raw(name)))
        else:
            entries.append(Entry(name, info.dtype, info.shape, lambda sf=sf, name=name, b=b: changed(sf, name, *b)))
    write_safetensors(dst, entries, sf.metadata or None)
    sf.close()
"""

CHECK = COMMON + """
import math
from safetensors import safe_open
SEP = "___lorahyphen___"
err2 = ref2 = 0.0
worst = (0.0, None)
with safe_open({out!r}, "pt") as f:
    keys = set(f.keys())
    mods = sorted({{k.removeprefix("lora" + SEP).partition(".")[0].replace(SEP, ".") for k in keys}})
    for module in mods:
        enc = "lora" + SEP + module.replace(".", SEP)
        down = f.get_tensor(enc + ".lora_down.weight").double()
        scale = float(f.get_tensor(enc + ".alpha_scale").double())
        n = sum(k.startswith(enc + ".lora_up.blocks.") for k in keys)
        ups = ([f.get_tensor(enc + ".lora_up.weight")] if n == 0 else
               [f.get_tensor(f"{{enc}}.lora_up.blocks.{{i}}.weight") for i in range(n)])
        r = down.shape[0] // len(ups)
        e2 = k2 = 0.0
        for i, up in enumerate(ups):
            got = scale * (up.double() @ down[i * r:(i + 1) * r])
            want = known(module, i, up.shape[0], down.shape[1]).double()
            e2 += float(((got - want) ** 2).sum())
            k2 += float((want ** 2).sum())
        err2, ref2 = err2 + e2, ref2 + k2
        worst = max(worst, (math.sqrt(e2 / k2), module))
print(f"{{len(mods)}} modules; recovered change vs the known rank-{{RANK}} change: relative error "
      f"{{math.sqrt(err2 / ref2):.2e}} overall, worst {{worst[0]:.2e}} ({{worst[1]}}) (target <= 1e-3)")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", default=None, help="generate into (and reuse) this directory")
    args = ap.parse_args()
    keep = args.keep is not None
    if keep:
        os.makedirs(args.keep, exist_ok=True)
    tmp = args.keep if keep else tempfile.mkdtemp(dir=args.dir, prefix="lcl-extract-")
    try:
        base, tuned = os.path.join(tmp, "base"), os.path.join(tmp, f"tuned-r{args.rank}")
        out = os.path.join(tmp, "out.safetensors")
        fmt = dict(rank=args.rank)
        if os.path.exists(out):
            os.remove(out)
        if not (keep and os.path.isdir(tuned)):
            for p in (base, tuned):
                shutil.rmtree(p, ignore_errors=True)
            subprocess.run([sys.executable, "-c", GEN.format(base=base, tuned=tuned, **fmt)], check=True)
        size = sum(os.path.getsize(os.path.join(tuned, f)) for f in os.listdir(tuned))
        warm = (["cp", "--version"], [sys.executable, "-c", "import torch, longcat_lora.algebra.extract"])
        settle([base, tuned], warm)
        t_cp, _ = run(["cp", "-r", tuned, os.path.join(tmp, "cp")])
        shutil.rmtree(os.path.join(tmp, "cp"))
        settle([base, tuned])
        t_x, rss = run([sys.executable, "-m", "longcat_lora", "extract", base, tuned, out, "--rank", str(args.rank),
                        "--device", args.device])
        print(f"base and tuned: {size / 1e9:.2f} GB each (4 blocks, full width, bf16); output "
              f"{os.path.getsize(out) / 1e6:.0f} MB at rank {args.rank}")
        print(f"cp -r tuned {t_cp:.2f}s  extract {t_x:.2f}s  ratio {t_x / t_cp:.1f}x  peak RSS {rss} MiB "
              f"(largest weight, ffn.w1 in fp32: {11008 * 4096 * 4 / 2**20:.0f} MiB)")
        subprocess.run([sys.executable, "-c", CHECK.format(out=out, **fmt)], check=True)
    finally:
        if keep:  # the checkpoints stay; the outputs go
            shutil.rmtree(os.path.join(tmp, "cp"), ignore_errors=True)
            if os.path.exists(os.path.join(tmp, "out.safetensors")):
                os.remove(os.path.join(tmp, "out.safetensors"))
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
