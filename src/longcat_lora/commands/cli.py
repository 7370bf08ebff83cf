"""The `longcat-lora` command: a thin layer over the library.

Exit codes: 0 ok, 1 verify mismatch (or demo over tolerance), 2 bad input, usage or an I/O error (disk
full, permission), 3 internal error (a bug), 130 interrupted (SIGINT), 143 terminated (SIGTERM); after
130/143 no temp file is left and OUT is untouched. Errors are one line on stderr; `--debug` shows the
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .. import __version__
from ..errors import NAME_ONLY, LoraError, Param, q
from ..formats import convert, get, load_lora, outputs
from ..io.interrupts import Terminated, handle_signals


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import format_report, inspect_lora

    report = inspect_lora(args.file)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _convert(args: argparse.Namespace) -> int:
    skipped = convert(args.input, args.output, args.to, overwrite=args.overwrite,
                      skip_unmapped=args.skip_unmapped, allow_nonfinite=args.allow_nonfinite, progress=True)
    for m in skipped:
        print(f"skipped (no name in {args.to}): {q(m)}", file=sys.stderr)
    print(_line(f"wrote {args.output} ({args.to})" + (f", {len(skipped)} modules skipped" if skipped else "")))
    if get(args.to).name == "wanvideo":
        from ..io.reader import SafeFile

        with SafeFile(args.output) as f:
            head = sorted({k.split(".lora_")[0].split(".alpha")[0] for k in f.keys() if ".head." in k})
        if head:
            print(_line(f"note: ComfyUI-WanVideoWrapper applies {', '.join(x.removeprefix('diffusion_model.') for x in head)} "
                        f"only with merge_loras on (its default); its unmerged path skips every key containing "
                        f"'head'"), file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import compare

    with load_lora(args.a) as a, load_lora(args.b) as b:
        c = compare(a, b)
    for name in c.only_a:
        print(f"only in {args.a}: {q(name)}")
    for name in c.only_b:
        print(f"only in {args.b}: {q(name)}")
    for name in c.unknown:
        print(f"unknown module (not in LongCat-Video or LongCat-Video-Avatar in any naming known here): {q(name)}")
    ok = c.equivalent(args.rtol)
    print(f"{len(c.errors)} modules compared; worst relative error {c.worst:.3e} at {q(c.worst_module or '-')} "
          f"(rtol {args.rtol:g}): {'equivalent' if ok else 'NOT equivalent'}")
    return 0 if ok else 1


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """--lora PATH[:STRENGTH] of merge and combine: the strength is taken from the last ':' when it parses as a number."""
    path, sep, tail = arg.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return arg, 1.0


def _merge(args: argparse.Namespace) -> int:
    from ..apply.merge import merge_checkpoint

    if not args.lora and args.layout == "keep":
        raise LoraError("give at least one --lora PATH[:STRENGTH] (or --layout wanvideo to repack BASE without one)")
    report = merge_checkpoint(args.base, args.output, [parse_lora_arg(x) for x in args.lora or []], dtype=args.dtype,
                              layout=args.layout, overwrite=args.overwrite, skip_unmapped=args.skip_unmapped,
                              device=args.device, progress=True)
    for m in report.skipped:
        print(f"skipped (no base weight): {q(m)}", file=sys.stderr)
    print(f"wrote {args.output}: {len(report.merged)} weights changed on {report.device}"
          + (f", {len(report.skipped)} LoRA modules skipped" if report.skipped else "")
          + (f"; {report.summary}" if report.summary else ""))
    return 0


def _rank_flags(args: argparse.Namespace, required: bool):
    """The RankRule of --rank / --energy / --max-error (None when none is given and none is required);
    errors name the flags (RankRule.parse's name its parameters, which `main` spells as flags)."""
    from ..algebra.lowrank import RankRule

    given = [f for f, v in (("--rank", args.rank), ("--energy", args.energy), ("--max-error", args.max_error))
             if v is not None]
    if not given and not required:
        return None
    if len(given) != 1:
        raise LoraError("give exactly one of --rank R, --energy F, --max-error E"
                        + (f" (got {' and '.join(given)})" if given else ""))
    return RankRule.parse(args.rank, args.energy, args.max_error)


def _print_report(args: argparse.Namespace, report) -> None:
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format())
        print(f"wrote {args.output} ({args.to})")


