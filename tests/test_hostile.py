"""Hostile input: malformed JSON in every reader, regex and header denial of service, names in messages.

Every refusal is checked the way a user sees it: exit 2, exactly one stderr line naming the file, no
"internal error", nothing written. The big matrices run `cli.main` in-process (the CLI's own entry
point, as test_fuzz does); one case per reader and every DoS case go through the real CLI subprocess.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import cli
from longcat_lora.commands.cli import main
from longcat_lora.errors import LoraError
from longcat_lora.formats.patterns import PatternTable

SEP = "___lorahyphen___"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


# ------------------------------------------------------------------ the four JSON readers


def _raw_safetensors(path, header: bytes | str, data: bytes = b"") -> str:
    raw = header.encode("utf-8") if isinstance(header, str) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def _dump(doc) -> str:
    return json.dumps(doc, separators=(",", ":"))


A = torch.arange(16, dtype=torch.float32).reshape(2, 8) / 8  # rank 2, 8 inputs
B = torch.arange(16, dtype=torch.float32).reshape(8, 2) / 4  # 8 outputs
PEFT_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 1, "target_modules": ["blocks.0.attn.proj"],
               "rank_pattern": {"blocks.0.attn.proj": 2}, "alpha_pattern": {"attn.proj": 3}, "use_rslora": False,
               "use_dora": False}
HEADER = {"__metadata__": {"format": "pt"},
          "blocks.0.self_attn.to_out.lora_A": {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, 64]},
          "blocks.0.self_attn.to_out.lora_B": {"dtype": "F32", "shape": [8, 2], "data_offsets": [64, 128]}}
INDEX = {"metadata": {"total_size": 256}, "weight_map": {"blocks.0.attn.proj.weight": "model-1.safetensors"}}
DIFFUSERS_META = {"transformer.r": 2, "transformer.lora_alpha": 1, "transformer.rank_pattern": {},
                  "transformer.alpha_pattern": {"blocks.0.attn.proj": 4}, "transformer.use_rslora": False}


class Reader:
    """Writes a case whose one JSON document is `doc`; `args` runs the CLI on it; `named` is in the error."""

    def __init__(self, tmp, name: str):
        self.tmp, self.name, self.n = tmp, name, 0

    def case(self, doc: bytes | str) -> tuple[list[str], str, str]:
        self.n += 1
        d = self.tmp / f"{self.name}{self.n}"
        d.mkdir()
        out = str(d / "out")
        if self.name == "peft":
            (d / "adapter").mkdir()
            save_file({"base_model.model.blocks.0.attn.proj.lora_A.weight": A,
                       "base_model.model.blocks.0.attn.proj.lora_B.weight": B},
                      str(d / "adapter" / "adapter_model.safetensors"))
            (d / "adapter" / "adapter_config.json").write_bytes(doc.encode() if isinstance(doc, str) else doc)
            return ["convert", str(d / "adapter"), out + ".safetensors", "--to", "fastvideo"], "adapter_config.json", out
        if self.name == "header":
            path = _raw_safetensors(d / "h.safetensors", doc, A.numpy().tobytes() + B.numpy().tobytes())
            return ["convert", path, out + ".safetensors", "--to", "longcat"], "h.safetensors", out
        if self.name == "index":
            (d / "base").mkdir()
            save_file({"blocks.0.attn.proj.weight": torch.ones(8, 8)}, str(d / "base" / "model-1.safetensors"))
            (d / "base" / "model.safetensors.index.json").write_bytes(doc.encode() if isinstance(doc, str) else doc)
            lora = str(d / "lora.safetensors")
            save_file({"blocks.0.self_attn.to_out.lora_A": A, "blocks.0.self_attn.to_out.lora_B": B}, lora)
            return ["merge", str(d / "base"), out, "--lora", lora], "model.safetensors.index.json", out
        assert self.name == "diffusers" and isinstance(doc, str)
        path = str(d / "diff.safetensors")
        save_file({"transformer.blocks.0.attn.proj.lora_A.weight": A, "transformer.blocks.0.attn.proj.lora_B.weight": B},
                  path, metadata={"format": "pt", "lora_adapter_metadata": doc})
        return ["convert", path, out + ".safetensors", "--to", "fastvideo"], "diff.safetensors", out


VALID = {"peft": PEFT_CONFIG, "header": HEADER, "index": INDEX, "diffusers": DIFFUSERS_META}


def run_main(capsys, args: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, named: str, out: str, what) -> None:
    """Exit 2, one line naming the file, no internal error, and nothing written: OUT is the only new
    name a run may create in its folder (the case folder holds nothing else named like it)."""
    assert code == 2, (what, code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, (what, err)
    assert lines[0].startswith("longcat-lora: error: ") and "internal error" not in err, (what, err)
    assert named in lines[0], (what, err)
    parent, base = os.path.split(out)
    assert [f for f in os.listdir(parent) if base in f] == [], (what, os.listdir(parent))


DEEP_LIST = "[" * 100000 + "]" * 100000
DEEP_OBJECT = '{"a":' * 100000 + "1" + "}" * 100000
MALFORMED = {  # every reader refuses each of these documents
    "deep_list": DEEP_LIST,
    "deep_object": DEEP_OBJECT,
    "deep_inside": lambda v: _dump({**v, "x": 0}).replace('"x":0', '"x":' + "[" * 5000 + "]" * 5000),
    "nan": lambda v: _dump({**v, "x": 0}).replace('"x":0', '"x":NaN'),
    "infinity": lambda v: _dump({**v, "x": 0}).replace('"x":0', '"x":-Infinity'),
    "huge_float": lambda v: _dump({**v, "x": 0}).replace('"x":0', '"x":1e400'),
    "huge_int": lambda v: _dump({**v, "x": 0}).replace('"x":0', '"x":' + "9" * 5000),
    "non_utf8": lambda v: _dump(v).encode() + b"\xff\xfe",
    "utf8_bom": lambda v: b"\xef\xbb\xbf" + _dump(v).encode(),
    "duplicate_key": lambda v: _dump(v).replace("{", "{" + _dump(v)[1:-1] + ",", 1),
    "empty": "",
    "whitespace": "   ",
    "truncated": lambda v: _dump(v)[:-1],
    "trailing_garbage": lambda v: _dump(v) + "x",
    "top_level_list": "[]",
    "top_level_string": '"x"',
    "top_level_number": "1",
    "top_level_null": "null",
}


def _doc(spec, reader: str):
    return spec(VALID[reader]) if callable(spec) else spec


@pytest.mark.parametrize("reader", ["peft", "header", "index", "diffusers"])
def test_every_reader_refuses_every_malformed_json_document(tmp_path, capsys, reader):
    r = Reader(tmp_path, reader)
    args, named, out = r.case(_dump(VALID[reader]))  # the harness itself: the valid document is accepted
    code, err = run_main(capsys, args)
    assert code == 0, err
    for what, spec in MALFORMED.items():
        doc = _doc(spec, reader)
        if reader == "diffusers" and isinstance(doc, bytes):  # metadata is a JSON string: always UTF-8
            doc = doc.decode("utf-8", errors="replace")
        if reader == "diffusers" and what == "utf8_bom":
            continue
        args, named, out = r.case(doc)
        assert_refused(*run_main(capsys, args), named, out, (reader, what))


@pytest.mark.parametrize("reader", ["peft", "header", "index", "diffusers"])
def test_deep_nesting_through_the_real_cli(tmp_path, reader):
    args, named, out = Reader(tmp_path, reader).case(DEEP_LIST)
    p = cli(*args, check=None)
    assert_refused(p.returncode, p.stderr, named, out, reader)


WRONG = [None, True, -1, 0, 1.5, "abc", [], {"a": 1}, [1, "x"]]


def _positions(doc, path=()):
    """Every (path) into a JSON document: each object value and list element, at any depth."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield path + (k,)
        yield from _positions(v, path + (k,))


