"""Generate the reference parts of docs/ from the code, so that they cannot drift from it.

    .venv/bin/python tools/gen_docs.py           # rewrite the generated regions of docs/cli.md, python-api.md, formats.md
    .venv/bin/python tools/gen_docs.py --check   # only say which regions are stale (exit 1); tests/test_docs.py

docs/cli.md's command reference comes from the argparse definitions (`commands.cli.build_parser`): one
region per subcommand with its synopsis and every argument (help text, choices, default); docs/python-api.md's
reference comes from `longcat_lora.__all__`: every public name's signature and docstring, and the classes
the public functions return; docs/formats.md's naming tables come from the naming table itself
(`model/naming.py`: `TABLE`, `OTHER_PARAMS`). A generated region is everything between

    <!-- BEGIN GENERATED <region> (tools/gen_docs.py: do not edit by hand) -->
    <!-- END GENERATED <region> -->

Everything outside the regions is written by hand and kept as it is. A subcommand with no region yet gets
one appended at the end of docs/cli.md (move it, with a heading, where it belongs); a region whose
subcommand is gone is an error, named.
"""

from __future__ import annotations

import argparse
import enum
import inspect
import os
import re
import sys
import typing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_DOC = os.path.join(ROOT, "docs", "cli.md")
API_DOC = os.path.join(ROOT, "docs", "python-api.md")
FORMATS_DOC = os.path.join(ROOT, "docs", "formats.md")
REGION = re.compile(r"<!-- BEGIN GENERATED (?P<name>\S+) \(tools/gen_docs.py: do not edit by hand\) -->\n"
                    r"(?P<body>.*?)<!-- END GENERATED (?P=name) -->\n", re.S)
WIDTH = 100  # signatures are wrapped at this many characters

if os.path.join(ROOT, "src") not in sys.path:  # a checkout without the package installed (the mutation tool's copy)
    sys.path.insert(0, os.path.join(ROOT, "src"))


def begin(name: str) -> str:
    return f"<!-- BEGIN GENERATED {name} (tools/gen_docs.py: do not edit by hand) -->\n"


def end(name: str) -> str:
    return f"<!-- END GENERATED {name} -->\n"


def _md(text: str) -> str:
    """Text for a Markdown table cell: pipes escaped, '<' kept from being read as HTML, one line."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")


# ----------------------------------------------------------------------------------- the command line

def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _value(a: argparse.Action) -> str:
    """How an option's value is written: its metavar, its choices, or its name in capitals."""
    if a.nargs == 0:
        return ""
    if a.metavar is not None:
        return str(a.metavar)
    if a.choices is not None:
        return "{" + ",".join(map(str, a.choices)) + "}"
    return a.dest.upper()


def _spelled(a: argparse.Action) -> str:
    if not a.option_strings:
        return _value(a)
    flag = max(a.option_strings, key=len)  # --long over -s
    value = _value(a)
    return f"{flag} {value}" if value else flag


def _synopsis(prog: str, parser: argparse.ArgumentParser) -> str:
    words = [prog]
    for a in _arguments(parser):
        s = _spelled(a)
        if not a.option_strings:
            words.append({"?": f"[{s}]", "*": f"[{s} ...]", "+": f"{s} [{s} ...]"}.get(a.nargs, s))
            continue
        words.append(s if a.required else f"[{s}]")
        if isinstance(a, argparse._AppendAction):
            words.append(f"[{max(a.option_strings, key=len)} ...]")
    if _subparsers(parser) is not None:
        words.append("COMMAND ...")
    lines, line = [], ""
    for w in words:  # wrapped with shell continuations, like the examples
        if line and len(line) + 1 + len(w) > WIDTH - 2:
            lines.append(line + " \\")
            line = " " * (len(prog) + 1) + w
        else:
            line = f"{line} {w}" if line else w
    return "\n".join(lines + [line])


