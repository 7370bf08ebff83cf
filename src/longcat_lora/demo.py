"""`longcat-lora demo`: the main job end to end on a generated full-structure LoRA.

Writes a small refinement-layout native LoRA (48 blocks, every module type), inspects it, converts it
to every format and back, verifies each against the original, and prints a report. Exit 0 only if every
path is exact.
"""

from __future__ import annotations

import os
import tempfile

from .fixtures import write_native_lora
from .formats import FORMATS, convert, load_lora
from .naming import DitDims
from .summary import format_report, inspect_lora
from .verify import compare

DEMO_DIMS = DitDims(hidden=64, ffn=176, adaln=32, final_out=16, depth=48)
TOLERANCE = 1e-6


def run_demo(keep: str | None = None) -> int:
    import torch

    with tempfile.TemporaryDirectory(prefix="longcat-lora-demo-") as tmp:
        work = keep or tmp
        os.makedirs(work, exist_ok=True)
        src = os.path.join(work, "demo_refinement_lora.safetensors")
        write_native_lora(src, "refinement", dims=DEMO_DIMS, rank=8, dtype=torch.bfloat16, alpha_scale=0.5)
        print("== 1. the generated native LoRA")
        print(format_report(inspect_lora(src)))
        print("\n== 2. convert to every format and back to native, verify each weight change")
        rows = []
        worst = 0.0
        with load_lora(src) as original:
            for fmt in FORMATS:
                out = os.path.join(work, f"demo.{fmt}" + ("" if fmt == "peft" else ".safetensors"))
                back = os.path.join(work, f"demo.{fmt}.back.safetensors")
                convert(src, out, fmt, overwrite=True)
                convert(out, back, "longcat", overwrite=True)
                for label, path in ((fmt, out), (f"{fmt} -> longcat", back)):
                    with load_lora(path) as other:
                        c = compare(original, other)
                    rows.append((label, c.worst, len(c.errors)))
                    worst = max(worst, c.worst)
        print(f"  {'path':28s} {'modules':>8s} {'worst rel. error':>18s}")
        for label, err, n in rows:
            print(f"  {label:28s} {n:8d} {err:18.3e}")
        ok = worst <= TOLERANCE
        print(f"\n{'OK' if ok else 'FAILED'}: worst conversion error {worst:.3e} (tolerance {TOLERANCE:g})"
              + (f"; files kept in {work}" if keep else ""))
        return 0 if ok else 1
