"""Mutation testing for the core, outside CI: does the suite notice the one-line bugs we would write?

    .venv/bin/python tools/mutation.py                 # hand-made mutants + a seeded sample of generated ones
    .venv/bin/python tools/mutation.py --hand          # only the hand-made mutants (issue 8's list)
    .venv/bin/python tools/mutation.py --sample 0      # every generated mutant (hours on 2 cores)
    .venv/bin/python tools/mutation.py --list          # print the mutants, run nothing

The tree (src/ and tests/ of the working copy, or of a git revision with --rev) is copied to a temp
directory and every mutant is applied there, never in the checkout, so people can keep working in it.
Each mutant runs only a FAST relevant subset of the tests (`SUBSETS`, per core module, `-x`: the first
failure ends the run) against that copy (PYTHONPATH points at the copy's src, so CLI subprocesses see
the mutant too). A mutant is killed when the subset fails or runs past its timeout.

Mutants are generated from the AST of each core module (formats/, model/, io/, apply/runtime.py,
apply/merge.py with base_checkpoint.py and side_files.py, apply/targets.py, the correctly rounded merge
arithmetic of apply/exact.py, commands/verify.py, the numpy arithmetic of resize / combine in
algebra/cells.py, lowrank.py, combine.py, and threads.py):
comparison and arithmetic operators, and/or, `not`, small integer and float constants, True/False,
dtype names ("F64" <-> "F32", "F16" <-> "BF16", torch.float64 <-> torch.float32). Lines that only
build messages, docstrings and type hints are left alone. `EQUIVALENT` lists mutants that cannot
change behaviour, each with the reason; the score is killed / (mutants run - equivalent ones).

Why not mutmut (3.8 is installed): it rewrites the package into trampolines in a mutants/ folder of
the checkout (others work there), needs one run of the whole suite (3+ minutes here) to record which
tests reach which function before the first mutant, and the CLI tests run the package in a subprocess,
which mutmut's in-process trampolines do not reach, so every mutant met only through the CLI would
survive. A plain copy of the tree with PYTHONPATH set has none of these problems.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "src/longcat_lora"
CORE = ["formats/__init__.py", "formats/_common.py", "formats/base.py", "formats/registry.py", "formats/longcat.py",
        "formats/fastvideo.py", "formats/peft.py", "formats/diffusers.py", "formats/kohya.py", "formats/wanvideo.py", "formats/diffsynth.py", "model/adapter.py",
        "model/sources.py", "model/layout.py", "model/naming.py", "io/dtypes.py", "io/reader.py", "io/serdejson.py",
        "io/writer.py", "io/outputs.py", "io/direct.py", "apply/runtime.py", "apply/layers.py", "apply/fuse.py", "apply/targets.py",
        "apply/merge.py", "apply/base_checkpoint.py", "apply/side_files.py", "apply/pipeline.py",
        "apply/merge_compute.py", "apply/exact.py", "commands/verify.py", "algebra/cells.py", "algebra/lowrank.py",
        "algebra/combine.py", "threads.py"]

# Fast subsets (pytest node ids), per core module, the quickest and most telling first (`-x` stops a
# killed mutant at its first failure; a survivor runs the whole subset: 30-90 s each on 2 shared cores).
R = "tests/test_regressions.py::"
E = "tests/test_exactness.py::"
F = "tests/test_formats.py::"
_FORMATS = [E + "test_fastvideo_tensors_are_the_native_slices", E + "test_reads_what_fastvideo_accepts",
            E + "test_up_blocks_ordered_by_integer_index", E + "test_alpha_scale_shapes_and_dtypes",
            E + "test_missing_alpha_scale_means_one", R + "test_bad_input_classes_in_process",
            R + "test_every_format_reads_back_bit_exact", "tests/test_golden.py",
            R + "test_fold_is_computed_in_float64_and_rounded_once", R + "test_fastvideo_alpha_below_one_means_scale_one",
            R + "test_fastvideo_writer_folds_when_alpha_is_below_one", E + "test_int_alpha_truncation_is_what_fastvideo_does",
            E + "test_round_trip_native_fastvideo_native_bit_exact[None-dtype3]",
            F + "test_split_parts_with_different_ranks_and_alphas", F + "test_kohya_file_semantics",
            F + "test_fastvideo_names_in_other_formats_map_to_longcat_modules",
            F + "test_round_trip_bit_exact[dtype0-peft]", R + "test_peft_alpha_pattern_for_a_default_rank_module",
            R + "test_peft_weights_file_reads_like_its_directory", R + "test_peft_rank_zero_is_refused_as_not_positive",
            F + "test_diffusers_file_loads_in_real_diffusers", R + "test_two_formats_in_one_file_are_named_as_such"]
_RUNTIME = [R + "test_runtime_mixed_dtype_branch_applies_strength", R + "test_runtime_under_autocast_applies_strength",
            R + "test_merge_lora_twice_then_unmerge_restores_bit_for_bit",
            "tests/test_runtime.py::test_fastvideo_style_layers_returning_tuples",
            "tests/test_runtime.py::test_merge_is_fp32_cast_once_and_unmerge_bit_exact",
            "tests/test_runtime.py::test_missing_targets_raise_listing_them_and_touch_nothing",
            R + "test_runtime_default_strength_is_one",
            "tests/test_runtime.py::test_remove_restores_outputs_and_state_dict_exactly",
            "tests/test_int8_runtime.py::test_is_int8_layer_by_what_it_holds",
            "tests/test_int8_runtime.py::test_merge_into_int8_requantizes_reports_and_unmerges_bit_exact",
            "tests/test_int8_runtime.py::test_unadaptable_layer_is_named_with_the_reason",
            "tests/test_runtime.py::test_two_adapters_at_once_and_strengths"]
_MERGE = ["tests/test_merge.py::test_parse_lora_arg", "tests/test_merge.py::test_single_file_base_and_exact_fp32_merge",
          "tests/test_golden.py",
          "tests/test_merge.py::test_merge_math_fp32_cast_once_and_dtype_option",
          R + "test_merge_output_dtypes_and_values", "tests/test_merge.py::test_unmapped_lora_modules",
          "tests/test_merge.py::test_merged_checkpoint_reproduces_apply_lora[longcat]"]
_ALGEBRA = ["tests/test_numpy_kernels.py", "tests/test_algebra_resize.py"]
X = "tests/test_review_exact.py::"
P = "tests/test_reproducible.py::test_every_merged_element_is_correctly_rounded"
# apply/exact.py: each path on tiny crafted inputs against Fractions (1 s in all), the review's findings,
# its levels, then whole merges against the reference (the module fixture costs ~6 s once)
_EXACT = ["tests/test_exact_mutants.py", X + "test_an_exact_zero_is_plus_zero_whatever_the_summation_order",
          X + "test_float64_factors_too_small_for_their_squares_or_products",
          X + "test_just_below_the_overflow_threshold_rounds_to_the_largest_value",
          X + "test_strength_times_scale_that_rounds_in_float64_is_not_certified_exact",
          "tests/test_merge_exact_levels.py", P + "[bf16-keep]", P + "[fp32-keep]", P + "[fp16-keep]",
          P + "[fp32-bf16]", P + "[bf16-fp32]", P + "[fp64-keep]",
          "tests/test_reproducible.py::test_runtime_merge_lora_is_correctly_rounded_too",
          "tests/test_reproducible.py::test_bytes_do_not_depend_on_workers_chunks_threads_or_summation_order"]
SUBSETS = {
    "formats": _FORMATS,
    "model/adapter.py": _FORMATS + ["tests/test_lazy.py"],
    "model/sources.py": ["tests/test_numpy_kernels.py::test_cast_and_folded_match_torch_bit_for_bit"] + _FORMATS
    + [R + "test_layer_whose_first_rows_have_no_part_writes_the_zero_band", "tests/test_lazy.py"],
    "model/layout.py": _FORMATS + [R + "test_layer_whose_first_rows_have_no_part_writes_the_zero_band"],
    "model/naming.py": ["tests/test_fixtures_and_naming.py", "tests/test_runtime.py::test_split_and_fused_models_agree_and_convert"]
    + _FORMATS[:9] + _RUNTIME[3:5],
    "io": [E + "test_fastvideo_tensors_are_the_native_slices", E + "test_alpha_scale_shapes_and_dtypes",
              R + "test_bad_input_classes_in_process", R + "test_overlapping_data_offsets_are_refused", "tests/test_golden.py",
              "tests/test_fuzz.py", R + "test_failed_convert_leaves_existing_out_byte_identical",
              R + "test_out_equal_to_input_is_refused_by_resolved_path", F + "test_round_trip_bit_exact[dtype0-longcat]",
              R + "test_short_reads_are_resumed_at_the_right_offset",
              "tests/test_hostile.py::test_header_accepts_what_safetensors_accepts",
              "tests/test_hostile.py::test_header_hostile_values_are_refused_like_safetensors",
              "tests/test_faults.py::test_fifo_and_devices_as_input_are_not_regular_files",
              R + "test_zero_size_dimension_in_a_header_entry_the_fast_path_leaves",
              R + "test_zero_size_dimension_on_the_header_fast_path", R + "test_a_two_byte_pickle_is_named_a_pickle",
              R + "test_nonfinite_scan_of_an_empty_tensor_at_the_end_of_a_page_aligned_file",
              R + "test_input_swapped_for_a_fifo_after_the_type_check_never_hangs",
              R + "test_a_header_length_that_starts_like_a_pickle_is_still_safetensors",
           "tests/test_copy_scan.py", "tests/test_reader_property.py", "tests/test_durability.py"],
    "io/direct.py": ["tests/test_direct.py", "tests/test_durability.py"],
    "io/dtypes.py": ["tests/test_numpy_kernels.py"],  # + the io subset, below
    "algebra/cells.py": _ALGEBRA,
    "algebra/lowrank.py": _ALGEBRA,
    "algebra/combine.py": _ALGEBRA,
    "threads.py": ["tests/test_numpy_kernels.py", "tests/test_merge_workers.py"],
    "apply/runtime.py": _RUNTIME + ["tests/test_runtime_switching.py"],
    "apply/layers.py": _RUNTIME + ["tests/test_runtime_switching.py"],
    "apply/fuse.py": _RUNTIME + ["tests/test_runtime_switching.py"],
    "apply/targets.py": _RUNTIME[:5] + _MERGE[:3],
    "apply/merge.py": _MERGE,
    "apply/base_checkpoint.py": _MERGE,  # moved out of merge.py (issue 9): the subset it had there
    "apply/side_files.py": _MERGE,
    "apply/pipeline.py": _MERGE + ["tests/test_merge.py"],
    "apply/merge_compute.py": _MERGE + ["tests/test_merge_workers.py", "tests/test_direct.py", "tests/test_merge.py"],
    "apply/exact.py": _EXACT,
    "commands/verify.py": [R + "test_verify_when_the_two_sides_split_rows_differently",
                  R + "test_verify_reports_the_reference_relative_error",
                  "tests/test_cli.py::test_verify_exit_codes_and_worst_location"],
}


SUBSETS["io/dtypes.py"] += SUBSETS["io"]


def subset(path: str) -> list[str]:
    rel = path.removeprefix(PKG + "/")
    if rel in SUBSETS:
        return SUBSETS[rel]
    return SUBSETS["formats"] if rel.startswith("formats/") else SUBSETS["io"] if rel.startswith("io/") else SUBSETS[rel]


@dataclass
class Mutant:
    path: str  # relative to the repository root
    where: str  # the function (#n: the n-th such mutation in it), stable while lines move
    what: str  # "old -> new [source]"
    source: str  # the whole mutated file
    hand: bool = False
    line: int = 0

    @property
    def id(self) -> str:
        return f"{self.path.removeprefix(PKG + '/')}:{self.where}: {self.what}"


# ------------------------------------------------------------------ hand-made mutants (issue 8)

HAND = [  # (file, exact old text, new text, the bug it stands for)
    ("model/sources.py", "x = decode(src.raw(), src.dtype, np.empty(src.shape, np.float64))",
     "x = decode(src.raw(), src.dtype, np.empty(src.shape, np.float32))", "fold a scale into lora_B in fp32, not fp64"),
    ("formats/fastvideo.py", "return a / rank if a else 1.0", "return a / rank if a else 0.0",
     "FastVideo lora_alpha < 1 read as scale 0"),
    ("formats/fastvideo.py", "    a = int(alpha)\n", "    a = alpha\n", "FastVideo lora_alpha not truncated"),
    ("formats/fastvideo.py", "and int(alpha) != 0\n", "\n", "FastVideo writer keeps lora_alpha < 1"),
    ("apply/merge_compute.py", "out = self._out(job, slot).view(torch_dtype(job.out_dtype))",
     "out = self._out(job, slot).view(torch_dtype('F32'))", "merge computes touched weights into F32 bytes"),
    ("apply/merge.py", '"fp16": "F16"', '"fp16": "BF16"', "merge --dtype fp16 mapped to bf16"),
    ("apply/layers.py", "dst += (hb @ b.up.T).to(y.dtype) * (b.scale * s)", "dst += (hb @ b.up.T).to(y.dtype) * b.scale",
     "runtime mixed-dtype branch ignores strength"),
    ("apply/fuse.py", "if u.layer not in originals:", "if True:", "second merge_lora overwrites the saved originals"),
    ("io/outputs.py", "tmp = _create_temp(parent, base, directory)", "tmp = out if not directory else _create_temp(parent, base, directory)",
     "file output written straight to OUT"),
    ("io/outputs.py", "real_out = os.path.realpath(out)", "real_out = out", "OUT == input compared as strings (out)"),
    ("io/outputs.py", "real_in = os.path.realpath(p)", "real_in = p", "OUT == input compared as strings (input)"),
    ("io/reader.py", "if info.start != end:\n                what = (", "if info.start > end:\n                what = (",
     "header parser accepts overlapping data_offsets"),
    ("formats/_common.py", "for i in infos if i.alpha != alpha}", "for i in infos if i.alpha != alpha and i.rank != r}",
     "PEFT alpha_pattern omitted at the default rank"),
]


def hand_mutants(tree: str) -> tuple[list[Mutant], list[str]]:
    out, stale = [], []
    for rel, old, new, why in HAND:
        path = f"{PKG}/{rel}"
        src = open(os.path.join(tree, path)).read()
        if src.count(old) != 1:
            stale.append(f"{rel}: {why} (text not found once; the code changed)")
            continue
        out.append(Mutant(path, "hand", why, src.replace(old, new), hand=True))
    return out, stale


# ------------------------------------------------------------------ generated mutants

CMP = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
       ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
       ast.Mod: ast.FloorDiv, ast.LShift: ast.RShift, ast.RShift: ast.LShift, ast.BitAnd: ast.BitOr,
       ast.BitOr: ast.BitAnd}
STRINGS = {"F64": "F32", "F32": "F64", "F16": "BF16", "BF16": "F16"}
ATTRS = {"float64": "float32", "float32": "float64"}
SYM = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.In: "in",
       ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Add: "+", ast.Sub: "-", ast.Mult: "*",
       ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&",
       ast.BitOr: "|", ast.And: "and", ast.Or: "or"}


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes inside docstrings, annotations, f-strings/messages and raise statements' messages."""
    skip: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            mark(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for d in node.decorator_list:  # @dataclass(frozen=True, ...)
                mark(d)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            mark(node.returns)
            for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
                mark(a.annotation)
        elif isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        elif isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            for a in node.exc.args:  # the message; the exception type and `from` stay mutable
                mark(a)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "print", "append") and any(isinstance(a, ast.JoinedStr) for a in node.args):
            mark(node)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                mark(first)
    return skip