def _replaced(doc, path, value):
    doc = json.loads(json.dumps(doc))
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return doc


@pytest.mark.parametrize("reader", ["peft", "header", "index", "diffusers"])
def test_wrong_types_at_every_position_never_crash(tmp_path, capsys, reader):
    """Each value of a valid document replaced by each wrong-typed value: accepted (when the value is
    valid there, e.g. lora_alpha 1.5) or refused cleanly, never an internal error (exit 3)."""
    r = Reader(tmp_path, reader)
    refused = 0
    for path in _positions(VALID[reader]):
        for value in WRONG:
            args, named, out = r.case(_dump(_replaced(VALID[reader], path, value)))
            code, err = run_main(capsys, args)
            if code == 0:
                continue
            refused += 1
            assert_refused(code, err, named, out, (reader, path, value))
    assert refused >= len(list(_positions(VALID[reader]))) * 4  # most substitutions are refused


@pytest.mark.parametrize("reader,doc,needle", [
    ("peft", {**PEFT_CONFIG, "r": "abc"}, "r must be a positive integer"),
    ("peft", {**PEFT_CONFIG, "r": -1}, "r must be a positive integer"),
    ("peft", {**PEFT_CONFIG, "r": 2.0}, "r must be a positive integer"),
    ("peft", {**PEFT_CONFIG, "r": True}, "r must be a positive integer"),
    ("peft", {**PEFT_CONFIG, "lora_alpha": True}, "lora_alpha must be a finite number"),
    ("peft", {**PEFT_CONFIG, "lora_alpha": "8"}, "lora_alpha must be a finite number"),
    ("peft", {**PEFT_CONFIG, "use_rslora": "false"}, "use_rslora must be true or false"),
    ("peft", {**PEFT_CONFIG, "target_modules": 5}, "target_modules must be"),
    ("peft", {**PEFT_CONFIG, "rank_pattern": ["blocks.0.attn.proj"]}, "rank_pattern must be an object"),
    ("peft", {**PEFT_CONFIG, "rank_pattern": {"blocks.0.attn.proj": "2"}}, "rank_pattern['blocks.0.attn.proj']"),
    ("peft", {**PEFT_CONFIG, "rank_pattern": {"[": 2}}, "not a valid regular expression"),
    ("peft", {**PEFT_CONFIG, "alpha_pattern": {"(a)\\1": 2}}, "uses groupref"),
    ("peft", {**PEFT_CONFIG, "alpha_pattern": {"(?=x)": 2}}, "uses assert"),
    ("index", {**INDEX, "weight_map": ["model-1.safetensors"]}, "needs a weight_map object"),
    ("index", {**INDEX, "weight_map": {"blocks.0.attn.proj.weight": 1}}, "must be a shard file name, not a number"),
    ("index", {**INDEX, "metadata": [1]}, "metadata must be an object"),
    ("diffusers", {**DIFFUSERS_META, "transformer.r": 1e300}, "r must be a positive integer"),
])
def test_malformed_values_name_the_field(tmp_path, capsys, reader, doc, needle):
    args, named, out = Reader(tmp_path, reader).case(_dump(doc))
    code, err = run_main(capsys, args)
    assert_refused(code, err, named, out, doc)
    assert needle in err, err