def _resize(args: argparse.Namespace) -> int:
    from ..algebra.resize import resize_lora

    rule = _rank_flags(args, required=True)
    if args.plot:  # before the work: matplotlib present, PNG writable
        from ..algebra.plot import check_plot_output, plot_resize

        check_plot_output(args.plot, args.overwrite, inputs=[args.input, args.output])
    report = resize_lora(args.input, args.output, rank=rule.rank, energy=rule.energy, max_error=rule.max_error,
                         format=args.to, dtype=args.dtype, overwrite=args.overwrite,
                         skip_unmapped=args.skip_unmapped, progress=True)
    if args.plot:
        plot_resize(report, args.plot, lora=args.input, overwrite=args.overwrite)
    _print_report(args, report)
    return 0


def _combine(args: argparse.Namespace) -> int:
    from ..algebra.combine import combine_loras

    rule = _rank_flags(args, required=False)
    if rule is None and args.dtype != "keep":
        raise LoraError("--dtype: an exact combine keeps the inputs' dtypes; give --rank, --energy or --max-error "
                        "to choose one")
    report = combine_loras(args.output, [parse_lora_arg(x) for x in args.lora],
                           rank=rule.rank if rule else None, energy=rule.energy if rule else None,
                           max_error=rule.max_error if rule else None, format=args.to, dtype=args.dtype,
                           overwrite=args.overwrite, skip_unmapped=args.skip_unmapped, progress=True)
    _print_report(args, report)
    return 0