def _default(a: argparse.Action) -> str:
    if a.required:
        return "required" + (", repeatable" if isinstance(a, argparse._AppendAction) else "")
    if isinstance(a, argparse._AppendAction):
        return "repeatable"
    if not a.option_strings or a.default in (None, False, argparse.SUPPRESS) or a.nargs == 0:
        return ""
    return f"`{a.default}`"


def _cli_region(prog: str, parser: argparse.ArgumentParser, summary: str | None) -> str:
    out = []
    if summary:
        out += [summary[0].upper() + summary[1:] + ".", ""]
    out += ["```text", _synopsis(prog, parser), "```", ""]
    rows = [a for a in _arguments(parser)]
    if rows:
        out += ["| argument | default | meaning |", "|---|---|---|"]
        for a in rows:
            meaning = a.help or ""
            if isinstance(a, argparse._VersionAction):
                meaning = meaning or "print the version and exit"
            if a.choices is not None and a.metavar is not None:
                meaning += f" (one of {', '.join(map(str, a.choices))})"
            out.append(f"| `{_md(_spelled(a))}` | {_default(a)} | {_md(meaning)} |")
        out.append("")
    return "\n".join(out)


def cli_regions() -> dict[str, str]:
    """Region name -> generated Markdown: `cli:longcat-lora` (the options before the command) and
    `cli:<command>` for every subcommand, in the parser's order."""
    from longcat_lora.commands.cli import build_parser

    parser = build_parser()
    prog = parser.prog
    regions = {f"cli:{prog}": _cli_region(prog, parser, None)}
    sub = _subparsers(parser)
    helps = {c.dest: c.help for c in sub._choices_actions}
    for name, sp in sub.choices.items():
        regions[f"cli:{name}"] = _cli_region(f"{prog} {name}", sp, helps.get(name))
    return regions


# ----------------------------------------------------------------------------------- the Python API

GROUPS = [  # sections of docs/python-api.md's reference; a public name in none lands in "Other"
    ("Reading, writing, converting", ["load_lora", "save_lora", "convert", "detect_format", "FORMATS"]),
    ("Applying to a live model", ["apply_lora", "set_lora_strength", "enable_loras", "disable_loras",
                                  "set_adapters", "active_loras", "list_loras", "remove_lora", "merge_lora",
                                  "unmerge_lora"]),
    ("Merging into a checkpoint", ["merge_checkpoint"]),
    ("LoRA algebra", ["resize_lora", "combine_loras", "extract_lora", "plot_lora"]),
    ("The data model", ["LoraAdapter", "LoraModule", "Part"]),
    ("Errors", ["LoraError"]),
    ("Version", ["__version__"]),
]
DATA = {  # what a public name that is neither a function nor a class holds (a value has no docstring)
    "FORMATS": "Every registered format, name -> `Format`, read-only, in registration order (a format "
               "registered with `longcat_lora.formats.register` appears here and in the CLI's `--to`).",
    "__version__": "The package version.",
}


def _annotation(a: object) -> str:
    if a is inspect.Parameter.empty:
        return ""
    return a if isinstance(a, str) else inspect.formatannotation(a)


