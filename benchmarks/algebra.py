"""Benchmark the LoRA algebra commands (resize, combine, ...) on full-size files, against `cp`.

Inputs are full-size bf16 native LoRAs of the cfg_step layout (1.26 GB, rank 128), generated in child
processes (this process never imports torch, so each command's peak RSS is its own). Every timed command
runs after `settle` (inputs in the page cache, no dirty pages) and includes the `sync` of its own output;
`cp` and the command alternate, and the medians are compared.

Sections (`--sections`, default all), each a function registered with @section:
- resize: `resize --rank 32` of one file vs `cp` of it (target <= 3x, peak RSS <= 500 MiB), and its
  arithmetic floor (the float32 Gram matrices and the r x r work the exact SVD needs for a bf16 output, no I/O); beside it, one full-matrix SVD of a single qkv weight change (12288 x 4096, float32, the kohya way), which
  resize replaces by factored SVDs of every module.
- both also print the interpreter + import time (numpy, not torch: neither command loads torch) and the
  ratio without it.
- combine: exact `combine` of two files vs `cp` of both (target <= 3x), at strengths 1 and 1 (factors
  copied as they are) and 1 and 0.8 (the second file's up blocks folded to float32).

Usage: python benchmarks/algebra.py [--sections resize combine] [--pairs 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(__file__))
from _util import interleaved, median, run, settle  # noqa: E402

RSS_TARGET = 500  # MiB


@dataclass
class Ctx:
    """What every section gets: a temp dir, the interpreter, repeats, and cached generated inputs."""

    tmp: str
    pairs: int
    py: str = sys.executable
    made: dict[tuple[str, int], str] = field(default_factory=dict)
    start: float | None = None  # see startup()

    @property
    def tool(self) -> list[str]:
        return [self.py, "-m", "longcat_lora"]

    def lora(self, layout: str = "cfg_step", seed: int = 0) -> str:
        """A full-size bf16 rank-128 native LoRA, written once in a child process."""
        key = (layout, seed)
        if key not in self.made:
            path = os.path.join(self.tmp, f"{layout}-{seed}.safetensors")
            code = ("from longcat_lora.testing.fixtures import write_native_lora; "
                    f"write_native_lora({path!r}, {layout!r}, seed={seed})")
            subprocess.run([self.py, "-c", code], check=True)
            os.sync()
            self.made[key] = path
        return self.made[key]

    def startup(self) -> float:
        """Median seconds of the interpreter + the modules resize / combine import (numpy, not torch): the
        fixed cost of every run, which no change to the arithmetic can remove."""
        if self.start is None:
            cmd = [self.py, "-c", "import longcat_lora.commands.cli, longcat_lora.algebra.resize, "
                   "longcat_lora.algebra.combine"]
            self.start = median([run(cmd)[0] for _ in range(3)])
        return self.start

    def out(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def versus_cp(self, inputs: list[str], command: list[str], outputs: list[str]) -> tuple[float, float, int,
                                                                                          list[float], list[float]]:
        """Interleaved (cp of every input + sync) and (command + sync): medians, peak RSS, all runs."""
        cps = [self.out(f"cp{i}.out") for i in range(len(inputs))]

        def clean() -> None:
            for p in cps + outputs:
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
            settle(inputs, (["cp", "--version"], self.tool + ["--version"]))

        cp_cmd = " && ".join(f"cp '{i}' '{o}'" for i, o in zip(inputs, cps)) + " && sync"
        t_cp, t_cmd, rss = interleaved(["sh", "-c", cp_cmd],
                                       ["sh", "-c", " ".join(f"'{x}'" for x in command) + " && sync"],
                                       self.pairs, before=clean)
        clean()
        return median(t_cp), median(t_cmd), rss, t_cp, t_cmd


SECTIONS: dict[str, Callable[[Ctx], None]] = {}


def section(name: str):
    def register(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        SECTIONS[name] = fn
        return fn
    return register


# One full-matrix SVD of block 0's qkv weight change, as kohya's resize_lora.py does for every module:
# materialise dW (float32) and take torch.linalg.svd of it. Prints seconds.
KOHYA_SVD = """
import time, torch
from longcat_lora.formats import load_lora
with load_lora({src!r}) as a:
    m = a.modules["blocks.0.attn.qkv"]
    dW = m.delta(torch.float32)
