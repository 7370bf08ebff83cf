"""Benchmark `longcat-lora merge` against its physical floors, all measured in one run.

Bases (`--base`, a comma list measured in one run): `longcat`, a LongCat DiT of full width (hidden 4096,
ffn 11008) with N blocks (default 12), bf16, sharded at about 2 GB like the official checkpoints;
`wanvideo`, the same model as one file in ComfyUI-WanVideoWrapper's layout (split q/k/v, bf16);
`wanvideo-fp8`, that file fp8 "scaled" (the block attention / FFN weights float8_e4m3fn with one scale
each, as an fp8_e4m3fn_scaled repack writes them: the merge requantizes them). LoRA: a full-width
rank-128 refinement-layout native LoRA for those blocks (every module type, bf16, alpha_scale 0.5).
Everything is generated in child processes (this process never imports torch, so the children's peak
RSS is their own).

Printed, from one run (medians of interleaved repeats, each command after a `sync` and including the
`sync` of its own output), per base and device:
- interpreter + `import torch, longcat_lora.apply.merge` (a fixed cost of every merge);
- `cp -r` of the base (the disk floor);
- GEMM-only: the same weight-change products on the same device with no I/O (the arithmetic floor);
- the merge, and its ratio to max(cp -r, GEMM-only) with and without the fixed start-up cost;
- the merge's peak RSS against largest shard + 300 MiB;
- for the fp8 base, the merge's summary line: the worst requantization error.

Usage: python benchmarks/merge.py [--blocks 12] [--base longcat,wanvideo,wanvideo-fp8] [--device cpu|cuda|cpu,cuda]
       [--pairs 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _util import interleaved, median, run, settle  # noqa: E402

GEN = """
import torch
from dataclasses import replace
from longcat_lora.testing.dit import DiTConfig
from longcat_lora.testing.fixtures import write_base_checkpoint, write_native_lora, write_wanvideo_checkpoint
c = replace(DiTConfig(), depth={blocks})
kind = {kind!r}
if kind == "longcat":
    write_base_checkpoint({base!r}, c, "longcat", shards={shards}, dtype=torch.bfloat16)
elif kind == "wanvideo":
    write_wanvideo_checkpoint({base!r}, c)
else:
    write_wanvideo_checkpoint({base!r}, c, fp8="e4m3fn", scale="tensor")
if {lora_too!r}:
    write_native_lora({lora!r}, "refinement", dims=c.dims, rank=128, dtype=torch.bfloat16)
"""

# The merge's arithmetic with no I/O: every LoRA part's addmm_ into an fp32 weight of the base's shape
# (buffers allocated and factors loaded before the clock starts). Prints seconds.
GEMM = """
import time, torch
from longcat_lora.formats import load_lora
from longcat_lora.apply.base_checkpoint import open_base
from longcat_lora.apply.targets import find_targets
dev = {device!r}
b = open_base({base!r})
with load_lora({lora!r}) as a:
    def shape(layer):
        s = b.shape(layer + ".weight")
        return s if s is not None and len(s) == 2 else None
    targets, _ = find_targets(a, shape)
    work = [(tuple(b.shape(t.layer + ".weight")),
             [(p.rows, p.up.load().to(dev, torch.float32), p.down.load().to(dev, torch.float32), p.scale)
              for p in t.parts()]) for t in targets]
bufs = {{s: torch.zeros(s, device=dev) for s, _ in work}}
def sync():
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
for s, parts in work[:2]:  # warm up the BLAS / kernels
    for (r0, r1), up, down, alpha in parts:
        bufs[s][r0:r1].addmm_(up, down, alpha=alpha)
sync()
t0 = time.perf_counter()
for s, parts in work:
    for (r0, r1), up, down, alpha in parts:
        bufs[s][r0:r1].addmm_(up, down, alpha=alpha)
