import pytest

from longcat_lora.model import naming
from longcat_lora.testing.fixtures import native_entries
from longcat_lora.io.reader import SafeFile

from conftest import DIMS


@pytest.mark.parametrize("layout,keys,modules", [("cfg_step", 1152, 336), ("refinement", 1543, 386)])
def test_published_key_sets(layout, keys, modules):
    entries = native_entries(layout)  # official dims: only headers are built, no data
    assert len(entries) == keys
    assert len({e.name.split(".")[0] for e in entries}) == modules


def test_published_shapes_and_sizes():
    shapes = {e.name.split("___lorahyphen___", 1)[1]: e.shape for e in native_entries("refinement")}
    qkv = "blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
    assert shapes[f"{qkv}.lora_down.weight"] == (384, 4096)
    assert shapes[f"{qkv}.lora_up.blocks.2.weight"] == (4096, 128)
    ada = "blocks___lorahyphen___7___lorahyphen___adaLN_modulation___lorahyphen___1"
    assert shapes[f"{ada}.lora_down.weight"] == (768, 512)
    assert shapes[f"{ada}.lora_up.blocks.5.weight"] == (4096, 128)
    w2 = "blocks___lorahyphen___47___lorahyphen___ffn___lorahyphen___w2"
    assert shapes[f"{w2}.lora_down.weight"] == (128, 11008)
    fin = "final_layer___lorahyphen___linear"
    assert shapes[f"{fin}.lora_up.weight"] == (64, 128)
    fada = "final_layer___lorahyphen___adaLN_modulation___lorahyphen___1"
    assert shapes[f"{fada}.lora_down.weight"] == (256, 512)
    # spec: 630.7M and 802.3M parameters, about 1.26 GB and 1.60 GB in bf16
    for layout, params in (("cfg_step", 630.7e6), ("refinement", 802.3e6)):
        n = sum(e.nbytes for e in native_entries(layout) if len(e.shape) == 2) / 2
        assert abs(n - params) < 0.1e6


def test_small_fixture_is_a_valid_file(native):
    path = native("cfg_step")
    with SafeFile(path) as f:
        assert len(f.keys()) == 1152


def test_naming_table_round_trips():
    for module, (out, inp) in naming.expected_shapes(naming.OFFICIAL).items():
        layers = naming.fastvideo_layers(module)
        assert layers
        for j, layer in enumerate(layers):
            assert naming.from_fastvideo(layer) == (module, j, len(layers))
    assert naming.fastvideo_layers("blocks.3.attn.qkv") == (
        "blocks.3.self_attn.to_q", "blocks.3.self_attn.to_k", "blocks.3.self_attn.to_v")
    assert naming.fastvideo_layers("final_layer.adaLN_modulation.1") == ("final_layer.adaln_linear",)
    assert naming.fastvideo_layers("blocks.0.cross_attn.proj") == ("blocks.0.cross_attn.to_out",)
    assert naming.kind_of("blocks.12.ffn.w2")[1] == 12
    assert naming.kind_of("blocks.0.audio_attn.qkv") is None
    assert naming.expected_shapes(naming.OFFICIAL)["blocks.0.ffn.w1"] == (11008, 4096)
    assert len(naming.expected_shapes(DIMS)) == 48 * 9 + 2