t0 = time.perf_counter()
torch.linalg.svd(dW, full_matrices=False)
print(time.perf_counter() - t0, *dW.shape)
"""


# The arithmetic floor of an exact resize, as resize runs it for a bf16 output on one BLAS thread, with
# reading and conversion off the clock: the two float32 Gram matrices of every up block's factors, and
# the r x r work (Cholesky factors, core product, its eigendecomposition). Prints both, in seconds.
FLOOR = """
import time, numpy as np
from longcat_lora.formats import load_lora
from longcat_lora.io.dtypes import decode
from longcat_lora.algebra.cells import core_svd
from longcat_lora.threads import single_threaded
grams = small = 0.0
with single_threaded(), load_lora({src!r}) as a:
    for m in a.modules.values():
        for p in m.parts:
            up = decode(p.up.raw(), p.up.dtype, np.empty(p.up.shape, np.float32))
            down = decode(p.down.raw(), p.down.dtype, np.empty(p.down.shape, np.float32))
            t0 = time.perf_counter()
            ga, gb = up.T @ up, down @ down.T
            t1 = time.perf_counter()
            ra = np.linalg.cholesky(ga.astype(np.float64)).T
            rb = np.linalg.cholesky(gb.astype(np.float64)).T
            core_svd(ra @ rb.T, 32, True)
            t2 = time.perf_counter()
            grams += t1 - t0
            small += t2 - t1
print(grams, small)
"""


@section("resize")
def bench_resize(ctx: Ctx) -> None:
    src = ctx.lora("cfg_step", 0)
    out = ctx.out("resized.safetensors")
    cp, t, rss, t_cp, t_cmd = ctx.versus_cp([src], ctx.tool + ["resize", src, out, "--rank", "32"], [out])
    kohya = subprocess.run([ctx.py, "-c", KOHYA_SVD.format(src=src)], check=True, capture_output=True,
                           text=True).stdout.split()
    svd, rows, cols = float(kohya[0]), kohya[1], kohya[2]
    grams, small = map(float, subprocess.run([ctx.py, "-c", FLOOR.format(src=src)], check=True,
                                             capture_output=True, text=True).stdout.split()[-2:])
    print("  runs: cp", [round(x, 2) for x in t_cp], " resize", [round(x, 2) for x in t_cmd])
    print(f"resize  cfg_step {os.path.getsize(src) / 1e9:.2f} GB bf16 rank 128 -> 32: cp {cp:.2f}s  resize {t:.2f}s  "
          f"ratio {t / cp:.2f}x (target <= 3x)  peak RSS {rss} MiB (target <= {RSS_TARGET})")
    start = ctx.startup()
    print(f"        interpreter + imports {start:.2f}s: without them resize {t - start:.2f}s = "
          f"{(t - start) / cp:.2f}x cp")
    print(f"        arithmetic floor on one thread, no I/O: float32 Gram matrices of every up block's factors "
          f"{grams:.2f}s + r x r work (Cholesky, core eigendecomposition) {small:.2f}s; on both cores at best "
          f"{(grams + small) / 2:.2f}s = {(grams + small) / 2 / cp:.2f}x cp, before any output is formed")
    print(f"        one full-matrix SVD of blocks.0.attn.qkv's dW ({rows} x {cols}, float32, the kohya way): "
          f"{svd:.2f}s = {svd / t:.2f}x this whole-file resize (the file has 336 such modules)")


@section("combine")
def bench_combine(ctx: Ctx) -> None:
    a, b = ctx.lora("cfg_step", 0), ctx.lora("cfg_step", 1)
    out = ctx.out("combined.safetensors")
    size = (os.path.getsize(a) + os.path.getsize(b)) / 1e9
    # strengths 1 and 1: the inputs' factors concatenated as they are (bf16);
    # 1 and 0.8: the second input's up blocks folded (float64 -> float32), so the output grows
    for second in ("1", "0.8"):
        cmd = ctx.tool + ["combine", out, "--lora", a, "--lora", f"{b}:{second}"]
        cp, t, rss, t_cp, t_cmd = ctx.versus_cp([a, b], cmd, [out])
        print("  runs: cp both", [round(x, 2) for x in t_cp], " combine", [round(x, 2) for x in t_cmd])
        print(f"combine two cfg_step files ({size:.2f} GB), exact, strengths 1 and {second}: cp both {cp:.2f}s  "
              f"combine {t:.2f}s  ratio {t / cp:.2f}x (target <= 3x)  peak RSS {rss} MiB; without the "
              f"start-up ({ctx.startup():.2f}s) {(t - ctx.startup()) / cp:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(dir=args.dir, prefix="lcl-algebra-")
    try:
        ctx = Ctx(tmp, args.pairs)
        for name in args.sections:
            SECTIONS[name](ctx)
            sys.stdout.flush()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
