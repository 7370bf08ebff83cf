"""`longcat-lora demo`: the main job end to end on a generated full-structure LoRA.

Writes a small refinement-layout native LoRA (48 blocks, every module type), inspects it, converts it
to every format and back, verifies each against the original, and prints a report. Exit 0 only if every
path is exact. The inference table includes the INT8 DiT (official `--use_int8` quantization): apply_lora
there is exact too; merging into INT8 weights requantizes them, so those rows report the loss and are
bounded only loosely.
"""

from __future__ import annotations

import os
import tempfile

from .fixtures import write_native_lora
from ..formats import FORMATS, convert, load_lora
from . import producers
from ..commands.inspect import format_report, inspect_lora
from ..commands.verify import compare

TOLERANCE = 1e-6  # conversions
PARITY_TOLERANCE = 1e-5  # fp32 forward passes
# Merging into INT8 weights requantizes them: lossy by nature. Bounds that only catch the absurd.
INT8_MERGED_OUTPUT_BOUND = 5e-2  # output vs the unmerged LoRA on the same INT8 model
INT8_HALF_STEP = 0.5 + 127 * 2.0 ** -24  # worst element error, in quantization steps (fp32 rounding)


def inference_parity(native: str, fastvideo: str, multiplier: float = 0.8) -> list[tuple[str, float]]:
    """Run a tiny reference DiT with the LoRA applied every way; relative error of each vs the official
    LoRANetwork semantics on the original-layout model."""
    import torch

    from ..apply import runtime
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


def int8_parity(native: str, fastvideo: str, multiplier: float = 0.8) -> dict:
    """The tiny reference DiT quantized as the official `--use_int8` does (every Linear but
    final_layer.linear): apply_lora vs the official LoRA on the same INT8 model (exact rows), and the
    LoRA merged into the INT8 weights (requantized: per-layer error and output error vs the unmerged
    LoRA on the INT8 model). `unmerged_exact`: unmerge restored the model's outputs bit for bit."""
    import torch

    from ..apply import runtime
    from .dit import TINY, LongCatDiT, quantize_dit
    from .official import disable_official_loras, enable_official_loras

    torch.manual_seed(0)
    model = quantize_dit(LongCatDiT(TINY).eval())
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, TINY.in_channels, 2, 4, 4, generator=g), torch.tensor([600.0]),
              torch.randn(1, 1, 8, TINY.caption_channels, generator=g))

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(*inputs)

    def rel(a: torch.Tensor) -> float:
        return float((a - want).norm() / want.norm())

    base = run()
    enable_official_loras(model, [(native, multiplier)])
    want = run()
    disable_official_loras(model)
    rows = [("INT8 DiT: no LoRA (the LoRA's effect)", rel(base))]
    for label, path in (("native file", native), ("FastVideo file", fastvideo)):
        runtime.apply_lora(model, path, multiplier)
        rows.append((f"INT8 DiT: apply_lora, {label}", rel(run())))
        runtime.remove_lora(model)
    report = runtime.merge_lora(model, native, multiplier)
    merged = rel(run())
    runtime.unmerge_lora(model)
    layer, worst = report.worst()
    return {"rows": rows, "merged_output": merged, "worst_layer": layer, "worst_rel": worst.rel_frobenius,
            "worst_steps": report.worst_steps(), "requantized": len(report.requantized),
            "unmerged_exact": bool(torch.equal(run(), base))}


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
            for fmt in [n for n, f in FORMATS.items() if f.write is not None]:
                out = os.path.join(work, f"demo.{fmt}" + ("" if fmt == "peft" else ".safetensors"))
                back = os.path.join(work, f"demo.{fmt}.back.safetensors")
                convert(src, out, fmt, overwrite=True)
                convert(out, back, "longcat", overwrite=True)
                for label, path in ((fmt, out), (f"{fmt} -> longcat", back)):
                    with load_lora(path) as other:
                        c = compare(original, other)
                    rows.append((label, c.worst, len(c.errors)))
                    worst = max(worst, c.worst)
            # the forms the ecosystem's trainers write, made from the same LoRA (testing/producers.py)
            for label, make, out in (("DiffSynth-Studio form", producers.diffsynth, "demo.diffsynth.safetensors"),
                                     ("musubi-tuner form", producers.musubi, "demo.musubi.safetensors"),
                                     ("diffusion-pipe form", producers.diffusion_pipe, "demo.diffusion_pipe")):
                path = make(src, os.path.join(work, out))
                with load_lora(path) as other:
                    c = compare(original, other)
                rows.append((f"read: {label}", c.worst, len(c.errors)))
                worst = max(worst, c.worst)
        print(f"  {'path':28s} {'modules':>8s} {'worst rel. error':>18s}")
        for label, err, n in rows:
            print(f"  {label:28s} {n:8d} {err:18.3e}")
        print("\n== 3. small inference: a tiny reference LongCat DiT (48 blocks), relative error of each path")
        print("   vs the official LoRANetwork semantics (original names, native file), multiplier 0.8, fp32")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny model: thread hand-offs cost more than they save (far more when busy)
        try:
            parity = inference_parity(src, os.path.join(work, "demo.fastvideo.safetensors"))
            q = int8_parity(src, os.path.join(work, "demo.fastvideo.safetensors"))
        finally:
            torch.set_num_threads(threads)
        for label, err in parity:
            print(f"  {label:48s} {err:10.3e}")
        for label, err in q["rows"]:
            print(f"  {label:48s} {err:10.3e}")
        print(f"  {'INT8 DiT: merged into INT8 (requantized)':48s} {q['merged_output']:10.3e}  (lossy; vs the "
              f"unmerged LoRA on the INT8 DiT)")
        print(f"     requantization, {q['requantized']} INT8 layers: worst relative error {q['worst_rel']:.3e} "
              f"({q['worst_layer']}), worst element {q['worst_steps']:.4f} quantization steps; "
              f"unmerge restores the outputs {'bit for bit' if q['unmerged_exact'] else 'NOT bit for bit'}")
        worst_parity = max([err for label, err in parity[1:]] + [err for label, err in q["rows"][1:]])
        int8_ok = (q["merged_output"] <= INT8_MERGED_OUTPUT_BOUND and q["worst_steps"] <= INT8_HALF_STEP
                   and q["unmerged_exact"] and q["rows"][0][1] > 1e-3)
        ok = worst <= TOLERANCE and worst_parity <= PARITY_TOLERANCE and parity[0][1] > 1e-3 and int8_ok
        print(f"\n{'OK' if ok else 'FAILED'}: worst conversion error {worst:.3e} (tolerance {TOLERANCE:g}), "
              f"worst inference error {worst_parity:.3e} (tolerance {PARITY_TOLERANCE:g})"
              + (f"; files kept in {work}" if keep else ""))
        return 0 if ok else 1