def _functions(tree: ast.AST) -> dict[int, str]:
    """line -> innermost function (or class) name."""
    where: dict[int, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                if line not in where or node.lineno > where[line][1]:
                    where[line] = (node.name, node.lineno)
    return {k: v[0] for k, v in where.items()}


def generated_mutants(tree_dir: str, rel: str) -> list[Mutant]:
    path = f"{PKG}/{rel}"
    text = open(os.path.join(tree_dir, path)).read()
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for ln in lines:
        offsets.append(offsets[-1] + len(ln))
    tree = ast.parse(text)
    skip = _skipped_nodes(tree)
    funcs = _functions(tree)
    out: list[Mutant] = []
    seen: dict[str, int] = {}

    def pos(line: int, col: int) -> int:
        # ast columns are UTF-8 byte offsets
        return offsets[line - 1] + len(lines[line - 1].encode()[:col].decode())

    def add(node: ast.AST, start: int, end: int, new: str, what: str) -> None:
        old = text[start:end]
        func = funcs.get(node.lineno, "<module>")
        key = f"{func}: {what}"
        seen[key] = seen.get(key, 0) + 1
        label = f"{func}#{seen[key]}" if seen[key] > 1 else func
        snippet = lines[node.lineno - 1].strip()[:70]
        out.append(Mutant(path, label, f"{what} [{snippet}]", text[:start] + new + text[end:], line=node.lineno))

    def between(a: ast.AST, b: ast.AST) -> tuple[int, int]:
        return pos(a.end_lineno, a.end_col_offset), pos(b.lineno, b.col_offset)

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for i, op in enumerate(node.ops):
                if type(op) not in CMP:
                    continue
                s, e = between(operands[i], operands[i + 1])
                seg = text[s:e]
                sym = SYM[type(op)]
                k = seg.find(sym if sym[0].isalpha() else sym)
                if k < 0:
                    continue
                new_sym = SYM[CMP[type(op)]]
                add(node, s, e, seg[:k] + new_sym + seg[k + len(sym):], f"{sym} -> {new_sym}")
        elif isinstance(node, ast.BinOp) and type(node.op) in BIN:
            s, e = between(node.left, node.right)
            seg = text[s:e]
            sym = SYM[type(node.op)]
            k = seg.find(sym)
            if k < 0 or seg.strip().startswith(")") and sym not in seg:
                continue
            if isinstance(node.left, ast.Constant) and isinstance(node.left.value, str):
                continue  # string building
            new_sym = SYM[BIN[type(node.op)]]
            add(node, s, e, seg[:k] + new_sym + seg[k + len(sym):], f"{sym} -> {new_sym}")
        elif isinstance(node, ast.AugAssign) and type(node.op) in (ast.Add, ast.Sub):
            s, e = pos(node.target.end_lineno, node.target.end_col_offset), pos(node.value.lineno, node.value.col_offset)
            seg = text[s:e]
            sym = SYM[type(node.op)] + "="
            new = SYM[BIN[type(node.op)]] + "="
            if sym in seg:
                add(node, s, e, seg.replace(sym, new, 1), f"{sym} -> {new}")
        elif isinstance(node, ast.BoolOp):
            for a, b in zip(node.values, node.values[1:]):
                s, e = between(a, b)
                seg = text[s:e]
                sym = SYM[type(node.op)]
                new = "or" if sym == "and" else "and"
                k = seg.find(sym)
                if k >= 0:
                    add(node, s, e, seg[:k] + new + seg[k + len(sym):], f"{sym} -> {new}")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            s, e = pos(node.lineno, node.col_offset), pos(node.operand.lineno, node.operand.col_offset)
            add(node, s, e, "", "drop not")
        elif isinstance(node, ast.Constant) and node.lineno == node.end_lineno:
            s, e = pos(node.lineno, node.col_offset), pos(node.end_lineno, node.end_col_offset)
            v = node.value
            if isinstance(v, bool):
                add(node, s, e, str(not v), f"{v} -> {not v}")
            elif isinstance(v, int) and -2 <= v <= 64:
                add(node, s, e, str(v + 1), f"{v} -> {v + 1}")
            elif isinstance(v, float) and v in (0.0, 1.0, 0.5):
                add(node, s, e, repr(1.0 - v if v != 0.5 else 0.25), f"{v} -> {1.0 - v if v != 0.5 else 0.25}")
            elif isinstance(v, str) and v in STRINGS and text[s] in "\"'":
                add(node, s, e, f'"{STRINGS[v]}"', f"{v} -> {STRINGS[v]}")
        elif isinstance(node, ast.Attribute) and node.attr in ATTRS and getattr(node.value, "id", "") == "torch":
            s, e = pos(node.end_lineno, node.end_col_offset) - len(node.attr), pos(node.end_lineno, node.end_col_offset)
            add(node, s, e, ATTRS[node.attr], f"torch.{node.attr} -> torch.{ATTRS[node.attr]}")
    good = []
    for m in out:  # drop mutants that do not parse (e.g. a sign inside a literal)
        try:
            ast.parse(m.source)
        except SyntaxError:
            continue
        good.append(m)
    return good


# ------------------------------------------------------------------ equivalent mutants (reviewed by hand)

EQUIVALENT: dict[str, str] = {}  # filled in from tools/mutation_equivalent.txt: "<id prefix> | reason"


def _load_equivalent() -> None:
    path = os.path.join(ROOT, "tools", "mutation_equivalent.txt")
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#") and " | " in line:
                k, reason = line.split(" | ", 1)
                EQUIVALENT[k.strip()] = reason.strip()


def equivalent(m: Mutant) -> str | None:
    for k, reason in EQUIVALENT.items():
        if m.id.startswith(k):
            return reason
    return None


# ------------------------------------------------------------------ running

def copy_tree(rev: str | None) -> str:
    """src/ (of the working tree, or of git revision `rev`) and the working tree's tests/, in a temp dir."""
    tmp = tempfile.mkdtemp(prefix="mutation.")
    dirs = ["tests"]
    if rev:
        arch = subprocess.run(["git", "-C", ROOT, "archive", rev, "src"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=arch, check=True)
    else:
        dirs.append("src")
    for d in dirs:
        shutil.copytree(os.path.join(ROOT, d), os.path.join(tmp, d),
                        ignore=shutil.ignore_patterns("__pycache__", ".hypothesis", "*.pyc"))
    return tmp


def run_tests(tree: str, tests: list[str], timeout: float) -> tuple[str, float, str]:
    env = {**os.environ, "PYTHONPATH": os.path.join(tree, "src"), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                            "--hypothesis-seed=0", *tests], cwd=tree, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t0, ""
    dt = time.monotonic() - t0
    failed = [ln for ln in p.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return ("survived" if p.returncode == 0 else "killed"), dt, (failed[0] if failed else p.stdout[-300:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hand", action="store_true", help="only the hand-made mutants")
    ap.add_argument("--no-hand", action="store_true", help="only generated mutants")
    ap.add_argument("--sample", type=int, default=120, help="generated mutants to run (0: all); default 120")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help="only mutants of this core file (e.g. io/reader.py, formats/peft.py)")
    ap.add_argument("--rev", help="mutate src/ of this git revision instead of the working tree's (tests: the working tree's)")
    ap.add_argument("--tests", nargs="+", help="run these tests for every mutant instead of the module's subset")
    ap.add_argument("--budget", type=float, default=1800, help="stop starting mutants after this many seconds")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--match", nargs="+", help="only mutants whose id contains one of these strings (e.g. to "
                    "rerun the survivors of a run after adding tests)")
    args = ap.parse_args(argv)
    _load_equivalent()

    tree = copy_tree(args.rev)
    try:
        mutants, stale = hand_mutants(tree)
        if args.no_hand:
            mutants = []
        for s in stale:
            print(f"hand mutant skipped: {s}")
        generated: list[Mutant] = []
        if not args.hand:
            for rel in CORE:
                generated += generated_mutants(tree, rel)
        if args.match:
            keep = lambda m: any(x in m.id for x in args.match)  # noqa: E731
            mutants = [m for m in mutants if keep(m)]
            generated = [m for m in generated if keep(m)]
        if args.only:
            mutants = [m for m in mutants if m.path.endswith(args.only)]
            generated = [m for m in generated if m.path.endswith(args.only)]
        total_generated = len(generated)
        if args.sample and len(generated) > args.sample:
            # stratified by file: each file its share of the sample, at least one mutant
            rng = random.Random(args.seed)
            by_file: dict[str, list[Mutant]] = {}
            for m in generated:
                by_file.setdefault(m.path, []).append(m)
            picked = []
            for path, ms in by_file.items():
                k = max(1, round(args.sample * len(ms) / len(generated)))
                picked += rng.sample(ms, min(k, len(ms)))
            generated = picked
        mutants += generated
        print(f"{len(mutants)} mutants ({len(mutants) - len(generated)} hand-made, {len(generated)} of "
              f"{total_generated} generated{', a seeded sample' if len(generated) < total_generated else ''})")
        if args.list:
            for m in mutants:
                print(("  [equivalent] " if equivalent(m) else "  ") + m.id)
            return 0

        baseline: dict[tuple[str, ...], float] = {}
        results: list[tuple[Mutant, str, float, str]] = []
        start = time.monotonic()
        for i, m in enumerate(mutants):
            if time.monotonic() - start > args.budget:
                print(f"budget of {args.budget:.0f} s spent: {len(mutants) - i} mutants not run")
                break
            tests = tuple(args.tests or subset(m.path))
            if tests not in baseline:
                status, dt, info = run_tests(tree, list(tests), timeout=900)
                if status != "survived":
                    print(f"the unmutated tree fails its subset {tests}: {info}")
                    return 2
                baseline[tests] = dt
                print(f"baseline {dt:.0f} s for {m.path.removeprefix(PKG + '/')}'s subset")
            target = os.path.join(tree, m.path)
            original = open(target).read()
            try:
                with open(target, "w") as f:
                    f.write(m.source)
                status, dt, info = run_tests(tree, list(tests), timeout=4 * baseline[tests] + 60)
            finally:
                with open(target, "w") as f:
                    f.write(original)
            eq = equivalent(m)
            if status == "survived" and eq:
                status = "equivalent"
            results.append((m, status, dt, info))
            print(f"[{i + 1}/{len(mutants)}] {status:10s} {dt:5.1f}s  {m.id}" + (f" (line {m.line})" if m.line else "")
                  + (f"\n      killed by {info}" if status == "killed" and m.hand else ""), flush=True)
        n = len(results)
        killed = sum(1 for _, s, _, _ in results if s in ("killed", "timeout"))
        timeouts = sum(1 for _, s, _, _ in results if s == "timeout")
        eqv = sum(1 for _, s, _, _ in results if s == "equivalent")
        survivors = [m for m, s, _, _ in results if s == "survived"]
        print(f"\n{n} mutants run in {time.monotonic() - start:.0f} s: {killed} killed ({timeouts} by timeout), {eqv} equivalent, "
              f"{len(survivors)} survived")
        if n - eqv:
            print(f"score: {killed}/{n - eqv} = {100 * killed / (n - eqv):.1f}% of non-equivalent mutants killed")
        for m in survivors:
            print(f"  SURVIVED {m.id} (line {m.line})")
        return 0 if not survivors else 1
    finally:
        shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