# ------------------------------------------------------------------ PEFT patterns


def _peft_dir(tmp, modules: dict[str, int], config: dict) -> str:
    """A PEFT adapter directory: each module (name -> rank) with A [r, 8] and B [8, r]."""
    d = tmp / "peft_adapter"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, r in modules.items():
        sd[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, 8, generator=g, dtype=torch.float64)
        sd[f"base_model.model.{name}.lora_B.weight"] = torch.randn(8, r, generator=g, dtype=torch.float64)
    save_file(sd, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps(config))
    return str(d)


def _native_scales(path: str) -> dict[str, float]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k[len("lora" + SEP):-len(".alpha_scale")].replace(SEP, "."): f.get_tensor(k).item()
                for k in f.keys() if k.endswith(".alpha_scale")}


def test_pattern_dos_answers_fast_and_exactly(tmp_path):
    """3000 plain keys plus `(a|aa)+b` against a module named by 40 a's: PEFT's own loop would recompile
    3000 regexes per module and backtrack ~10^8 times on that name. The CLI must answer within the
    subprocess timeout, with the values PEFT's rule gives."""
    evil = "a" * 40
    modules = {"blocks.0.attn.proj": 4, "blocks.1.attn.proj": 2, evil: 2, "x.blocks.2.ffn.w1": 6}
    rank_pattern = {f"blocks.{i}.cross_attn.proj": 3 for i in range(3000)}  # never match
    rank_pattern["(a|aa)+b"] = 9  # never matches (no b), backtracks exponentially in re
    rank_pattern["blocks.0.attn.proj"] = 4  # full path
    rank_pattern["ffn.w1"] = 6  # a dotted suffix of x.blocks.2.ffn.w1
    alpha_pattern = {"blocks\\.[01]\\.attn\\.proj": 3, "(a|aa)+b": 1, evil: 5}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 8, "rank_pattern": rank_pattern,
              "alpha_pattern": alpha_pattern, "target_modules": list(modules)}
    src = _peft_dir(tmp_path, modules, config)
    out = tmp_path / "native.safetensors"
    # the two names of no LongCat module are read (their scales below) but never written: left out
    p = subprocess.run([sys.executable, "-m", "longcat_lora", "convert", src, str(out), "--to", "longcat",
                        "--skip-unmapped"], capture_output=True, text=True, env=ENV, timeout=60)
    assert p.returncode == 0, p.stderr
    rep = subprocess.run([sys.executable, "-m", "longcat_lora", "inspect", src, "--json"], capture_output=True,
                         text=True, env=ENV, timeout=60)
    assert rep.returncode == 0, rep.stderr
    # PEFT's rule evaluated here with Python's re (an independent oracle; fine for these names)
    want = {}
    for name, rank in modules.items():
        r = next((v for k, v in rank_pattern.items() if k != "(a|aa)+b" and re.match(rf"(.*\.)?({k})$", name)), 2)
        a = next((v for k, v in alpha_pattern.items() if k != "(a|aa)+b" and re.match(rf"(.*\.)?({k})$", name)), 8)
        assert r == rank
        want[name] = a / r
    assert want == {"blocks.0.attn.proj": 3 / 4, "blocks.1.attn.proj": 3 / 2, evil: 5 / 2, "x.blocks.2.ffn.w1": 8 / 6}
    assert _native_scales(str(out)) == {k: v for k, v in want.items() if k.startswith("blocks.")}
    assert json.loads(rep.stdout)["alpha_scales"] == {repr(v): 1 for v in sorted(want.values())}