def _signature(name: str, obj: object) -> str:
    """`name(params) -> return`, annotations as written in the source, wrapped at WIDTH."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{name}(...)"
    params, star = [], False
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        if p.kind is p.VAR_POSITIONAL:
            star = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        ann = _annotation(p.annotation)
        if ann:
            text += f": {ann}"
        if p.default is not p.empty:
            d = p.default
            d = f"{type(d).__name__}.{d.name}" if isinstance(d, enum.Enum) else repr(d)
            text += f" = {d}" if ann else f"={d}"
        params.append(text)
        if p.kind is p.POSITIONAL_ONLY and (len(params) == len(sig.parameters)
                                             or list(sig.parameters.values())[len(params)].kind is not p.POSITIONAL_ONLY):
            params.append("/")
    ret = _annotation(sig.return_annotation)
    tail = f") -> {ret}" if ret else ")"
    one = f"{name}({', '.join(params)}{tail}"
    if len(one) <= WIDTH:
        return one
    lines, line, indent = [], f"{name}(", " " * (len(name) + 1)
    for i, p in enumerate(params):
        piece = p + ("," if i < len(params) - 1 else tail)
        if line.strip() and line != f"{name}(" and len(line) + 1 + len(piece) > WIDTH:
            lines.append(line.rstrip())
            line = indent + piece
        else:
            line = line + (" " if line != f"{name}(" else "") + piece
    return "\n".join(lines + [line])


def _doc(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    # Markdown: a bare '<' would start an HTML tag; the docstrings' own backticks are already Markdown
    return re.sub(r"(`[^`]*`)|<", lambda m: m.group(1) or "&lt;", doc)


def _members(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties a class defines itself, in source order."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            out.append((name, value))
    return out


def _class_block(name: str, cls: type, level: str) -> list[str]:
    sig = _signature(f"class {name}", cls).removesuffix(" -> None")
    out = [f"{level} `{name}`", "", "```python", sig, "```", ""]
    doc = _doc(cls)
    if doc and not doc.startswith(f"{name}("):  # a dataclass's generated docstring repeats the signature
        out += [doc, ""]
    for m, value in _members(cls):
        if isinstance(value, property):
            out.append(f"- `{name}.{m}` (property)" + (f": {_doc(value)}" if _doc(value) else ""))
        else:
            sig = _signature(f"{name}.{m}", value).replace("(self, ", "(").replace("(self)", "()")
            doc = _doc(value)
            out.append(f"- `{' '.join(sig.split())}`" + (f": {doc}" if doc else ""))
        out[-1] = "\n".join(line.rstrip() for line in out[-1].replace("\n", "\n  ").split("\n"))
    if _members(cls):
        out.append("")
    return out


def _returned_classes(fn: object) -> list[tuple[str, type]]:
    """Classes of this package named in a function's return annotation (MergeReport, Report, ...)."""
    ann = _annotation(inspect.signature(fn).return_annotation)
    found = []
    for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", ann):
        obj = getattr(sys.modules[fn.__module__], word, None)
        if inspect.isclass(obj) and obj.__module__.startswith("longcat_lora"):
            found.append((word, obj))
    return found


def api_regions() -> dict[str, str]:
    """`api:reference`: every name of `longcat_lora.__all__` by group, then the classes they return."""
    import longcat_lora as L

    public = list(L.__all__)
    grouped = [(title, [n for n in names if n in public]) for title, names in GROUPS]
    rest = [n for n in public if all(n not in names for _, names in GROUPS)]
    if rest:
        grouped.append(("Other", rest))
    out, returned = [], {}
    for title, names in grouped:
        if not names:
            continue
        out += [f"### {title}", ""]
        for n in names:
            obj = getattr(L, n)
            if inspect.isclass(obj):
                out += _class_block(n, obj, "####")
            elif callable(obj):
                out += [f"#### `{n}`", "", "```python", _signature(n, obj), "```", ""]
                doc = _doc(obj)
                if doc:
                    out += [doc, ""]
                for rn, rc in _returned_classes(obj):
                    if rn not in public:
                        returned.setdefault(rn, (rc, []))[1].append(n)
            else:
                value = list(obj) if isinstance(obj, typing.Mapping) else obj
                out += [f"#### `{n}`", "", DATA.get(n, ""), "",
                        f"Now: `{value!r}`" if not isinstance(obj, typing.Mapping)
                        else "Now: " + ", ".join(f"`{k}`" for k in value) + ".", ""]
    if returned:
        out += ["### Returned types", "",
                "Not importable from `longcat_lora` itself; what the functions above return.", ""]
        for rn in sorted(returned):
            rc, by = returned[rn]
            block = _class_block(rn, rc, "####")
            block[1:1] = ["", f"`{rc.__module__}.{rn}`, returned by " + ", ".join(f"`{b}`" for b in by) + "."]
            out += block
    return {"api:reference": "\n".join(out)}


# ----------------------------------------------------------------------------------- the naming table

