"""Benchmark `longcat-lora convert --to fastvideo` against `cp` of the same input, on full-size files.

Generates bf16 cfg_step (1.26 GB) and refinement (1.60 GB) native LoRAs in a temp dir, then times
interleaved pairs (cp, convert) and reports the median ratio and the converter's peak RSS.
Usage: python benchmarks/convert.py [--pairs 5] [--dir DIR]
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


TARGETS = {"cfg_step": 1.5, "refinement": 3.0}
RSS_TARGET = 300


def generate(path: str, layout: str) -> None:
    """Write the input in a child process, so this (measuring) process never imports torch: a child
    forked from a large parent would report the parent's resident memory as its own peak."""
    code = f"from longcat_lora.testing.fixtures import write_native_lora; write_native_lora({path!r}, {layout!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    os.sync()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--layouts", nargs="+", default=list(TARGETS))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(dir=args.dir, prefix="lcl-bench-")
    exe = [sys.executable, "-m", "longcat_lora"]
    try:
        for layout in args.layouts:
            src = os.path.join(tmp, f"{layout}.safetensors")
            generate(src, layout)
            cp_out, conv_out = os.path.join(tmp, "cp.out"), os.path.join(tmp, "conv.out")

            def clean() -> None:
                for p in (cp_out, conv_out):
                    if os.path.exists(p):
                        os.remove(p)
                settle([src], (["cp", "--version"], exe + ["--version"]))  # the same state every time

            t_cp, t_conv, rss = interleaved(["cp", src, cp_out],
                                            exe + ["convert", src, conv_out, "--to", "fastvideo"],
                                            args.pairs, before=clean)
            out_size = os.path.getsize(conv_out)
            ratio = median(t_conv) / median(t_cp)
            print("  runs: cp", [round(x, 2) for x in t_cp], "convert", [round(x, 2) for x in t_conv])
            print(f"{layout:10s} in {os.path.getsize(src) / 1e9:.2f} GB  out {out_size / 1e9:.2f} GB  "
                  f"cp {median(t_cp):.2f}s  convert {median(t_conv):.2f}s  ratio {ratio:.2f}x "
                  f"(target <= {TARGETS[layout]}x)  peak RSS {rss} MiB (target <= {RSS_TARGET})", flush=True)
            clean()
            os.remove(src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
