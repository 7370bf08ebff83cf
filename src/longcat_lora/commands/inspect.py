"""`inspect`: what a LoRA file holds, and how it fits the LongCat-Video DiT."""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict

from ..model import naming
from ..model.adapter import LoraAdapter, Naming
from ..errors import q
from ..formats import load_lora
from ..io.reader import FileRange


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


def _missing(idx: list[int], depth: int) -> str:
    """The indices in range(depth) not in sorted `idx`, as ranges ("3-5, 9"); time linear in idx."""
    out, nxt = [], 0
    for i in idx + [depth]:
        if i > nxt:
            out.append(f"{nxt}" if i - 1 == nxt else f"{nxt}-{i - 1}")
        nxt = max(nxt, i + 1)
    return ", ".join(out)


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)


def infer_dims(adapter: LoraAdapter) -> naming.DitDims:
    """The DiT sizes a LoRA's module shapes imply (official values where the file says nothing).

    Each size is the one most modules state; which modules state which size comes from the naming
    table (`ModuleKind.reveals`), so a kind added there is counted here with no other change.
    """
    found: dict[str, Counter] = defaultdict(Counter)
    depth = 0
    for m in adapter.modules.values():
        kind = naming.kind_of(m.name)
        if kind is None:
            continue
        k, i = kind
        if i is not None:
            depth = max(depth, i + 1)
        for field, size in k.reveals(m.out_features, m.in_features):
            found[field][size] += 1
    o = naming.OFFICIAL
    pick = {f: (found[f].most_common(1)[0][0] if found[f] else getattr(o, f))
            for f in naming.dims_named(False) + naming.dims_named(True)}
    official = all(pick[f] == getattr(o, f) for f in naming.dims_named(False))
    # a LoRA for the official sizes is judged against the official 48 blocks, whatever it covers
    return naming.DitDims(depth=max(depth, o.depth) if official else (depth or o.depth), **pick)


def _sizes(dims: naming.DitDims, avatar: bool) -> str:
    """'hidden 4096, ffn 11008, ...': the sizes the table's shapes name, base DiT's or Avatar's own."""
    return ", ".join(f"{f} {getattr(dims, f)}" for f in naming.dims_named(avatar))


def _same(dims: naming.DitDims, avatar: bool) -> bool:
    """True if dims has the official sizes (the base DiT's, or the Avatar modules' own)."""
    return all(getattr(dims, f) == getattr(naming.OFFICIAL, f) for f in naming.dims_named(avatar))


_SCHEMES = {"longcat": "LongCat's original names", "fastvideo": "FastVideo's names",
            "wanvideo": "ComfyUI-WanVideoWrapper's Wan-style names", "kohya": "names with underscores for dots (kohya's lora_unet_)"}


def naming_of(a: LoraAdapter) -> str:
    """Which names the file's layers are in, from the schemes its readers counted (names every scheme
    shares, like ffn.w1, say nothing)."""
    seen = [s for s in ("longcat", "fastvideo", "wanvideo", "kohya") if a.schemes.get(s)]
    if not seen:
        return "LongCat's original names" if a.schemes.get("shared") else "no known names"
    return " and ".join(_SCHEMES[s] for s in seen) + (" (mixed)" if len(seen) > 1 else "")


def producer_of(a: LoraAdapter) -> list[str]:
    """What the content shows of who wrote the file (metadata, an adapter-name segment, names, alphas)."""
    meta: dict[str, str] = {}
    for f in a.files:
        meta.update(f.metadata or {})
    out = []
    base, arch = meta.get("ss_base_model_version"), meta.get("modelspec.architecture")
    if base or arch or meta.get("ss_network_module"):
        shown = ", ".join(f"{k} {v!r}" for k, v in (("ss_base_model_version", base), ("modelspec.architecture", arch))
                          if v)
        who = "musubi-tuner" if (base or "").startswith("longcat") or "LongCat" in (arch or "") else "a kohya-ss trainer"
        out.append(f"{who} ({shown or 'ss_* metadata'})")
    if a.hints.get("adapter") is not None:
        out.append(f"DiffSynth-Studio or another PEFT trainer (adapter-name segment {a.hints['adapter']!r}, "
                   f"prefix-free module paths)")
    if a.format == "wanvideo" and not out:
        out.append("diffusion-pipe, ComfyUI-WanVideoWrapper's tools or longcat-lora (the wrapper's Wan-style names)")
    if any(k.startswith("longcat_lora.") for k in meta):
        out.append("longcat-lora (its metadata)")
    return out


