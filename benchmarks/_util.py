"""Shared timing helpers for the benchmarks: wall time and peak RSS of a child process."""

from __future__ import annotations

import os
import statistics
import subprocess
import time


def run(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS in MiB) of one command, which must succeed."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return dt, usage.ru_maxrss // 1024


def interleaved(a: list[str], b: list[str], pairs: int, before=None) -> tuple[list[float], list[float], int]:
    """Run a and b alternately `pairs` times; returns their times and b's worst peak RSS (MiB)."""
    ta, tb, rss = [], [], 0
    for _ in range(pairs):
        if before:
            before()
        ta.append(run(a)[0])
        if before:
            before()
        t, r = run(b)
        tb.append(t)
        rss = max(rss, r)
    return ta, tb, rss


def settle(warm: list[str], warm_cmds: tuple[list[str], ...] = ()) -> None:
    """Bring the machine to the same state before every timed command: no dirty pages left by the
    previous run, the inputs in the page cache, and each side's program loaded once (`warm_cmds`, e.g.
    the tool's --version), so neither side pays for reading its own binary from disk.
    """
    os.sync()
    for root in warm:
        paths = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        for p in paths:
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
    for cmd in warm_cmds:
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    os.sync()


def median(xs: list[float]) -> float:
    return statistics.median(xs)