sync()
print(time.perf_counter() - t0)
"""


BASES = ("longcat", "wanvideo", "wanvideo-fp8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=12, help="full-width DiT blocks in the base (default 12)")
    ap.add_argument("--base", default="longcat", help=f"a comma list of {', '.join(BASES)} (default longcat)")
    ap.add_argument("--device", default="cpu",
                    help="cpu, cuda, or a comma list (cpu,cuda): each is measured on the same inputs in one run")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    devices = args.device.split(",")
    bases = args.base.split(",")
    if not set(devices) <= {"cpu", "cuda"}:
        ap.error("--device: cpu, cuda or cpu,cuda")
    if not set(bases) <= set(BASES):
        ap.error(f"--base: a comma list of {', '.join(BASES)}")
    tmp = tempfile.mkdtemp(dir=args.dir, prefix="lcl-merge-")
    py = sys.executable
    try:
        lora = os.path.join(tmp, "lora.safetensors")
        import_cmd = [py, "-c", "import torch, longcat_lora.apply.merge"]
        t_imp = None
        for kind in bases:
            single = kind != "longcat"
            base = os.path.join(tmp, "base.safetensors" if single else "base")
            shards = max(1, round(args.blocks * 0.566 / 2))  # about 2 GB a shard (0.566 GB a block in bf16)
            subprocess.run([py, "-c", GEN.format(base=base, lora=lora, blocks=args.blocks, shards=shards, kind=kind,
                                                 lora_too=not os.path.exists(lora))], check=True)
            os.sync()
            files = [base] if single else [os.path.join(base, f) for f in os.listdir(base) if f.endswith(".safetensors")]
            sizes = [os.path.getsize(f) for f in files]
            cp_out = os.path.join(tmp, "cp")
            m_out = os.path.join(tmp, "merged.safetensors" if single else "merged")
            largest = max(sizes) / 2**20
            print(f"base {kind}: {sum(sizes) / 1e9:.2f} GB ({args.blocks} full-width blocks) in {len(sizes)} file(s) "
                  f"(largest {largest:.0f} MiB); LoRA {os.path.getsize(lora) / 1e6:.0f} MB rank 128", flush=True)

            def clean() -> None:
                for p in (cp_out, m_out):
                    if os.path.isdir(p):
                        shutil.rmtree(p, ignore_errors=True)
                    elif os.path.exists(p):
                        os.remove(p)
                settle([base, lora], (["cp", "--version"], import_cmd))

            if t_imp is None:
                t_imp = [run(import_cmd)[0] for _ in range(3)]
            for device in devices:
                merge_cmd = [py, "-m", "longcat_lora", "merge", base, m_out, "--lora", lora, "--device", device]
                gemm = []
                for _ in range(args.pairs):
                    out = subprocess.run([py, "-c", GEMM.format(device=device, base=base, lora=lora)], check=True,
                                         capture_output=True, text=True).stdout
                    gemm.append(float(out.strip().splitlines()[-1]))
                t_cp, t_m, rss = interleaved(["sh", "-c", f"cp -r '{base}' '{cp_out}' && sync"],
                                             ["sh", "-c", " ".join(f"'{x}'" for x in merge_cmd) + " && sync"],
                                             args.pairs, before=clean)
                imp, cp, g, m = median(t_imp), median(t_cp), median(gemm), median(t_m)
                floor = max(cp, g)
                print(f"  device {device}")
                print("    runs: cp -r", [round(x, 2) for x in t_cp], " merge", [round(x, 2) for x in t_m],
                      " GEMM-only", [round(x, 2) for x in gemm], " import", [round(x, 2) for x in t_imp])
                print(f"    interpreter+import {imp:.2f}s  cp -r {cp:.2f}s  GEMM-only {g:.2f}s  merge {m:.2f}s "
                      f"(without start-up {m - imp:.2f}s)")
                print(f"    merge / max(cp -r, GEMM-only) = {m / floor:.2f}x  (without start-up {(m - imp) / floor:.2f}x; "
                      f"target <= 1.3x)   peak RSS {rss} MiB (largest input file + 300 = {largest + 300:.0f} MiB)",
                      flush=True)
                if kind == "wanvideo-fp8":
                    clean()
                    line = subprocess.run(merge_cmd, check=True, capture_output=True, text=True).stdout.strip()
                    print(f"    {line}", flush=True)
            clean()
            for p in (base, cp_out, m_out):
                if os.path.isdir(p):
                    shutil.rmtree(p, ignore_errors=True)
                elif os.path.exists(p):
                    os.remove(p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
