"""Same weights, same logits: vitlab against timm and Hugging Face reference models (random weights, no download)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import slow_when
from vitlab import create_model
from vitlab.errors import VitlabError
from vitlab.models import ViTConfig, VisionTransformer
from vitlab.weights import load_model, load_weights, save_weights

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
SIZES = {"vit-ti16": ("vit_tiny_patch16_224", 192, 3, 768), "vit-s16": ("vit_small_patch16_224", 384, 6, 1536)}


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random heads and class tokens (they are zero-initialised), so a wrong map cannot hide behind zeros."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.abs().max() == 0 or "head" in name or "classifier" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return module.eval()


def images(height: int = 224, width: int = 224, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def hf_config(dim: int, heads: int, mlp: int, image_size, num_labels: int = 10, depth: int = 12):
    return transformers.ViTConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                                  intermediate_size=mlp, image_size=image_size, patch_size=16,
                                  num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("name", slow_when(sorted(SIZES), {"vit-s16"}))
def test_timm_logits_match(tmp_path, name):
    timm_name = SIZES[name][0]
    torch.manual_seed(0)
    reference = randomize_(timm.create_model(timm_name, pretrained=False, num_classes=10))
    save_file(reference.state_dict(), tmp_path / "timm.safetensors")
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    model = load_model(tmp_path / "timm.safetensors", name).eval()
    assert model.config.num_classes == 10
    x = images(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=ATOL, rtol=0)
    from_pth = load_model(tmp_path / "timm.pth", name)
    assert all(torch.equal(from_pth.state_dict()[key], value) for key, value in model.state_dict().items())
    save_weights(model, tmp_path / "back.safetensors", "timm")
    written = load_file(tmp_path / "back.safetensors")
    assert written.keys() == reference.state_dict().keys()
    assert all(torch.equal(written[key], value) for key, value in reference.state_dict().items())


@pytest.mark.parametrize("name", slow_when(sorted(SIZES), {"vit-s16"}))
def test_hf_logits_match(tmp_path, name):
    _, dim, heads, mlp = SIZES[name]
    torch.manual_seed(0)
    reference = randomize_(transformers.ViTForImageClassification(hf_config(dim, heads, mlp, 224)))
    x = images(batch=1)
    with torch.no_grad():
        expected = reference(pixel_values=x).logits
    reference.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf").eval()
    assert model.config.layer_norm_eps == pytest.approx(1e-12)  # HF's default travels with the weights
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)
    # The installed transformers' runtime names (5.x: layers.{i}.attention.q_proj, mlp.fc1, ...) load too.
    runtime = {key: value.contiguous() for key, value in reference.state_dict().items()}
    save_file(runtime, tmp_path / "runtime.safetensors")
    target = load_weights(create_model(name, num_classes=10, layer_norm_eps=1e-12), tmp_path / "runtime.safetensors")
    assert all(torch.equal(target.state_dict()[key], value) for key, value in model.state_dict().items())


def test_hf_save_opens_with_from_pretrained(tmp_path):
    model = randomize_(create_model("vit-ti16", num_classes=10))
    save_weights(model, tmp_path / "hf", "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"] and config["layer_norm_eps"] == 1e-6
    reference = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(reference(pixel_values=x).logits, model(x), atol=ATOL, rtol=0)


def test_rectangular_input_matches_timm_and_hf(tmp_path):
    size = (224, 160)
    torch.manual_seed(0)
    reference = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                                             img_size=size))
    save_file(reference.state_dict(), tmp_path / "rect.safetensors")
    model = load_model(tmp_path / "rect.safetensors", "vit-ti16", img_size=size).eval()
    x = images(*size)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)
    save_weights(model, tmp_path / "hf", "hf")
    hf_model = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(pixel_values=x).logits, expected, atol=ATOL, rtol=0)
    back = load_model(tmp_path / "hf")
    assert back.config.img_size == size


def test_round_trip_npz_timm_hf_keeps_the_tanh_gelu(tmp_path):
    """A model as Google's code computes it (tanh GELU) stays so through .npz, timm and HF files."""
    model = randomize_(create_model("vit-ti16", num_classes=10, act="gelu_tanh"))
    x = images(batch=1)
    with torch.no_grad():
        expected = model(x)
    save_weights(model, tmp_path / "a.npz", "npz")
    from_npz = load_model(tmp_path / "a.npz")
    save_weights(from_npz, tmp_path / "b.safetensors", "timm")
    from_timm = load_model(tmp_path / "b.safetensors", "vit-ti16")
    save_weights(from_timm, tmp_path / "c", "hf")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["hidden_act"] == "gelu_pytorch_tanh"
    from_hf = load_model(tmp_path / "c").eval()
    assert from_npz.config.act == from_timm.config.act == from_hf.config.act == "gelu_tanh"
    with torch.no_grad():
        torch.testing.assert_close(from_hf(x), expected, atol=ATOL, rtol=0)
    # ...and the files in the middle compute the same in timm (told the activation the file records) and in HF.
    with safe_open(tmp_path / "b.safetensors", "pt") as handle:
        act_layer = handle.metadata()["act_layer"]
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, act_layer=act_layer)
    reference.load_state_dict(load_file(tmp_path / "b.safetensors"), strict=True)
    hf_model = transformers.ViTForImageClassification.from_pretrained(tmp_path / "c").eval()
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(x), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(hf_model(pixel_values=x).logits, expected, atol=ATOL, rtol=0)
        # the exact GELU would not pass: the check sees the activation
        exact = load_model(tmp_path / "b.safetensors", "vit-ti16", act="gelu").eval()
        assert (exact(x) - expected).abs().max() > 10 * (from_hf(x) - expected).abs().max()