def _names(templates) -> str:
    """A module's layer names in one scheme, block index as N: `a` / `b` / `c` (shared prefix written once)."""
    if not templates:
        return "—"
    names = [t.replace("{i}", "N") for t in templates]
    if len(names) == 1:
        return f"`{names[0]}`"
    head = names[0].rpartition(".")[0] + "."
    if all(n.startswith(head) for n in names):
        return f"`{names[0]}`" + "".join(f" / `{n[len(head):]}`" for n in names[1:])
    return " / ".join(f"`{n}`" for n in names)


def naming_regions() -> dict[str, str]:
    """`naming:modules` (every LoRA-targetable Linear in the three schemes, with its shape) and `naming:other`
    (the base checkpoint's other tensors), from `longcat_lora.model.naming`."""
    from longcat_lora.model import naming

    rows = ["| module kind | LongCat-Video (official, canonical) | FastVideo | ComfyUI-WanVideoWrapper | "
            "shape (out × in) |", "|---|---|---|---|---|"]
    for k in naming.TABLE:
        out = f"{k.chunks}·{k.out}" if k.chunks > 1 else k.out
        kind = f"`{k.kind}`" + (" (Avatar)" if k.avatar else "")
        rows.append(f"| {kind} | {_names(k.templates(naming.Scheme.LONGCAT))} | "
                    f"{_names(k.templates(naming.Scheme.FASTVIDEO))} | {_names(k.templates(naming.Scheme.WANVIDEO))} "
                    f"| {out} × {k.inp} |")
    other = ["| LongCat-Video (official) | FastVideo | ComfyUI-WanVideoWrapper |", "|---|---|---|"]
    for row in naming.OTHER_PARAMS:
        other.append("| " + " | ".join("—" if n is None else f"`{n.replace('{i}', 'N')}`" for n in row) + " |")
    return {"naming:modules": "\n".join(rows) + "\n", "naming:other": "\n".join(other) + "\n"}


# ----------------------------------------------------------------------------------- regions in files

def regions_in(text: str) -> dict[str, str]:
    return {m.group("name"): m.group("body") for m in REGION.finditer(text)}


def render(text: str, regions: dict[str, str], *, append_missing: bool) -> tuple[str, list[str]]:
    """`text` with every generated region replaced by its new body; returns it and the problems found
    (regions in the text that nothing generates). Missing regions are appended when `append_missing`,
    else listed as problems."""
    problems = []
    seen = set()

    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in regions:
            problems.append(f"region {name} is generated by nothing (a subcommand removed? delete the region)")
            return m.group(0)
        seen.add(name)
        return begin(name) + regions[name].rstrip("\n") + "\n\n" + end(name)

    text = REGION.sub(sub, text)
    for name in regions:
        if name not in seen:
            if append_missing:
                title = name.split(":", 1)[1]
                text = text.rstrip("\n") + f"\n\n## {title}\n\n" + begin(name) + regions[name].rstrip("\n") + "\n\n" + end(name)
            else:
                problems.append(f"region {name} is missing")
    return text, problems


def targets() -> list[tuple[str, object]]:
    return [(CLI_DOC, cli_regions), (API_DOC, api_regions), (FORMATS_DOC, naming_regions)]


def stale() -> list[str]:
    """What is out of date, one line each (empty: the generated docs match the code)."""
    out = []
    for path, gen in targets():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new, problems = render(text, gen(), append_missing=False)
        rel = os.path.relpath(path, ROOT)
        out += [f"{rel}: {p}" for p in problems]
        if new != text:
            now, want = regions_in(text), regions_in(new)
            out += [f"{rel}: region {n} differs from the code" for n in want if now.get(n) != want[n]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a generated region is stale")
    args = ap.parse_args(argv)
    if args.check:
        problems = stale()
        for p in problems:
            print(p)
        if problems:
            print("run: .venv/bin/python tools/gen_docs.py")
        return 1 if problems else 0
    status = 0
    for path, gen in targets():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new, problems = render(text, gen(), append_missing=True)
        for p in problems:
            print(f"{os.path.relpath(path, ROOT)}: {p}")
            status = 1
        if new != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
            print(f"rewrote {os.path.relpath(path, ROOT)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