def test_pattern_refusals_are_clean_and_bounded(tmp_path):
    modules = {"blocks.0.attn.proj": 2}
    cases = {"lookahead": {"(?=b)blocks.0.attn.proj": 2}, "backref": {"(b)\\1": 2},
             "too_many_regex_keys": {f"blocks\\.{i}\\.x": 2 for i in range(101)},
             "huge_repeat": {"a{100000}": 2}, "inline_flag": {"(?i:B)locks.0.attn.proj": 2}}
    for what, rank_pattern in cases.items():
        d = tmp_path / what
        d.mkdir()
        src = _peft_dir(d, modules, {"r": 2, "lora_alpha": 2, "rank_pattern": rank_pattern})
        p = subprocess.run([sys.executable, "-m", "longcat_lora", "inspect", src], capture_output=True, text=True,
                           env=ENV, timeout=60)
        assert p.returncode == 2, (what, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "rank_pattern" in p.stderr, (what, p.stderr)
        assert "adapter_config.json" in p.stderr, p.stderr


KEYS = ["attn.qkv", "blocks.1.attn.qkv", "blocks.1.attn", "qkv", "blocks.10.ffn.w1", "a.b", ".*", r"blocks\.\d+\.attn\.qkv",
        r"^blocks.1.attn.qkv", "^attn.qkv", r"(q|kv)_linear", r"blocks.[0-9]+.ffn.w[13]", "ffn.w.", "x)|(blocks",
        r"[^.]+\.proj", r"blocks\.(1|2|3)\..*", "attn.qkv$", r"blocks\.1\d?\.attn\.qkv", "cross_attn.*",
        r"(?:ffn|attn)\.(w1|proj)", "final_layer.(linear|adaLN_modulation.1)", "", "1", "ffn", "w[^1]", r"\w+\.\d",
        r"a{0,3}ttn.qkv", "blocks.1.attn.qk.", "bl.cks", "z*", "(|x)attn.proj", "^$", "blocks..attn.qkv", r"\s*qkv",
        r"[\d.]+attn\.qkv", r"blocks.1.(?:attn|ffn)?.?qkv", "(a|aa)+b"]
NAMES = [f"blocks.{i}.{k}" for i in (0, 1, 2, 10, 11, 19) for k in ("attn.qkv", "attn.proj", "cross_attn.q_linear",
                                                                     "cross_attn.kv_linear", "ffn.w1", "ffn.w3")]
NAMES += ["final_layer.linear", "final_layer.adaLN_modulation.1", "a_b", "x.a_b", "a.b", "blocksX1.attn.qkv",
          "blocks.1.attn_qkv", "blocks.1.attn.qkv.", ".", "..", "x..y", "\u00e4.b", "blocks.\u0661.attn.qkv", "aaaab", "q_linear"]


def test_pattern_table_agrees_with_peft_rule():
    """The bounded matcher gives what `re.match(rf"(.*\\.)?({key})$", name)` gives, first key winning,
    for plain keys (whose "." matches any character), suffixes, anchors, classes, alternations."""
    import random

    rng = random.Random(1)
    checked = 0
    for _ in range(300):
        keys = rng.sample(KEYS, rng.randint(1, 8))
        table = PatternTable({k: i for i, k in enumerate(keys)}, "cfg", "rank_pattern")
        for name in NAMES:
            want = next((i for i, k in enumerate(keys) if re.match(rf"(.*\.)?({k})$", name)), None)
            assert table.lookup(name) == want, (keys, name)
            checked += want is not None
    assert checked > 1000


def test_pattern_table_refuses_a_newline_in_a_module_name():
    with pytest.raises(LoraError, match="newline"):
        PatternTable({"qkv": 2}, "cfg", "rank_pattern").lookup("blocks.0.attn\nqkv")
    assert PatternTable({}, "cfg", "rank_pattern").lookup("a\nb") is None  # no table, nothing to match


def test_peft_itself_gives_the_scales_we_read(tmp_path):
    """Real PEFT builds a model from a config with full-path, suffix and regex keys: every layer's
    scaling as PEFT computes it equals the scale we read back from its saved adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.Module()
            self.attn.qkv = torch.nn.Linear(8, 24)
            self.attn.proj = torch.nn.Linear(8, 8)
            self.ffn = torch.nn.Module()
            self.ffn.w1 = torch.nn.Linear(8, 16)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block() for _ in range(12)])

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "proj", "w1"], init_lora_weights=False,
                        rank_pattern={"blocks.1.attn.qkv": 2, r"blocks\.1\d\.ffn\.w1": 6, "attn.proj": 3},
                        alpha_pattern={"blocks.0.attn.qkv": 5, "(qkv|w1)": 7, r"blocks\.[0-9]\.attn\.proj": 9})
    get_peft_model(Net(), config).save_pretrained(str(tmp_path / "adapter"))
    # What PEFT applies when it loads the file. (save_pretrained writes the config with sorted keys, so
    # where several pattern keys match one module the reloaded adapter can differ from the trained one:
    # here blocks.0.attn.qkv gets alpha 7 from "(qkv|w1)", which now sorts first, not 5.)
    model = PeftModel.from_pretrained(Net(), str(tmp_path / "adapter"))
    want = {name.removeprefix("base_model.model."): m.scaling["default"]
            for name, m in model.named_modules() if hasattr(m, "scaling") and "default" in m.scaling}
    assert want["blocks.0.attn.qkv"] == 7 / 4 and want["blocks.1.attn.qkv"] == 7 / 2
    assert want["blocks.3.attn.proj"] == 9 / 3 and want["blocks.11.ffn.w1"] == 7 / 6
    assert len(want) == 36 and len(set(want.values())) >= 4
    from longcat_lora import load_lora

    with load_lora(str(tmp_path / "adapter")) as a:
        got = {name: {p.scale for p in m.parts} for name, m in a.modules.items()}
    assert got == {name: {s} for name, s in want.items()}


# ------------------------------------------------------------------ the safetensors header


def _entry(dtype="F32", shape=(2, 8), offsets=(0, 64)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HEADER_CASES = {  # name -> (header text, data bytes, words the error must contain)
    "bool_in_shape": ('{"t.lora_A":{"dtype":"F32","shape":[true,8],"data_offsets":[0,32]}}', 32, "shape"),
    "float_in_shape": ('{"t.lora_A":{"dtype":"F32","shape":[1.0,8],"data_offsets":[0,32]}}', 32, "shape"),
    "float_offset": ('{"t.lora_A":{"dtype":"F32","shape":[1,8],"data_offsets":[0,32.0]}}', 32, "data_offsets"),
    "bool_offset": ('{"t.lora_A":{"dtype":"BOOL","shape":[1],"data_offsets":[false,true]}}', 1, "data_offsets"),
    "negative_offset": ('{"t.lora_A":{"dtype":"F32","shape":[1,8],"data_offsets":[-32,0]}}', 32, "data_offsets"),
    "three_offsets": ('{"t.lora_A":{"dtype":"F32","shape":[1,8],"data_offsets":[0,32,64]}}', 32, "data_offsets"),
    "dimension_2_63": ('{"t.lora_A":{"dtype":"F32","shape":[9223372036854775808,0],"data_offsets":[0,0]}}', 0, "shape"),
    "element_count_overflows": ('{"t.lora_A":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}',
                                0, "2**64"),
    "offset_2_64": ('{"t.lora_A":{"dtype":"U8","shape":[0],"data_offsets":[18446744073709551616,18446744073709551616]}}',
                    0, "data_offsets"),
    "huge_shape_list": ('{"t.lora_A":{"dtype":"F32","shape":[' + ",".join(["4611686018427387904"] * 100000)
                        + '],"data_offsets":[0,0]}}', 0, "2**64"),
    "duplicate_tensor": ('{"t.lora_A":' + _dump(_entry()) + ',"t.lora_A":' + _dump(_entry()) + "}", 64, "appears twice"),
    "duplicate_metadata": ('{"__metadata__":{"a":"1","a":"2"},"t.lora_A":' + _dump(_entry()) + "}", 64, "twice"),
    "duplicate_field": ('{"t.lora_A":{"dtype":"F32","dtype":"F32","shape":[2,8],"data_offsets":[0,64]}}', 64, "twice"),
    "metadata_number": ('{"__metadata__":{"a":1},"t.lora_A":' + _dump(_entry()) + "}", 64, "__metadata__"),
    "metadata_is_tensor": ('{"__metadata__":' + _dump(_entry()) + "}", 64, "__metadata__"),
    "entry_is_list": ('{"t.lora_A":[1,2]}', 0, "not an object"),
    "missing_field": ('{"t.lora_A":{"dtype":"F32","shape":[2,8]}}', 64, "no data_offsets"),
    "lone_surrogate_name": ('{"t\\ud800.lora_A":' + _dump(_entry()) + "}", 64, "Unicode"),
    "nan": ('{"t.lora_A":{"dtype":"F32","shape":[NaN],"data_offsets":[0,64]}}', 64, "JSON"),
    "unknown_dtype": ('{"t.lora_A":' + _dump(_entry(dtype="F32 ")) + "}", 64, "unsupported dtype"),
    "overlap": ('{"a.lora_A":' + _dump(_entry()) + ',"a.lora_B":' + _dump(_entry(offsets=(32, 96))) + "}", 96, "overlaps"),
}


def test_header_hostile_values_are_refused_like_safetensors(tmp_path, capsys):
    from safetensors import safe_open

    for what, (header, nbytes, needle) in HEADER_CASES.items():
        path = _raw_safetensors(tmp_path / f"{what}.safetensors", header, b"\0" * nbytes)
        out = str(tmp_path / "out")
        code, err = run_main(capsys, ["convert", path, out, "--to", "fastvideo"])
        assert_refused(code, err, f"{what}.safetensors", out, what)
        assert needle in err, (what, err)
        if not what.startswith("duplicate"):  # safetensors keeps the last of two equal names silently
            with pytest.raises(Exception):
                with safe_open(path, "np") as f:
                    [f.get_tensor(k) for k in f.keys()]


def test_header_over_the_safetensors_limit_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:  # sparse: the length field says 100,000,001 bytes of header
        f.write(struct.pack("<Q", 100_000_001) + b"{")
        f.truncate(100_000_100)
    p = cli("inspect", path, check=2)
    assert "100,000,000-byte limit" in p.stderr and "big.safetensors" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_header_with_200k_tensors_answers(tmp_path):
    """200,000 tiny tensors (a 14 MB header): a LoRA input is refused before parsing (more entries than any
    LongCat LoRA); the header parser itself (base checkpoints have no such cap) validates it, and refuses
    the same with one name repeated at the end as such (not silently collapsed)."""
    from longcat_lora.io.reader import SafeFile

    n = 200_000
    parts = [f'"t{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}' for i in range(n)]
    path = _raw_safetensors(tmp_path / "many.safetensors", "{" + ",".join(parts) + "}", b"\0" * (4 * n))
    p = subprocess.run([sys.executable, "-m", "longcat_lora", "inspect", path], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert p.returncode == 2 and "more than 65,536 tensor entries (200,000 objects)" in p.stderr, p.stderr
    with SafeFile(path) as f:
        assert len(f.tensors) == n
    parts.append(f'"t7":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * n},{4 * n + 4}]}}')
    path = _raw_safetensors(tmp_path / "dup.safetensors", "{" + ",".join(parts) + "}", b"\0" * (4 * n + 4))
    from longcat_lora.errors import LoraError

    with pytest.raises(LoraError, match="'t7' appears twice"):
        SafeFile(path)


def test_header_accepts_what_safetensors_accepts(tmp_path):
    """Unknown fields in an entry (ignored), null metadata, zero-size tensors, an empty name: read, with
    the same shapes and bytes the safetensors library gives."""
    import numpy as np
    from safetensors import safe_open

    from longcat_lora.io.reader import SafeFile

    data = np.arange(8, dtype=np.float32).tobytes()
    header = ('{"__metadata__":null,"":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16],"extra":{"x":[[1]]}},'
              '"z":{"shape":[0,5],"data_offsets":[16,16],"dtype":"F64"},'
              '"w":{"dtype":"F32","shape":[3],"data_offsets":[16,28]},"v":{"dtype":"F32","shape":[1],"data_offsets":[28,32]}}')
    path = _raw_safetensors(tmp_path / "ok.safetensors", header + "  ", data)
    with SafeFile(path) as ours, safe_open(path, "np") as theirs:
        assert sorted(ours.keys()) == sorted(theirs.keys()) == ["", "v", "w", "z"]
        for k in theirs.keys():
            t = theirs.get_tensor(k)
            assert ours.info(k).shape == t.shape
            assert ours.read_raw(k).tobytes() == t.tobytes()
        assert ours.metadata == {}


# ------------------------------------------------------------------ names from files in messages


def test_a_newline_in_a_name_never_reaches_the_log(tmp_path):
    """A tensor or module name holding a newline is printed quoted: one stderr line, no injected line."""
    evil = "blocks.0.x\nlongcat-lora: error: injected"
    src = str(tmp_path / "evil.safetensors")
    save_file({f"{evil}.lora_A": torch.ones(2, 8)}, src)  # no lora_B: refused, naming the layer
    p = cli("convert", src, tmp_path / "o.safetensors", "--to", "longcat", check=2)
    assert len(p.stderr.strip().splitlines()) == 1 and "\\n" in p.stderr and "evil.safetensors" in p.stderr

    bad = str(tmp_path / "comfy.safetensors")  # ComfyUI keys with control characters: refused, quoted
    save_file({f"diffusion_model.{evil}.lora_down.weight": torch.ones(2, 8),
               "diffusion_model.bad\rname\x1b[2J.lora_down.weight": torch.ones(2, 8)}, bad)
    p = cli("inspect", bad, check=2)
    assert len(p.stderr.strip().splitlines()) == 1 and "comfy.safetensors" in p.stderr, p.stderr
    assert "\x1b" not in p.stderr and "\r" not in p.stderr and ("\\n" in p.stderr or "\\r" in p.stderr), p.stderr

    ok = _native(tmp_path / "native.safetensors", {evil: 8})  # the native format holds any module name
    p = cli("inspect", ok)
    assert repr(evil) in p.stdout  # the finding names it quoted
    assert not any(line.startswith("longcat-lora: error: injected") for line in p.stdout.splitlines()), p.stdout
    other = _native(tmp_path / "other.safetensors", {"blocks.0.attn.proj": 8})
    p = cli("verify", ok, other, check=1)
    assert f"only in {ok}: {evil!r}" in p.stdout and f"only in {other}: blocks.0.attn.proj" in p.stdout
    assert not any(line.startswith("longcat-lora: error: injected") for line in p.stdout.splitlines()), p.stdout


# ------------------------------------------------------------------ counts, indices and names from files


def _native(path, modules: dict[str, int], blocks: dict[str, list[str]] | None = None) -> str:
    """A native file: module -> out rows; `blocks` overrides the up-block suffixes of a module."""
    sd = {}
    for m, out in modules.items():
        base = "lora" + SEP + m.replace(".", SEP)
        ups = (blocks or {}).get(m, ["lora_up.weight"])
        sd[f"{base}.lora_down.weight"] = torch.ones(2 * len(ups), 8)
        for u in ups:
            sd[f"{base}.{u}"] = torch.ones(out // len(ups), 2)
        sd[f"{base}.alpha_scale"] = torch.tensor(0.5)
    save_file(sd, str(path))
    return str(path)


def test_huge_or_odd_up_block_indices_are_refused_fast(tmp_path):
    cases = {
        "eleven_digits": ["lora_up.blocks.0.weight", "lora_up.blocks.99999999999.weight"],
        "five_thousand_digits": ["lora_up.blocks.0.weight", "lora_up.blocks." + "9" * 5000 + ".weight"],
        "far_gap": ["lora_up.blocks.0.weight", "lora_up.blocks.99999999.weight"],
        "arabic_indic_digit": ["lora_up.blocks.0.weight", "lora_up.blocks.\u0661.weight"],
    }
    for what, ups in cases.items():
        src = _native(tmp_path / f"{what}.safetensors", {"blocks.0.attn.qkv": 8}, {"blocks.0.attn.qkv": ups})
        p = subprocess.run([sys.executable, "-m", "longcat_lora", "inspect", src], capture_output=True, text=True,
                           env=ENV, timeout=60)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, (what, p.stderr)
        assert f"{what}.safetensors" in p.stderr and "internal error" not in p.stderr, p.stderr


def test_a_block_index_near_a_billion_is_reported_not_enumerated(tmp_path):
    """A block past the DiT's 48 is no module of it (named as such, in bounded time), and never written."""
    src = _native(tmp_path / "far.safetensors", {"blocks.999999999.attn.proj": 8, "blocks.2.attn.proj": 8})
    p = subprocess.run([sys.executable, "-m", "longcat_lora", "inspect", src], capture_output=True, text=True,
                       env=ENV, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "attn.proj: blocks 0-1 not covered (covers 2)" in p.stdout, p.stdout  # (a DiT of non-official sizes: depth from the file)
    assert "block 999999999 is past the 48 blocks of LongCat-Video" in p.stdout, p.stdout
    p = subprocess.run([sys.executable, "-m", "longcat_lora", "convert", src, str(tmp_path / "o.safetensors"), "--to",
                        "kohya"], capture_output=True, text=True, env=ENV, timeout=60)
    assert p.returncode == 2 and "blocks.999999999.attn.proj" in p.stderr and not (tmp_path / "o.safetensors").exists()


def test_block_indices_that_would_alias_are_not_dit_modules(tmp_path):
    """`blocks.01` and `blocks.1` are different modules; FastVideo's naming has only `blocks.1`, so
    `blocks.01` is unmapped (it used to become a second `blocks.1` layer, colliding in the output)."""
    src = _native(tmp_path / "alias.safetensors", {"blocks.1.attn.proj": 8, "blocks.01.attn.proj": 8})
    p = cli("convert", src, tmp_path / "fv.safetensors", "--to", "fastvideo", check=2)
    assert "blocks.01.attn.proj" in p.stderr and "--skip-unmapped" in p.stderr
    p = cli("convert", src, tmp_path / "fv.safetensors", "--to", "fastvideo", "--skip-unmapped")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fv.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["blocks.1.self_attn.to_out.lora_A", "blocks.1.self_attn.to_out.lora_B",
                                    "blocks.1.self_attn.to_out.lora_alpha"]


def test_a_module_name_the_native_format_cannot_hold_is_refused(tmp_path):
    """`a___lorahyphen___b` and `a.b` would both be written as one native key."""
    src = str(tmp_path / "c.safetensors")
    save_file({f"diffusion_model.a{SEP}b.lora_down.weight": torch.ones(2, 8),
               f"diffusion_model.a{SEP}b.lora_up.weight": torch.ones(8, 2),
               "diffusion_model.a.b.lora_down.weight": torch.ones(2, 8),
               "diffusion_model.a.b.lora_up.weight": torch.ones(8, 2)}, src)
    p = cli("convert", src, tmp_path / "n.safetensors", "--to", "longcat", check=2)
    assert SEP in p.stderr and "c.safetensors" in p.stderr and not (tmp_path / "n.safetensors").exists()


def test_scales_from_extreme_but_valid_numbers_are_exact(tmp_path):
    """r and lora_alpha at the edges of what is valid (alpha 1e300, r 1): read as PEFT computes them."""
    src = _peft_dir(tmp_path, {"blocks.0.attn.proj": 1}, {"r": 1, "lora_alpha": 1e300})
    from longcat_lora import load_lora

    with load_lora(src) as a:
        assert [p.scale for p in a.modules["blocks.0.attn.proj"].parts] == [1e300]