def test_hf_tanh_gelu_is_read_and_other_activations_refused(tmp_path):
    config = hf_config(32, 4, 64, 32, depth=2)
    config.hidden_act = "gelu_pytorch_tanh"
    torch.manual_seed(0)
    reference = randomize_(transformers.ViTForImageClassification(config))
    reference.save_pretrained(tmp_path / "tanh")
    model = load_model(tmp_path / "tanh").eval()
    assert model.config.act == "gelu_tanh"
    x = images(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(pixel_values=x).logits, atol=1e-5, rtol=0)
    data = json.loads((tmp_path / "tanh" / "config.json").read_text())
    (tmp_path / "relu").mkdir()
    (tmp_path / "relu" / "config.json").write_text(json.dumps({**data, "hidden_act": "relu"}))
    (tmp_path / "tanh" / "model.safetensors").rename(tmp_path / "relu" / "model.safetensors")
    with pytest.raises(VitlabError, match="hidden_act 'relu'"):
        load_model(tmp_path / "relu")


def test_load_weights_computes_as_the_source_library(tmp_path):
    """Loading into a built model gives it the activation of the weights' source: tanh for Google's .npz, exact
    for timm (and back)."""
    model = randomize_(create_model("vit-ti16", num_classes=10))
    save_weights(model, tmp_path / "timm.safetensors", "timm")
    with pytest.warns(UserWarning, match="gelu_tanh"):  # .npz is read with the tanh GELU: said when writing
        save_weights(model, tmp_path / "google.npz", "npz")
    target = create_model("vit-ti16", num_classes=10)
    assert load_weights(target, tmp_path / "google.npz").config.act == "gelu_tanh"
    assert target.blocks[0].mlp.act.approximate == "tanh"
    assert load_weights(target, tmp_path / "timm.safetensors").config.act == "gelu"
    assert target.blocks[0].mlp.act.approximate == "none"


def test_hf_backbone_with_pooler_is_pre_logits(tmp_path):
    config = hf_config(32, 4, 64, 32, depth=2)
    torch.manual_seed(0)
    backbone = randomize_(transformers.ViTModel(config, add_pooling_layer=True))
    backbone.save_pretrained(tmp_path / "in21k")
    model = load_model(tmp_path / "in21k").eval()
    assert model.config.representation_size == 32 and model.config.num_classes == 0
    x = images(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), backbone(pixel_values=x).pooler_output, atol=ATOL, rtol=0)
    save_weights(model, tmp_path / "again", "hf")
    reopened = transformers.ViTModel.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(reopened(pixel_values=x).pooler_output, model(x), atol=ATOL, rtol=0)


def test_formats_refuse_what_they_cannot_hold(tmp_path):
    tiny = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_dim=16, num_classes=3)
    with pytest.raises(VitlabError, match="pre-logits"):
        save_weights(VisionTransformer(ViTConfig(**tiny, representation_size=8)), tmp_path / "x.safetensors",
                     "timm")
    with pytest.raises(VitlabError, match="pre-logits"):
        save_weights(VisionTransformer(ViTConfig(**tiny, representation_size=8)), tmp_path / "hf", "hf")
    with pytest.raises(VitlabError, match="gap"):
        save_weights(VisionTransformer(ViTConfig(**tiny, pool="gap")), tmp_path / "hf", "hf")
    timm_gap = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, global_pool="avg",
                                 class_token=False)
    save_file(timm_gap.state_dict(), tmp_path / "fc_norm.safetensors")
    with pytest.raises(VitlabError, match="fc_norm"):
        load_model(tmp_path / "fc_norm.safetensors", "vit-ti16")


def test_timm_gap_without_fc_norm_matches(tmp_path):
    torch.manual_seed(0)
    reference = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4,
                                             global_pool="avg", class_token=False, fc_norm=False, img_size=64))
    save_file(reference.state_dict(), tmp_path / "gap.safetensors")
    model = load_model(tmp_path / "gap.safetensors", "vit-ti16").eval()
    assert model.config.pool == "gap"
    assert model.config.img_size == (64, 64)
    x = images(64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=ATOL, rtol=0)
