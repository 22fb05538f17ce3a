"""The checkpoint catalogue and its download cache, exercised with file:// URLs the tests write (no network)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from vitlab import create_model
from vitlab.errors import VitlabError
from vitlab.models import get_spec
from vitlab.weights import hub, save_weights

MODEL = "vit-mini-p4-32"  # 32 px, 8×8 grid, 10 classes: small enough to build in milliseconds
TAG = "test-npz"


@pytest.fixture
def published(tmp_path, monkeypatch):
    """A 'published' .npz of MODEL with random weights, catalogued under TAG, and an empty cache."""
    torch.manual_seed(0)
    source = create_model(MODEL, act="gelu_tanh").eval()  # Google's code computes its files with the tanh GELU
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.normal_(0.0, 0.2)
    remote = tmp_path / "remote" / "vit.npz"
    save_weights(source, remote, "npz")
    entry = hub.Pretrained(MODEL, TAG, remote.as_uri(), img_size=32, num_classes=10)
    monkeypatch.setitem(hub.CATALOGUE, (MODEL, TAG), entry)
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    return source, remote, entry


def outputs(model: torch.nn.Module, size: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)))


def test_download_once_then_cached(published, tmp_path):
    source, remote, _ = published
    model = create_model(MODEL, pretrained=TAG)
    assert model.config.act == "gelu_tanh"  # built with the default exact GELU, then given the file's
    torch.testing.assert_close(outputs(model), outputs(source), atol=1e-5, rtol=1e-5)
    cached = sorted(path.name for path in (tmp_path / "cache").iterdir())
    assert cached == [f"{MODEL}--{TAG}--vit.npz", f"{MODEL}--{TAG}--vit.npz.sha256"]
    digest = hashlib.sha256(remote.read_bytes()).hexdigest()
    assert (tmp_path / "cache" / cached[1]).read_text().split()[0] == digest  # recorded on first download
    remote.unlink()  # the second call must not need the source
    again = create_model(MODEL, pretrained=TAG)
    torch.testing.assert_close(outputs(again), outputs(source), atol=1e-5, rtol=1e-5)


def test_checksum_is_verified(published, tmp_path, monkeypatch):
    _, remote, entry = published
    wrong = dataclasses.replace(entry, sha256="0" * 64)
    monkeypatch.setitem(hub.CATALOGUE, (MODEL, TAG), wrong)
    with pytest.raises(VitlabError, match="sha256.*does not match"):
        create_model(MODEL, pretrained=TAG)
    assert not list((tmp_path / "cache").iterdir())  # refused and deleted, no partial file either
    right = dataclasses.replace(entry, sha256=hashlib.sha256(remote.read_bytes()).hexdigest())
    monkeypatch.setitem(hub.CATALOGUE, (MODEL, TAG), right)
    assert hub.download(right).is_file()


def test_new_head_and_resolution(published):
    source, _, _ = published
    model = create_model(MODEL, num_classes=3, img_size=48, pretrained=TAG)
    assert model.head.weight.abs().sum() == 0  # different class count: a new zero head
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    expected = torch.nn.functional.interpolate(
        source.pos_embed[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2), size=(12, 12), mode="bilinear",
        align_corners=True).permute(0, 2, 3, 1).reshape(1, 144, -1)
    torch.testing.assert_close(model.pos_embed[:, 1:], expected)


def test_unknown_tag_lists_known_ones():
    with pytest.raises(VitlabError, match="no checkpoint 'nope' for vit-b16; known tags: .*augreg-in21k-ft-in1k"):
        hub.get_pretrained("vit-b16", "nope")
    with pytest.raises(VitlabError, match="no published checkpoints for 'vit-mini-p7-28'"):
        create_model("vit-mini-p7-28", pretrained="augreg-in21k")


def test_failed_download_is_an_error(tmp_path, monkeypatch):
    entry = hub.Pretrained(MODEL, TAG, (tmp_path / "missing.npz").as_uri(), img_size=32, num_classes=10)
    with pytest.raises(VitlabError, match="could not download"):
        hub.download(entry, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_cache_names_stay_inside_the_cache(tmp_path):
    for url in ("https://example.com/a/..%2F..%2F..%2Fetc%2Fpasswd", "file:///x/../../evil.npz",
                "https://example.com/.hidden", "https://example.com/"):
        path = hub.cache_path(hub.Pretrained(MODEL, TAG, url, 32, 10), tmp_path)
        assert path.parent == tmp_path and not path.name.startswith(".")


def test_catalogue_has_the_published_checkpoints():
    required = {("vit-ti16", "augreg-in21k-ft-in1k"), ("vit-s16", "augreg-in21k-ft-in1k"),
                ("vit-b16", "augreg-in21k-ft-in1k"), ("vit-b32", "augreg-in21k-ft-in1k"),
                ("vit-l16", "augreg-in21k-ft-in1k"), ("vit-ti16", "augreg-in21k"), ("vit-l16", "augreg-in21k"),
                ("vit-b16", "orig-in21k"), ("vit-b16", "orig-in21k-ft-in1k"), ("vit-l16", "orig-in21k-ft-in1k")}
    assert required <= set(hub.CATALOGUE)
    for (name, tag), entry in hub.CATALOGUE.items():
        assert entry.url.startswith("https://storage.googleapis.com/vit_models/") and entry.url.endswith(".npz")
        assert entry.mean == entry.std == (0.5, 0.5, 0.5)
        assert entry.sha256 is None and "no checksum is published" in entry.checksum_note
        assert entry.num_classes == (21843 if tag in ("orig-in21k", "augreg-in21k") else 1000)
        assert (entry.representation_size is not None) == (tag == "orig-in21k")
        assert entry.img_size == (384 if tag.endswith("-384") else 224)
        get_spec(name)  # every catalogued model name is registered
    assert hub.get_pretrained("vit-b16", "orig-in21k").url.endswith("/imagenet21k/ViT-B_16.npz")
    assert hub.get_pretrained("vit-b16", "orig-in21k-ft-in1k").url.endswith("imagenet2012/ViT-B_16-224.npz")
