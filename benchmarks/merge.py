"""Benchmark `longcat-lora merge` against `cp -r` of the same base, and its peak RSS.

Base: a LongCat DiT of full width (hidden 4096, ffn 11008) with 4 blocks, bf16, 2 shards (about 2.3 GB).
LoRA: a full-width rank-128 refinement-layout native LoRA for those 4 blocks (every module type).
Both are generated in child processes (this process never imports torch, so the children's peak RSS is
their own). Usage: python benchmarks/merge.py [--pairs 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _util import interleaved, median, settle  # noqa: E402

GEN = """
import torch
from dataclasses import replace
from longcat_lora.dit import DiTConfig
from longcat_lora.fixtures import write_base_checkpoint, write_native_lora
c = replace(DiTConfig(), depth=4)
write_base_checkpoint({base!r}, c, "longcat", shards=2, dtype=torch.bfloat16)
write_native_lora({lora!r}, "refinement", dims=c.dims, rank=128, dtype=torch.bfloat16)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(dir=args.dir, prefix="lcl-merge-")
    try:
        base, lora = os.path.join(tmp, "base"), os.path.join(tmp, "lora.safetensors")
        subprocess.run([sys.executable, "-c", GEN.format(base=base, lora=lora)], check=True)
        os.sync()
        shards = [os.path.getsize(os.path.join(base, f)) for f in os.listdir(base) if f.endswith(".safetensors")]
        cp_out, m_out = os.path.join(tmp, "cp"), os.path.join(tmp, "merged")

        def clean() -> None:
            for p in (cp_out, m_out):
                shutil.rmtree(p, ignore_errors=True)
            settle([base, lora], (["cp", "--version"],
                                  [sys.executable, "-c", "import torch, longcat_lora.merge"]))

        t_cp, t_m, rss = interleaved(["cp", "-r", base, cp_out],
                                     [sys.executable, "-m", "longcat_lora", "merge", base, m_out, "--lora", lora],
                                     args.pairs, before=clean)
        largest = max(shards) / 2**20
        print(f"base {sum(shards) / 1e9:.2f} GB in {len(shards)} shards (largest {largest:.0f} MiB), "
              f"LoRA {os.path.getsize(lora) / 1e6:.0f} MB")
        print(f"cp -r {median(t_cp):.2f}s  merge {median(t_m):.2f}s  ratio {median(t_m) / median(t_cp):.2f}x "
              f"(target <= 2x)  peak RSS {rss} MiB (target <= largest shard + 300 = {largest + 300:.0f} MiB)")
        clean()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
