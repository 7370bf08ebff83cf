"""PEFT rank/alpha pattern lookup: the old per-key re.match loop against patterns.PatternTable, same run.

Usage: python benchmarks/patterns.py [KEYS] [MODULES]   (default 3000 full-path keys, 48 modules; the old loop grows as keys x modules)
Prints seconds for each, and for a `(a|aa)+b` key against a module named by N a's (N = 20, 26, 32; for the
old loop: each extra a multiplies its time by ~1.6; the table answers in microseconds).
"""

from __future__ import annotations

import re
import sys
import time

from longcat_lora.formats.patterns import PatternTable

KINDS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "ffn.w1", "ffn.w2", "ffn.w3",
         "adaLN_modulation.1", "cross_attn.proj", "final")


def old_lookup(patterns: dict, module: str):
    for key in patterns:  # what PEFT (and this package before) did: a regex per key per module
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return None


def main() -> None:
    nkeys = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    nmod = int(sys.argv[2]) if len(sys.argv) > 2 else 48
    modules = [f"blocks.{i // len(KINDS)}.{KINDS[i % len(KINDS)]}" for i in range(nmod)]
    keys = {f"blocks.{i}.x.{KINDS[i % len(KINDS)]}": 2 for i in range(nkeys - 1)}
    keys[modules[-1]] = 4  # the last key matches the last module: every other key is tried first
    t = time.perf_counter()
    old = [old_lookup(keys, m) for m in modules]
    t_old = time.perf_counter() - t
    t = time.perf_counter()
    table = PatternTable(keys, "bench", "rank_pattern")
    new = [table.lookup(m) for m in modules]
    t_new = time.perf_counter() - t
    assert old == new
    print(f"{nkeys} keys x {nmod} modules: re.match loop {t_old:.2f} s, PatternTable {t_new:.3f} s "
          f"({t_old / t_new:.0f}x)")
    table = PatternTable({"(a|aa)+b": 1}, "bench", "rank_pattern")
    for n in (20, 26, 32):
        t = time.perf_counter()
        assert old_lookup({"(a|aa)+b": 1}, "a" * n) is None
        t_old = time.perf_counter() - t
        t = time.perf_counter()
        assert table.lookup("a" * n) is None
        t_new = time.perf_counter() - t
        print(f"(a|aa)+b against {n} a's: re.match {t_old:.3f} s, PatternTable {t_new * 1e6:.0f} us")


if __name__ == "__main__":
    main()
