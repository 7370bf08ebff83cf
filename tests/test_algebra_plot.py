"""`plot` and `resize --plot`: the PNG exists, decodes, has the expected size; the numbers drawn (||dW||_F
per module, singular values) equal those of the materialised weight change (reference.official_delta);
without matplotlib, one line and exit 2."""

import os
import struct
import sys
import zlib

import pytest
import torch

from longcat_lora import LoraError, convert, load_lora
from longcat_lora.model.adapter import LoraAdapter, LoraModule, Part
from longcat_lora.model.sources import TensorSource
from longcat_lora.algebra.lowrank import ModuleReport, Report
from longcat_lora.algebra.plot import module_norm2, module_spectrum, plot_lora, plot_resize

from conftest import cli
from reference import fastvideo_delta, official_delta


def _png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG header, after checking the signature and that the image data
    inflates to the size its header implies (so the file really decodes)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    w = h = depth = ctype = None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    channels = {2: 3, 6: 4, 0: 1, 4: 2}[ctype]
    assert len(zlib.decompress(idat)) == h * (1 + w * channels * depth // 8)
    return w, h


def _decoded_shape(path) -> tuple[int, ...]:
    import matplotlib.image

    return matplotlib.image.imread(str(path)).shape


def test_plot_writes_a_png_of_the_expected_size(native, tmp_path):
    src = native("refinement")
    out = tmp_path / "lora.png"
    p = cli("plot", src, out)
    assert "386 modules" in p.stdout and "spectra of 6" in p.stdout
    assert _png_size(out) == (1400, 600)
    assert _decoded_shape(out)[:2] == (600, 1400)
    # an existing output is refused (and left alone) without --overwrite
    before = out.read_bytes()
    p = cli("plot", src, out, check=2)
    assert "already exists" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == before
    cli("plot", src, out, "--overwrite", "--modules", "ffn.w2")
    assert _png_size(out) == (1400, 600) and out.read_bytes() != before


def test_norms_and_spectra_equal_the_materialised_change(native, tmp_path):
    """Through the factors == from the full matrix (official forward), for native, PEFT and FastVideo
    inputs (different part layouts of the same change)."""
    src = native("refinement", rank=4, alpha_scale=0.3)
    ref = official_delta(src)
    convert(src, str(tmp_path / "peft"), "peft")
    convert(src, str(tmp_path / "fv.safetensors"), "fastvideo")
    fv_ref = fastvideo_delta(str(tmp_path / "fv.safetensors"))  # its scales folded in fp32: its own reference
    for path, ref in ((src, ref), (str(tmp_path / "peft"), ref), (str(tmp_path / "fv.safetensors"), fv_ref)):
        drawn = plot_lora(path, str(tmp_path / f"{os.path.basename(path)}.png"))
        assert set(drawn["norms"]) == set(ref)
        for m, v in drawn["norms"].items():
            want = float(ref[m].norm())
            assert abs(v - want) <= 1e-9 * want, (path, m, v, want)
        assert len(drawn["spectra"]) == 6
        biggest = sorted(ref, key=lambda m: -float(ref[m].norm()))[:6]
        assert sorted(drawn["spectra"]) == sorted(biggest)
        for m, s in drawn["spectra"].items():
            want = torch.linalg.svdvals(ref[m])
            want = want[want > 1e-12 * want[0]]
            got = torch.tensor(s, dtype=torch.float64)
            assert len(got) == len(want) and torch.allclose(got, want, rtol=1e-9, atol=0), (path, m)


def test_overlapping_parts_norm_and_spectrum():
    """Parts that share rows (not the native layout): cross terms count, both in ||dW|| and in the
    singular values."""
    g = torch.Generator().manual_seed(4)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    parts = [Part((0, 10), TensorSource(rnd(3, 7)), TensorSource(rnd(10, 3)), 0.5),
             Part((4, 12), TensorSource(rnd(2, 7)), TensorSource(rnd(8, 2)), -1.5),
             Part((10, 12), TensorSource(rnd(1, 7)), TensorSource(rnd(2, 1)), 2.0)]
    m = LoraModule("blocks.0.attn.proj", 12, 7, parts)
    dense = torch.zeros(12, 7, dtype=torch.float64)
    for p in parts:
        dense[p.rows[0]:p.rows[1]] += p.scale * p.up.load() @ p.down.load()
    assert abs(module_norm2(m) - float((dense ** 2).sum())) <= 1e-12 * float((dense ** 2).sum())
    want = torch.linalg.svdvals(dense)
    got = module_spectrum(m)
    assert len(got) == 6  # total rank 3 + 2 + 1 < 7 columns: the rest of the spectrum is zero
    assert torch.allclose(got, want[:6], rtol=1e-10, atol=1e-12) and float(want[6]) <= 1e-12


def test_modules_filter_and_unknown_kind(native, tmp_path):
    src = native("refinement")
    drawn = plot_lora(src, str(tmp_path / "a.png"), modules=["attn.qkv", "final_layer.linear"])
    assert sorted(drawn["norms"]) == sorted([f"blocks.{i}.attn.qkv" for i in range(48)] + ["final_layer.linear"])
    p = cli("plot", src, tmp_path / "b.png", "--modules", "attn.qkv,attn.qvk", check=2)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "attn.qvk" in lines[0]
    assert not (tmp_path / "b.png").exists()
    with pytest.raises(LoraError, match="no module of kind"):
        plot_lora(src, str(tmp_path / "c.png"), modules=["nope"])


BLOCK_MATPLOTLIB = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("blocked for the test: " + name)
        return None
sys.meta_path.insert(0, _Block())
from longcat_lora.commands.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["plot", "resize"])
def test_without_matplotlib_one_line_and_exit_2(native, tmp_path, command):
    import subprocess

    src = native("cfg_step")
    png = tmp_path / "x.png"
    args = (["plot", src, str(png)] if command == "plot"
            else ["resize", src, str(tmp_path / "small.safetensors"), "--rank", "2", "--plot", str(png)])
    p = subprocess.run([sys.executable, "-c", BLOCK_MATPLOTLIB, *args], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr == "longcat-lora: error: plot needs matplotlib: pip install longcat-lora[plot]\n"
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(src)]  # no PNG, and resize did not run


def test_resize_plot(native, tmp_path):
    """resize --plot: the input's panels above the ranks kept and errors (1400 x 1100)."""
    src = native("refinement", rank=4)
    out, png = tmp_path / "small.safetensors", tmp_path / "resize.png"
    cli("resize", src, out, "--rank", "2", "--plot", png)
    assert out.exists()
    assert _png_size(png) == (1400, 1100) and _decoded_shape(png)[:2] == (1100, 1400)


def test_plot_resize_api_without_lora(tmp_path):
    rep = Report("resize", "rank 2", [ModuleReport(f"blocks.{i}.attn.qkv", 4, 2, 0.1 * i, 0.9, [2, 2, 2])
                                      for i in range(3)] + [ModuleReport("final_layer.linear", 4, 1, 0.5, 0.7, [1])])
    plot_resize(rep, str(tmp_path / "r.png"))
    assert _png_size(tmp_path / "r.png") == (1400, 550)
    with pytest.raises(LoraError, match="already exists"):
        plot_resize(rep, str(tmp_path / "r.png"))


def test_plot_accepts_an_adapter(tmp_path, native):
    with load_lora(native("cfg_step")) as a:
        assert isinstance(a, LoraAdapter)
        drawn = plot_lora(a, str(tmp_path / "a.png"), modules=["ffn.w1"])
    assert len(drawn["norms"]) == 48
