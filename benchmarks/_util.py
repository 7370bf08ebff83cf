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


def median(xs: list[float]) -> float:
    return statistics.median(xs)