def inspect_lora(path: str, scan_values: bool = True) -> dict:
    """A JSON-able report: counts, ranks, scales, dtypes, coverage, and validation findings."""
    with load_lora(path) as a:
        keys = sum(len(f.keys()) for f in a.files)
        dtypes: Counter = Counter()
        nonfinite = []
        for f in a.files:
            for k, info in f.tensors.items():
                dtypes[info.dtype] += 1
                if scan_values and f.scan_nonfinite(FileRange(f.fd, info.start, info.nbytes), info.dtype):
                    nonfinite.append(k)
        params = sum(math.prod(i.shape) for f in a.files for i in f.tensors.values() if len(i.shape) == 2)
        ranks, scales, alphas = Counter(), Counter(), Counter()
        blocks_per_kind: dict[str, Counter] = defaultdict(Counter)
        coverage: dict[str, list[int]] = defaultdict(list)
        unknown, bad_shapes = [], []
        known = 0
        dims = infer_dims(a)
        for m in a.modules.values():
            for p in m.parts:
                ranks[p.rank] += 1
                scales[p.scale] += 1
            kind = naming.kind_of(m.name) if m.naming is Naming.LONGCAT else None
            if kind is None:
                unknown.append(m.name)
                continue
            known += 1
            k, i = kind
            blocks_per_kind[k.kind][len(m.parts)] += 1
            if i is not None:
                coverage[k.kind].append(i)
            expect = k.shape(dims)
            if (m.out_features, m.in_features) != expect:
                bad_shapes.append(f"{q(m.name)} [{m.out_features}, {m.in_features}] (expected {list(expect)})")
            for p in m.parts:
                alphas[p.scale * p.rank] += 1
        kinds = set(blocks_per_kind)
        audio_kinds = kinds & naming.avatar_kinds()
        looks = ("other" if unknown else "cfg_step-like" if kinds == naming.CFG_STEP_KINDS else
                 "refinement-like" if kinds == naming.REFINEMENT_KINDS else
                 "avatar-like" if audio_kinds and kinds - audio_kinds else "other")
        findings = []
        for kind, idx in sorted(coverage.items()):
            idx = sorted(set(idx))
            missing = _missing(idx, dims.depth)  # from the gaps: a file may name block 999999999
            if missing:
                findings.append(f"{kind}: blocks {missing} not covered (covers {_ranges(idx)})")
        if coverage and not any("not covered" in f for f in findings):
            findings.append(f"blocks 0-{dims.depth - 1} all covered by every module type present")
        if known and dims.depth != naming.OFFICIAL.depth:
            findings.append(f"depth {dims.depth} (the official DiT has {naming.OFFICIAL.depth} blocks)")
        off = naming.OFFICIAL
        if not known:
            findings.append("no module is a Linear layer of the LongCat-Video DiT in any naming known here: "
                            "nothing to compare with its sizes")
        elif _same(dims, False):
            findings.append(f"module sizes match the official LongCat-Video DiT ({_sizes(off, False)})")
        else:
            findings.append(f"module sizes imply a DiT of {_sizes(dims, False)}; the official one has "
                            f"{_sizes(off, False)}")
        if audio_kinds:
            n_audio = sum(1 for m in a.modules.values()
                          if m.naming is Naming.LONGCAT and (k := naming.kind_of(m.name)) and k[0].avatar)
            findings.append(
                f"{n_audio} modules are LongCat-Video-Avatar audio modules ({', '.join(sorted(audio_kinds))}): "
                + ("a LoRA for the Avatar DiT (base plus audio modules); " if kinds - audio_kinds else "")
                + f"their shapes are checked against the Avatar DiT ({_sizes(dims, True)}"
                + ("" if _same(dims, True) else f"; the official Avatar DiT: {_sizes(off, True)}")
                + "); FastVideo has no form for them")
        if bad_shapes:
            findings.append(f"{len(bad_shapes)} modules have unexpected shapes: " + "; ".join(bad_shapes[:5]))
        elif known:
            findings.append("every module's shape is consistent with that DiT")
        if unknown:
            hints = sorted({h for n in unknown if (h := naming.hint(n))})
            findings.append(f"{len(unknown)} modules are not modules of LongCat-Video or LongCat-Video-Avatar in any "
                            f"naming known here (convert, merge and apply refuse them unless told to skip them): "
                            + ", ".join(q(n) for n in sorted(unknown)[:5])
                            + (f" ({'; '.join(hints[:3])})" if hints else ""))
        findings += _loader_notes(a, kinds)
        if nonfinite:
            findings.append(f"{len(nonfinite)} tensors hold NaN/Inf: " + ", ".join(q(n) for n in nonfinite[:5]))
        return {
            "path": str(path),
            "format": a.format,
            "file_size": _size(path),
            "keys": keys,
            "modules": len(a.modules),
            "parameters": params,
            "ranks": {str(r): n for r, n in sorted(ranks.items())},
            "alpha_scales": {repr(s): n for s, n in sorted(scales.items())},
            "alphas": {repr(x): n for x, n in sorted(alphas.items())},
            "dtypes": dict(sorted(dtypes.items())),
            "up_blocks": {k: {str(n): c for n, c in sorted(v.items())} for k, v in sorted(blocks_per_kind.items())},
            "coverage": {k: _ranges(sorted(set(v))) for k, v in sorted(coverage.items())},
            "looks_like": looks,
            "naming": naming_of(a),
            "producer": producer_of(a),
            "dims": {**{f: getattr(dims, f) for f in naming.dims_named(False)}, "depth": dims.depth,
                     **({f: getattr(dims, f) for f in naming.dims_named(True)} if audio_kinds else {})},
            "notes": list(a.notes),
            "findings": findings,
            "nonfinite_tensors": nonfinite,
        }


