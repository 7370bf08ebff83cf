"""A/B: the same commands from a git revision and from this working tree, interleaved, on the same inputs.

Issue 9 asked that a restructuring be no slower; this measures it. The revision is exported to a temp
directory (`git archive`) and run with `PYTHONPATH`; both sides use this venv's Python. Inputs: a full-size
cfg_step-layout native LoRA (1.26 GB bf16) converted to each format (sync-inclusive: the command's output is
fsynced inside its timing), and a merge of a refinement-layout LoRA into a `--blocks`-block full-width base.
Each round runs A then B, then B then A (order effects cancel); printed: every time, the per-round B/A ratio,
its median.

Usage: python benchmarks/ab.py --rev 397cd49 [--rounds 2] [--to fastvideo peft longcat] [--blocks 2] [--dir /tmp]
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
from _util import median, settle  # noqa: E402
from convert import fsync_all, generate, remove  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export(rev: str, into: str) -> str:
    """The package sources of `rev`, unpacked under `into`; returns the folder to put on PYTHONPATH."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return os.path.join(into, "src")


def timed(src: str, args: list[str], out: str) -> float:
    """Seconds of `longcat-lora ARGS` from sources `src`, including the fsync of `out`."""
    env = dict(os.environ, PYTHONPATH=src)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "longcat_lora", *args], env=env, check=True, stdout=subprocess.DEVNULL)
    fsync_all(out)
    return time.perf_counter() - t0


def write_inputs(d: str, blocks: int) -> tuple[str, str, str]:
    lora = os.path.join(d, "cfg_step.safetensors")
    generate(lora, "cfg_step")
    ref, base = os.path.join(d, "refinement.safetensors"), os.path.join(d, "base")
    code = ("import torch; from longcat_lora.testing.dit import DiTConfig;"
            "from longcat_lora.testing.fixtures import write_base_checkpoint, write_native_lora;"
            f"c = DiTConfig(depth={blocks}); write_base_checkpoint({base!r}, c);"
            f"write_native_lora({ref!r}, 'refinement', dims=c.dims, rank=128)")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src")))
    os.sync()
    return lora, ref, base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the A side (e.g. the commit before a restructuring)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--to", nargs="*", default=["fastvideo", "peft", "longcat"], help="formats (none: merge only)")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="ab-", dir=a.dir)
    try:
        old, new = export(a.rev, d), os.path.join(ROOT, "src")
        lora, ref, base = write_inputs(d, a.blocks)
        out = os.path.join(d, "out")
        cases = [(f"convert cfg_step -> {f}", ["convert", lora, out, "--to", f], lora) for f in a.to]
        cases.append((f"merge {a.blocks}-block base + refinement", ["merge", base, out, "--lora", ref], base))
        print(f"A = {a.rev}, B = working tree; {a.rounds} rounds of A,B,B,A")
        for name, args, warm in cases:
            ratios = []
            for _ in range(a.rounds):
                t = {"A": [], "B": []}
                for side in ("A", "B", "B", "A"):
                    remove(out)
                    settle([warm])
                    t[side].append(timed(old if side == "A" else new, args, out))
                ratios.append(sum(t["B"]) / sum(t["A"]))
                print(f"  {name}: A {t['A'][0]:.2f} {t['A'][1]:.2f} s, B {t['B'][0]:.2f} {t['B'][1]:.2f} s, "
                      f"B/A {ratios[-1]:.2f}", flush=True)
            print(f"{name}: median B/A {median(ratios):.2f}")
            remove(out)
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
