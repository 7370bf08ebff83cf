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
from .summary import format_report, inspect_lora
from .verify import compare

TOLERANCE = 1e-6  # conversions
PARITY_TOLERANCE = 1e-5  # fp32 forward passes


def inference_parity(native: str, fastvideo: str, multiplier: float = 0.8) -> list[tuple[str, float]]:
    """Run a tiny reference DiT with the LoRA applied every way; relative error of each vs the official
    LoRANetwork semantics on the original-layout model."""
    import torch

    from . import runtime
    from .dit import TINY, LongCatDiT, LongCatDiTSplit, convert_state_dict
    from .official import disable_official_loras, enable_official_loras

    torch.manual_seed(0)
    fused = LongCatDiT(TINY).eval()
    split = LongCatDiTSplit(TINY).eval()
    split.load_state_dict(convert_state_dict(fused.state_dict(), "fastvideo"))
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, TINY.in_channels, 2, 4, 4, generator=g), torch.tensor([600.0]),
              torch.randn(1, 1, 8, TINY.caption_channels, generator=g))

    def run(model) -> torch.Tensor:
        with torch.no_grad():
            return model(*inputs)

    def rel(a: torch.Tensor) -> float:
        return float((a - want).norm() / want.norm())

    base = run(fused)
    enable_official_loras(fused, [(native, multiplier)])
    want = run(fused)
    disable_official_loras(fused)
    rows = [("no LoRA (the LoRA's effect)", rel(base))]
    for label, model, path in (("original names + native file", fused, native),
                               ("original names + FastVideo file", fused, fastvideo),
                               ("FastVideo names + FastVideo file", split, fastvideo),
                               ("FastVideo names + native file", split, native)):
        runtime.apply_lora(model, path, multiplier)
        rows.append((f"apply_lora: {label}", rel(run(model))))
        runtime.remove_lora(model)
    for label, model in (("merged, original names", fused), ("merged, FastVideo names", split)):
        runtime.merge_lora(model, fastvideo, multiplier)
        rows.append((label, rel(run(model))))
        runtime.unmerge_lora(model)
    return rows


def run_demo(keep: str | None = None) -> int:
    import torch

    with tempfile.TemporaryDirectory(prefix="longcat-lora-demo-") as tmp:
        work = keep or tmp
        os.makedirs(work, exist_ok=True)
        src = os.path.join(work, "demo_refinement_lora.safetensors")
        from .dit import TINY

        write_native_lora(src, "refinement", dims=TINY.dims, rank=8, dtype=torch.bfloat16, alpha_scale=0.5)
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
        print("\n== 3. small inference: a tiny reference LongCat DiT (48 blocks), relative error of each path")
        print("   vs the official LoRANetwork semantics (original names, native file), multiplier 0.8, fp32")
        parity = inference_parity(src, os.path.join(work, "demo.fastvideo.safetensors"))
        for label, err in parity:
            print(f"  {label:48s} {err:10.3e}")
        worst_parity = max(err for label, err in parity[1:])
        ok = worst <= TOLERANCE and worst_parity <= PARITY_TOLERANCE and parity[0][1] > 1e-3
        print(f"\n{'OK' if ok else 'FAILED'}: worst conversion error {worst:.3e} (tolerance {TOLERANCE:g}), "
              f"worst inference error {worst_parity:.3e} (tolerance {PARITY_TOLERANCE:g})"
              + (f"; files kept in {work}" if keep else ""))
        return 0 if ok else 1
