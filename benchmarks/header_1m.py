"""Time and peak RSS to open (validate) a safetensors header of N tiny tensors, and for the CLI to answer.

Usage: python benchmarks/header_1m.py [N] [--lora]   (default 1,000,000 entries; --lora names them as
FastVideo LoRA layers, so the CLI goes past the header into format detection and grouping)
Prints: header bytes, time and peak RSS of SafeFile() alone (subprocess), and of `longcat-lora inspect`
and `convert`. Issue 18's target: inspect and convert of the 1,000,000-tensor LoRA within 15 s and 1 GiB
(a LoRA input past formats.registry.MAX_LORA_TENSORS entries is refused before its header is parsed).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import time


def write(path: str, n: int, lora: bool) -> int:
    parts = []
    for i in range(n):
        name = f"blocks.{i // 2}.x.lora_{'AB'[i % 2]}" if lora else f"t{i}"
        parts.append(f'"{name}":{{"dtype":"F32","shape":[1,1],"data_offsets":[{4 * i},{4 * i + 4}]}}')
    raw = ("{" + ",".join(parts) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * n))
    return len(raw)



def main() -> None:
    if sys.argv[1:2] == ["--write"]:  # in a child, so that the parent (whose peak a forked child's
        print(write(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"))  # ru_maxrss includes) stays small
        return
    n = int(next((a for a in sys.argv[1:] if a.isdigit()), 1_000_000))
    lora = "--lora" in sys.argv
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "many.safetensors")
        size = int(subprocess.run([sys.executable, __file__, "--write", path, str(n), "1" if lora else "0"],
                                  capture_output=True, text=True, check=True).stdout)
        print(f"{n:,} entries, header {size / 1e6:.1f} MB, names {'LoRA-like' if lora else 't<i>'}")
        probe = ("import resource,sys,time;from longcat_lora.io.reader import SafeFile;t=time.perf_counter();"
                 "f=SafeFile(sys.argv[1]);print(f'{time.perf_counter()-t:.2f} s', len(f.tensors), "
                 "f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MiB')")
        r = subprocess.run([sys.executable, "-c", probe, path], capture_output=True, text=True)
        print("SafeFile():", (r.stdout or r.stderr).strip().splitlines()[-1])
        for cmd in (["inspect", path], ["convert", path, os.path.join(d, "out.safetensors"), "--to", "longcat"]):
            t = time.perf_counter()
            p = subprocess.Popen([sys.executable, "-m", "longcat_lora", *cmd], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
            err = p.stderr.read()
            _, status, ru = os.wait4(p.pid, 0)
            dt = time.perf_counter() - t
            print(f"longcat-lora {cmd[0]}: exit {os.waitstatus_to_exitcode(status)}, {dt:.1f} s, "
                  f"peak RSS {ru.ru_maxrss / 1024:.0f} MiB; {(err.strip().splitlines() or [''])[-1][:140]}")


if __name__ == "__main__":
    main()
