"""Benchmark `longcat-lora convert` against `cp` of a file as big as its output, on full-size files.

For each layout (bf16 native LoRAs: cfg_step 1.26 GB, refinement 1.60 GB, generated in a child process)
and each target format, runs interleaved rounds of `cp REF` (REF: one file holding as many bytes as the
conversion writes, the disk floor) and `convert`. Every command starts with no dirty pages and its input in
the page cache, and its time includes the fsync of its own output: durable output on both sides (without
it, one command would pay for the other's writeback). Every run is printed, then the ratio of each round
(the two commands of a round share the machine's state) and their median, and the converter's worst peak
RSS. `--allow-nonfinite` adds a third command per round without the NaN/Inf scan, to show what it costs.

Usage: python benchmarks/convert.py [--rounds 3] [--layouts cfg_step refinement] [--to fastvideo peft ...]
                                    [--allow-nonfinite] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _util import median, run, settle  # noqa: E402

LAYOUTS = ("cfg_step", "refinement")
FORMATS = ("fastvideo", "longcat", "peft", "diffusers", "kohya")
RATIO_TARGET = 1.5
RSS_TARGET = 300  # MiB


def generate(path: str, layout: str) -> None:
    """Write the input in a child process, so this (measuring) process never imports torch: a child
    forked from a large parent would report the parent's resident memory as its own peak."""
    code = f"from longcat_lora.testing.fixtures import write_native_lora; write_native_lora({path!r}, {layout!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    os.sync()


def files(path: str) -> list[str]:
    """A file, or every file under a directory (a PEFT output)."""
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


def fsync_all(path: str) -> None:
    """Make an output durable: each file's data, then the directory entries that name them."""
    for p in files(path) + [os.path.dirname(os.path.abspath(path))] + ([path] if os.path.isdir(path) else []):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def timed(cmd: list[str], out: str) -> tuple[float, int]:
    """(seconds including the fsync of `out`, peak RSS in MiB) of one command."""
    t0 = time.perf_counter()
    _, rss = run(cmd)
    fsync_all(out)
    return time.perf_counter() - t0, rss


def make_ref(out: str, ref: str) -> int:
    """REF: one regular file as big as the output (its bytes, concatenated; real data, no holes)."""
    with open(ref, "wb") as w:
        for p in files(out):
            with open(p, "rb") as f:
                shutil.copyfileobj(f, w, 1 << 24)
    return os.path.getsize(ref)


def bench(src: str, to: str, tmp: str, rounds: int, allow: bool) -> None:
    exe = [sys.executable, "-m", "longcat_lora"]
    out, ref, cp_out = (os.path.join(tmp, n) for n in ("conv.out", "ref.bin", "cp.out"))
    convert = exe + ["convert", src, out, "--to", to]
    cmds = {"cp": (["cp", ref, cp_out], cp_out), "convert": (convert, out)}
    if allow:
        cmds["no-scan"] = (convert + ["--allow-nonfinite"], out)
    subprocess.run(convert, check=True, stdout=subprocess.DEVNULL)  # untimed: learn the output's size
    size = make_ref(out, ref)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    rss = 0
    for _ in range(rounds):
        for name, (cmd, dst) in cmds.items():
            remove(out)
            remove(cp_out)
            settle([src, ref], (["cp", "--version"], exe + ["--version"]))  # the same state every time
            t, r = timed(cmd, dst)
            times[name].append(t)
            if name != "cp":
                rss = max(rss, r)
    remove(out)
    remove(cp_out)
    remove(ref)
    ratios = [c / p for c, p in zip(times["convert"], times["cp"])]
    print(f"{os.path.basename(src).split('.')[0]} -> {to}: in {os.path.getsize(src) / 1e9:.2f} GB, "
          f"out {size / 1e9:.2f} GB", flush=True)
    for name, ts in times.items():
        print(f"  {name:8s} " + " ".join(f"{t:.2f}" for t in ts) + " s")
    print("  ratio    " + " ".join(f"{x:.2f}" for x in ratios) + f"  median {median(ratios):.2f}x "
          f"(target <= {RATIO_TARGET}x)  peak RSS {rss} MiB (target <= {RSS_TARGET})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--to", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--allow-nonfinite", action="store_true", help="also time convert --allow-nonfinite")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(dir=args.dir, prefix="lcl-bench-")
    try:
        for layout in args.layouts:
            src = os.path.join(tmp, f"{layout}.safetensors")
            generate(src, layout)
            for to in args.to:
                bench(src, to, tmp, args.rounds, args.allow_nonfinite)
            os.remove(src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
