"""Google .npz checkpoints: every layout the published files use loads with the logits of the model written."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from helpers import TINY_VIT, random_model
from vitlab.errors import VitlabError
from vitlab.models import ViTConfig, VisionTransformer
from vitlab.weights import load_model, load_weights, npz, save_weights

TINY = dataclasses.replace(TINY_VIT, act="gelu_tanh")  # what Google's code computes, and .npz files load with



def logits(model: torch.nn.Module, config: ViTConfig = TINY, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, config.in_chans, *config.img_size, generator=generator)
    with torch.no_grad():
        return model.eval()(images)


def vt_arrays(model: VisionTransformer) -> dict[str, np.ndarray]:
    return npz.from_state_dict(model.state_dict(), model.config)


def big_vision_arrays(model: VisionTransformer, scanned: bool) -> dict[str, np.ndarray]:
    """The same weights in big_vision's layout: linen names, top-level posemb without a class-token row.

    big_vision gives the class token no position embedding, so the VT table's class row is folded into `cls`.
    """
    arrays = vt_arrays(model)
    posemb = arrays.pop("Transformer/posembed_input/pos_embedding")
    arrays["cls"] = arrays["cls"] + posemb[:, :1]
    arrays["pos_embedding"] = posemb[:, 1:]
    renamed = {}
    for key, value in arrays.items():
        key = (key.replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
               .replace("LayerNorm_2", "LayerNorm_1").replace("MlpBlock_3", "MlpBlock_0"))
        renamed[key] = value
    if not scanned:
        return renamed
    stacked: dict[str, list[np.ndarray]] = {}
    out = {}
    for key, value in renamed.items():
        if key.startswith("Transformer/encoderblock_"):
            index, rest = key[len("Transformer/encoderblock_"):].split("/", 1)
            stacked.setdefault(f"Transformer/encoderblock/{rest}", []).append((int(index), value))
        else:
            out[key] = value
    for key, parts in stacked.items():
        out[key] = np.stack([value for _, value in sorted(parts, key=lambda item: item[0])])
    return out


def to_bf16_bits(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """bfloat16 arrays as numpy stores them without ml_dtypes: 2-byte void, truncated float32 bits."""
    return {key: (np.ascontiguousarray(value, np.float32).view(np.uint32) >> 16).astype(np.uint16).view("V2")
            for key, value in arrays.items()}


def round_to_bf16(model: VisionTransformer) -> VisionTransformer:
    with torch.no_grad():
        for parameter in model.parameters():
            bits = parameter.detach().numpy().view(np.uint32) & np.uint32(0xFFFF0000)
            parameter.copy_(torch.from_numpy(bits.view(np.float32)))
    return model


def write(path, arrays: dict[str, np.ndarray]) -> None:
    np.savez(path, **arrays)


LAYOUTS = ["vt", "opt_target", "params_bv", "params_img_bv", "big_vision", "big_vision_scanned"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_npz_layouts_load_with_equal_logits(tmp_path, layout):
    model = random_model(TINY)
    if layout == "vt":
        arrays = vt_arrays(model)
    elif layout == "opt_target":
        arrays = {f"opt/target/{key}": value for key, value in vt_arrays(model).items()}
        arrays["opt/state/step"] = np.array([3.0], np.float32)  # optimizer state beside the target is ignored
    elif layout == "params_bv":
        arrays = {f"params/{key}": value for key, value in big_vision_arrays(model, scanned=True).items()}
    elif layout == "params_img_bv":
        arrays = {f"params/img/{key}": value for key, value in big_vision_arrays(model, scanned=False).items()}
        arrays["params/txt/Embed_0/embedding"] = np.zeros((7, 3), np.float32)  # another tower: not ours
    else:
        arrays = big_vision_arrays(model, scanned=layout.endswith("scanned"))
    write(tmp_path / "w.npz", arrays)
    loaded = load_model(tmp_path / "w.npz")
    assert loaded.config == TINY
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scanned", [False, True])
def test_npz_bfloat16_void_arrays(tmp_path, scanned):
    model = round_to_bf16(random_model(TINY))
    with torch.no_grad():  # so folding the class row into `cls` stays exact in bfloat16
        model.pos_embed[:, 0] = 0
    arrays = big_vision_arrays(model, scanned) if scanned else vt_arrays(model)
    write(tmp_path / "bf16.npz", to_bf16_bits(arrays))
    assert np.load(tmp_path / "bf16.npz")["embedding/kernel"].dtype.kind == "V"
    torch.testing.assert_close(logits(load_model(tmp_path / "bf16.npz")), logits(model), atol=1e-5, rtol=1e-5)


def test_npz_bfloat16_ml_dtypes_arrays():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    array = np.array([1.5, -2.25, 3.0e-3], np.float32)
    as_bf16 = array.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(npz.to_float32(as_bf16, "x", "test"), as_bf16.astype(np.float32))


def test_npz_infers_config_including_pre_logits_and_gap(tmp_path):
    config = ViTConfig(img_size=(48, 48), patch_size=16, embed_dim=24, depth=3, num_heads=2, mlp_dim=40,
                       num_classes=7, representation_size=12, act="gelu_tanh")
    model = random_model(config)
    save_weights(model, tmp_path / "rep.npz", "npz")
    arrays = np.load(tmp_path / "rep.npz")
    assert arrays["pre_logits/kernel"].shape == (24, 12)
    assert arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape == (24, 2, 12)
    loaded = load_model(tmp_path / "rep.npz")
    assert loaded.config == config
    torch.testing.assert_close(logits(loaded, config), logits(model, config), atol=1e-5, rtol=1e-5)

    gap = ViTConfig(img_size=(32, 32), patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=16,
                    num_classes=3, pool="gap", act="gelu_tanh")
    gap_model = random_model(gap)
    save_weights(gap_model, tmp_path / "gap.npz", "npz")
    assert "cls" not in np.load(tmp_path / "gap.npz").files
    loaded = load_model(tmp_path / "gap.npz")
    assert loaded.config == gap
    torch.testing.assert_close(logits(loaded, gap), logits(gap_model, gap), atol=1e-5, rtol=1e-5)


def test_npz_saved_layout_is_official_vt(tmp_path):
    save_weights(random_model(TINY), tmp_path / "vt.npz", "npz")
    keys = set(np.load(tmp_path / "vt.npz").files)
    for expected in ("embedding/kernel", "embedding/bias", "cls", "Transformer/posembed_input/pos_embedding",
                     "Transformer/encoderblock_1/LayerNorm_0/scale", "Transformer/encoderblock_1/LayerNorm_2/bias",
                     "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel",
                     "Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel", "Transformer/encoder_norm/scale",
                     "head/kernel", "head/bias"):
        assert expected in keys
    assert np.load(tmp_path / "vt.npz")["embedding/kernel"].shape == (8, 8, 3, 32)  # HWIO


def test_npz_224_into_384_resamples_with_official_bilinear(tmp_path):
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    small = ViTConfig(img_size=(224, 224), patch_size=16, embed_dim=8, depth=1, num_heads=2, mlp_dim=8,
                      num_classes=0, act="gelu_tanh")
    source = random_model(small)
    save_weights(source, tmp_path / "224.npz", "npz")
    big = VisionTransformer(dataclasses.replace(small, img_size=(384, 384)))
    load_weights(big, tmp_path / "224.npz")
    posemb = source.pos_embed.detach().numpy()[0]
    grid = posemb[1:].reshape(14, 14, 8).astype(np.float64)
    expected = scipy_ndimage.zoom(grid, (24 / 14, 24 / 14, 1), order=1).reshape(576, 8)
    got = big.pos_embed.detach().numpy()[0]
    np.testing.assert_allclose(got[0], posemb[0])  # the class-token row is kept as is
    np.testing.assert_allclose(got[1:], expected, atol=1e-5)
    # The test discriminates: timm's npz path (align_corners=False) would be visibly different.
    timm_style = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(24, 24),
                                                 mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    assert np.abs(timm_style.reshape(576, 8).numpy() - expected).max() > 1e-2


def test_npz_without_square_grid_needs_img_size(tmp_path):
    config = ViTConfig(img_size=(32, 16), patch_size=8, embed_dim=32, depth=1, num_heads=4, mlp_dim=8,
                       num_classes=2, act="gelu_tanh")
    model = random_model(config)
    save_weights(model, tmp_path / "rect.npz", "npz")
    with pytest.raises(VitlabError, match="img_size"):
        load_model(tmp_path / "rect.npz")
    loaded = load_model(tmp_path / "rect.npz", img_size=(32, 16))
    torch.testing.assert_close(logits(loaded, config), logits(model, config), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra, message", [("conv_root/kernel", "hybrid"), ("MAPHead_0/probe", "MAP"),
                                            ("Transformer/encoderblock_0/Unknown_9/kernel", "no vitlab ViT")])
def test_npz_unsupported_content_is_refused(tmp_path, extra, message):
    arrays = vt_arrays(random_model(TINY))
    arrays[extra] = np.zeros((1, 1), np.float32)
    write(tmp_path / "bad.npz", arrays)
    with pytest.raises(VitlabError, match=message) as error:
        load_model(tmp_path / "bad.npz")
    assert "bad.npz" in str(error.value)


def test_npz_that_is_not_a_vit_is_refused(tmp_path):
    write(tmp_path / "other.npz", {"conv/kernel": np.zeros((3, 3), np.float32)})
    with pytest.raises(VitlabError, match=r"other\.npz.*embedding/kernel"):
        load_model(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(VitlabError, match="junk.npz"):
        load_model(tmp_path / "junk.npz")


def test_npz_round_trip_is_exact(tmp_path):
    model = random_model(TINY)
    save_weights(model, tmp_path / "a.npz", "npz")
    again = load_model(tmp_path / "a.npz")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, atol=0, rtol=0)