def _extract(args: argparse.Namespace) -> int:
    from ..algebra.extract import extract_lora

    rule = _rank_flags(args, required=True)
    report = extract_lora(args.base, args.tuned, args.output, rank=rule.rank, energy=rule.energy,
                          max_error=rule.max_error, device=args.device, format=args.to, dtype=args.dtype,
                          overwrite=args.overwrite, skip_unmapped=args.skip_unmapped, progress=True)
    _print_report(args, report)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from ..algebra.plot import plot_lora

    kinds = [k.strip() for k in args.modules.split(",") if k.strip()] if args.modules is not None else None
    if kinds == []:
        raise LoraError("--modules: give module kinds separated by commas, e.g. attn.qkv,ffn.w2")
    drawn = plot_lora(args.lora, args.output, modules=kinds, overwrite=args.overwrite)
    print(f"wrote {args.output}: {len(drawn['norms'])} modules, spectra of {len(drawn['spectra'])}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ..testing.demo import run_demo

    return run_demo(keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longcat-lora", description="Read, validate, convert, apply and merge "
                                "LongCat-Video LoRA adapters exactly.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="summarise and validate a LoRA file (any format)")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=_inspect)

    s = sub.add_parser("convert", help="convert a LoRA to another format")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--to", required=True, choices=sorted(outputs()))
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.add_argument("--skip-unmapped", action="store_true",
                   help="leave out (and list) modules the target format cannot name")
    s.add_argument("--allow-nonfinite", action="store_true", help="convert NaN/Inf weights instead of refusing")
    s.set_defaults(fn=_convert)

    s = sub.add_parser("verify", help="compare the weight change of two LoRAs (any formats)")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance (default 1e-5)")
    s.set_defaults(fn=_verify)

    s = sub.add_parser("merge", help="bake LoRAs into a base checkpoint (file or sharded directory), or repack "
                       "one for ComfyUI-WanVideoWrapper")
    s.add_argument("base")
    s.add_argument("output")
    s.add_argument("--lora", action="append", metavar="PATH[:STRENGTH]",
                   help="a LoRA in any format, optionally with a strength (default 1.0); repeatable; required "
                   "unless --layout wanvideo")
    s.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32", "fp8_e4m3fn_scaled"],
                   help="dtype of the output's float tensors (default: keep each tensor's, and an INT8 or fp8 "
                   "base's scheme, requantized); bf16/fp16/fp32 dequantize an INT8 or fp8 base; "
                   "fp8_e4m3fn_scaled (with --layout wanvideo): the block Linear weights as scaled fp8")
    s.add_argument("--layout", default="keep", choices=["keep", "wanvideo"],
                   help="keep BASE's layout (default), or write the single file ComfyUI-WanVideoWrapper loads "
                   "(its Wan-style names, q/k/v split)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.add_argument("--skip-unmapped", action="store_true", help="leave out (and list) LoRA modules with no base weight")
    s.add_argument("--device", default="auto", help="where to compute the weight changes: cpu, cuda, or auto "
                   "(default: cuda when present and the merge is big enough to gain from it)")
    s.set_defaults(fn=_merge)

    def rank_options(s: argparse.ArgumentParser, what: str) -> None:
        s.add_argument("--rank", type=int, metavar="R", help=f"{what}: rank of every up block (as the native "
                       "format and the official loader count it; capped at the input's)")
        s.add_argument("--energy", type=float, metavar="F", help=f"{what}: per up block, the smallest rank "
                       "keeping at least this share of ||dW||_F^2, in (0, 1]")
        s.add_argument("--max-error", type=float, metavar="E", help=f"{what}: per up block, the smallest rank "
                       "whose relative Frobenius error is at most E, in [0, 1)")
        s.add_argument("--to", default="longcat", choices=sorted(outputs()), help="output format (default longcat)")
        s.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32", "fp64"],
                       help="dtype of the new factors (default: the input's; its rounding is in the reported error)")
        s.add_argument("--json", action="store_true", help="print the report as JSON")
        s.add_argument("--overwrite", action="store_true", help="replace an existing output")
        s.add_argument("--skip-unmapped", action="store_true",
                       help="leave out (and list) modules the output format cannot name")

    s = sub.add_parser("resize", help="a LoRA at a lower rank (exact SVD per up block), with its true error")
    s.add_argument("input", help="a LoRA in any format")
    s.add_argument("output")
    rank_options(s, "one is required")
    s.add_argument("--plot", metavar="OUT.png", help="also draw the input LoRA with the ranks chosen and the errors "
                   "they cost (needs matplotlib)")
    s.set_defaults(fn=_resize)

    s = sub.add_parser("combine", help="several LoRAs as one: exact (ranks concatenated) or compressed by SVD")
    s.add_argument("output")
    s.add_argument("--lora", action="append", required=True, metavar="PATH[:STRENGTH]",
                   help="a LoRA in any format, optionally with a strength (default 1.0); repeatable")
    rank_options(s, "optional, compresses the sum")
    s.set_defaults(fn=_combine)

    s = sub.add_parser("extract", help="a LoRA from a base and a fine-tuned checkpoint (low-rank SVD of each "
                       "weight change), with its true error")
    s.add_argument("base", help="base checkpoint: a .safetensors file or a sharded directory (either naming)")
    s.add_argument("tuned", help="fine-tuned checkpoint with the same tensors (either naming)")
    s.add_argument("output")
    rank_options(s, "one is required")
    s.add_argument("--device", default="cpu", help="where to compute the SVDs: cpu or cuda")
    s.set_defaults(fn=_extract)

    s = sub.add_parser("plot", help="draw a LoRA as a PNG: ||dW|| per block and module kind, singular values")
    s.add_argument("lora", help="a LoRA in any format")
    s.add_argument("output", help="the PNG to write")
    s.add_argument("--modules", metavar="KINDS", help="only these module kinds, comma-separated (e.g. attn.qkv,ffn.w2)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.set_defaults(fn=_plot)

    s = sub.add_parser("demo", help="run the end-to-end demo on a generated LoRA")
    s.add_argument("--keep", metavar="DIR", help="write the demo files here instead of a temp dir")
    s.set_defaults(fn=_demo)
    return p


# The library names its parameters in messages (`errors.Param`); the command shows the flag that sets each.
FLAGS = {"overwrite": "--overwrite", "skip_unmapped": "--skip-unmapped", "allow_nonfinite": "--allow-nonfinite",
         "dtype": "--dtype", "rank": "--rank", "energy": "--energy", "max_error": "--max-error",
         "device": "--device", "layout": "--layout"}


def spell(p: Param) -> str:
    """A parameter as the command line spells it: `--skip-unmapped`, `--dtype fp32`, `--dtype`; a
    parameter without a flag keeps the library's spelling."""
    flag = FLAGS.get(p.name)
    if flag is None:
        return str(p)
    return flag if p.value is True or p.value is NAME_ONLY else f"{flag} {p.value}"


def _line(text: object) -> str:
    """A message as exactly one line: control characters (a newline in a user's path, an escape
    sequence) are shown escaped, never written to the log."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _error(text: object) -> None:
    print(_line(f"longcat-lora: {text}"), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with handle_signals():  # SIGTERM unwinds like Ctrl-C, so temp outputs are removed
            return args.fn(args)
    except Terminated:
        _error("terminated")
        return 143
    except LoraError as e:
        if args.debug:
            raise
        _error(f"error: {e.render(spell)}")
        return 2
    except BrokenPipeError:  # the reader of our stdout went away (`inspect ... | head`): stop quietly, as
        # `cat` does; stdout goes to /dev/null so the interpreter's last flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        if args.debug:
            raise
        _error(f"error: {e.filename}: {e.strerror or e}" if e.filename else f"error: {e.strerror or e}")
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as e:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            raise
        _error(f"internal error: {type(e).__name__}: {e} (rerun with --debug for a traceback)")
        return 3


if __name__ == "__main__":
    sys.exit(main())