def format_report(r: dict) -> str:
    def num(n: int) -> str:
        return f"{n:,}"

    lines = [
        f"{r['path']}",
        f"  format        {r['format']}  ({r['looks_like']})",
        f"  naming        {r['naming']}",
        *([f"  producer      {'; '.join(r['producer'])}"] if r["producer"] else []),
        f"  file size     {num(r['file_size'])} bytes",
        f"  keys          {num(r['keys'])}",
        f"  modules       {num(r['modules'])}",
        f"  parameters    {num(r['parameters'])}",
        "  rank per part " + ", ".join(f"{k} (x{v})" for k, v in r["ranks"].items()),
        "  alpha_scale   " + ", ".join(f"{k} (x{v})" for k, v in r["alpha_scales"].items()),
        "  alpha         " + ", ".join(f"{k} (x{v})" for k, v in r["alphas"].items()),
        "  dtypes        " + ", ".join(f"{k} (x{v})" for k, v in r["dtypes"].items()),
        "  up blocks per module type:",
    ]
    lines += [f"    {k:32s} " + ", ".join(f"{n} block(s) x{c}" for n, c in v.items()) for k, v in r["up_blocks"].items()]
    lines.append("  coverage (block indices):")
    lines += [f"    {k:32s} {v}" for k, v in r["coverage"].items()]
    if r["notes"]:
        lines.append("  notes:")
        lines += [f"    - {n}" for n in r["notes"]]
    lines.append("  findings:")
    lines += [f"    - {f}" for f in r["findings"]]
    return "\n".join(lines)


def _loader_notes(a: LoraAdapter, kinds: set[str]) -> list[str]:
    """What the file means to the loaders it looks made for."""
    notes = []
    fused = sorted(k for k in kinds if (kk := next((t for t in naming.TABLE if t.kind == k), None))
                   and kk.wanvideo and kk.wanvideo != (kk.longcat,))
    if a.format == "kohya" and a.schemes.get("longcat") and fused:
        applies = sorted(kinds - set(fused))
        notes.append(f"ComfyUI's LongCat model (ComfyUI-WanVideoWrapper) names {', '.join(fused)} otherwise and will "
                     f"not find them: loaded there, {'only ' + ', '.join(applies) if applies else 'none of its modules'} would apply "
                     f"(the rest is a console warning); `convert --to wanvideo` (or comfyui) writes its form. "
                     f"Wan2GP, DiffSynth-Studio and kohya-style loaders of the official model take this file as it is")
    if a.format == "wanvideo" and kinds & {"final_layer.linear", "final_layer.adaLN_modulation.1"}:
        notes.append("ComfyUI-WanVideoWrapper applies the final layer's modules (head.*) only with merge_loras on "
                     "(its default): its unmerged path skips every key containing 'head'")
    return notes


__all__ = ["inspect_lora", "format_report", "infer_dims", "naming_of", "producer_of"]
