"""Transfer from a catalogue name: names, a file:// mirror, model cards, and exports that keep labels and
preprocessing (HF pipeline, timm, ONNX). The catalogue entry is a test-only stand-in: a tiny ViT in the npz layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab import create_model
from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.weights import hub, load_model, save_weights
from vitlab.weights.card import ModelCard, Preprocessing

MODEL = "vit-mini-p4-32"  # 32 px, patch 4, 10 classes
TAG = "stand-in"
NAME = f"{MODEL}:{TAG}"
RELATIVE = "test/vit-mini-stand-in.npz"  # under the mirror, as augreg/... is under Google's bucket


def randomized(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(MODEL, act="gelu_tanh").eval()  # as Google's .npz files compute
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.nn.Module, Path]:
    """A stand-in checkpoint at its catalogue path under a local mirror, served through `VITLAB_MIRROR`."""
    source = randomized()
    root = tmp_path / "mirror"
    save_weights(source, root / RELATIVE, "npz")
    entry = hub.Pretrained(MODEL, TAG, f"{hub._BUCKET}/{RELATIVE}", img_size=32, num_classes=10,
                           description="test stand-in")
    monkeypatch.setitem(hub.CATALOGUE, (MODEL, TAG), entry)
    monkeypatch.setenv("VITLAB_MIRROR", root.as_uri())
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    return source, root


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A two-class image folder of non-square RGB photos-to-be (smooth colour fields plus noise)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for name, colour in (("cat", (200, 80, 40)), ("dog", (40, 90, 210))):
        (root / name).mkdir(parents=True)
        for index in range(6):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def logits(model: torch.nn.Module, size: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)))


def test_names_in_every_spelling() -> None:
    expected = "vit-s16:augreg-in21k-ft-in1k"
    for spec, model in ((expected, None), ("augreg-in21k-ft-in1k", "vit-s16"),
                        ("vit_small_patch16_224.augreg_in21k_ft_in1k", None)):
        assert hub.resolve_name(spec, model).name == expected
    assert hub.resolve_name("vit_base_patch16_384.augreg_in21k_ft_in1k").name == "vit-b16:augreg-in21k-ft-in1k-384"
    assert hub.resolve_name("google/vit-base-patch16-224").name == "vit-b16:orig-in21k-ft-in1k"
    assert hub.resolve_name("google/vit-base-patch16-224-in21k").name == "vit-b16:orig-in21k"
    with pytest.raises(VitlabError, match="close matches: vit-s16:augreg-in21k-ft-in1k"):
        hub.resolve_name("vit-s16:augreg-in21k-ft-in1")
    with pytest.raises(VitlabError, match="needs --model"):
        hub.resolve_name("augreg-in21k-ft-in1k")
    assert not hub.looks_like_name("runs/model.safetensors") and hub.looks_like_name(expected)
    card = hub.resolve_name(expected).card()
    assert card.preprocessing == Preprocessing((0.5,) * 3, (0.5,) * 3, "bicubic", 0.9)
    assert hub.resolve_name("vit-s16:augreg-in21k-ft-in1k-384").card().preprocessing.crop_pct == 1.0


def test_mirror_download_shows_progress_and_is_cached(mirror, tmp_path, capsys) -> None:
    source, root = mirror
    entry = hub.resolve_name(NAME)
    assert hub.mirror_url(entry) == (root / RELATIVE).as_uri()
    assert hub.mirror_url(entry, mirror=str(root)) == (root / RELATIVE).as_uri()  # a plain directory works too
    model = load_model(NAME)
    assert TAG in capsys.readouterr().err  # the progress bar, on stderr
    torch.testing.assert_close(logits(model), logits(source), atol=1e-5, rtol=1e-5)
    assert model.card.preprocessing.crop_pct == 0.9 and model.card.classes is None
    (root / RELATIVE).unlink()  # the second load needs only the verified cache
    torch.testing.assert_close(logits(load_model(NAME)), logits(source), atol=1e-5, rtol=1e-5)


def test_a_file_that_exists_wins_over_a_name(mirror, tmp_path, monkeypatch) -> None:
    other = randomized(seed=1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()
    save_weights(other, tmp_path / NAME / "best.safetensors", "vitlab")  # a run directory with the name
    torch.testing.assert_close(logits(load_model(NAME)), logits(other))
    assert not (tmp_path / "cache").exists()  # nothing downloaded


def test_card_round_trip_through_vitlab_files(tmp_path) -> None:
    model = randomized()
    card = ModelCard(tuple(f"class {i}" for i in range(10)), Preprocessing((0.4, 0.5, 0.6), (0.2, 0.3, 0.4),
                                                                           "bilinear", 0.875))
    model.card = card
    save_weights(model, tmp_path / "a.safetensors")
    loaded = load_model(tmp_path / "a.safetensors")
    assert loaded.card == card
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) == 0
    assert load_model(tmp_path / "b.safetensors").card == card
    assert load_model(tmp_path / "a.safetensors", num_classes=3).card.classes is None  # a new head: no names


def test_finetune_predict_eval_convert_by_name(mirror, photos, tmp_path, capsys) -> None:
    out = tmp_path / "ft"
    assert main(["finetune", "--from", NAME, "--dataset", str(photos), "--img-size", "32", "--epochs", "2",
                 "--batch-size", "6", "--out", str(out), "--no-progress", "--set", "threads=1"]) == 0
    record = json.loads((out / "last.json").read_text())
    assert record["train_config"]["init_from"] == NAME
    image = photos / "cat" / "0.png"
    capsys.readouterr()
    assert main(["predict", str(out), str(image), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    assert {entry["class"] for entry in top} == {"cat", "dog"}
    assert main(["predict", NAME, str(image), "--json"]) == 0  # the stand-in's own ten classes, by index
    assert {entry["class"] for entry in json.loads(capsys.readouterr().out)["top"]} <= set(map(str, range(10)))
    assert main(["predict", TAG, "--model", MODEL, str(image)]) == 0  # a bare tag with --model
    capsys.readouterr()
    assert main(["eval", str(out), "--dataset", str(photos), "--json"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["top1"] <= 1.0
    assert main(["convert", NAME, str(tmp_path / "stand-in.safetensors")]) == 0
    assert load_model(tmp_path / "stand-in.safetensors").card.preprocessing.crop_pct == 0.9
    assert main(["convert", str(out), str(tmp_path / "ft.safetensors")]) == 0  # class names survive
    assert load_model(tmp_path / "ft.safetensors").card.classes == ("cat", "dog")
    capsys.readouterr()
    assert main(["models", "--pretrained", TAG]) == 0
    assert NAME in capsys.readouterr().out
    assert main(["predict", f"{MODEL}:no-such-tag", str(image)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "close matches" in error and NAME in error
    assert main(["finetune", "--from", NAME, "--model", "vit-s16", "--dataset", str(photos), "--out",
                 str(tmp_path / "refused")]) == 2
    assert "not --model vit-s16" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def _chelsea(tmp_path: Path) -> Path:
    skimage_data = pytest.importorskip("skimage.data")
    path = tmp_path / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(path)
    return path


def _named(classes: int = 10) -> torch.nn.Module:
    model = randomized()
    model.card = ModelCard(tuple(f"kind {i}" for i in range(classes)), Preprocessing(interpolation="bicubic"))
    return model


def test_hf_pipeline_equals_vitlab_predict(tmp_path, capsys) -> None:
    pipeline = pytest.importorskip("transformers").pipeline
    photo = _chelsea(tmp_path)
    save_weights(_named(), tmp_path / "model.safetensors")
    assert main(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"]["3"] == "kind 3" and config["label2id"]["kind 3"] == 3
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 32, "width": 32} and processor["resample"] == 3
    best = pipeline("image-classification", model=str(tmp_path / "hf"), device="cpu")(str(photo), top_k=1)[0]
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "hf"), str(photo), "--json", "--top-k", "1", "--amp", "fp32"]) == 0
    ours = json.loads(capsys.readouterr().out)["top"][0]
    assert ours["class"] == best["label"]
    assert abs(ours["prob"] - best["score"]) < 1e-4
    # The centre-cropping vitlab file itself sees another input than HF's squashed one (the photo is not square).
    assert main(["predict", str(tmp_path / "model.safetensors"), str(photo), "--json", "--top-k", "1",
                 "--amp", "fp32"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["top"][0]["prob"] - best["score"]) > 1e-4


def test_timm_directory_builds_the_same_model(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    model = _named()
    model.card = ModelCard(model.card.classes, Preprocessing(crop_pct=0.875))
    save_weights(model, tmp_path / "model.safetensors")
    assert main(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "timm"), "--to", "timm"]) == 0
    reference = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    torch.testing.assert_close(logits(reference), logits(model), atol=1e-5, rtol=1e-5)
    cfg = reference.pretrained_cfg
    assert cfg["crop_pct"] == 0.875 and cfg["label_names"][3] == "kind 3" and tuple(cfg["mean"]) == (0.5,) * 3
    assert timm.data.resolve_data_config({}, model=reference)["input_size"] == (3, 32, 32)
    back = load_model(tmp_path / "timm")  # and vitlab reads the directory back, card included
    torch.testing.assert_close(logits(back), logits(model), atol=1e-5, rtol=1e-5)
    assert back.card == model.card


def test_onnx_carries_card_and_refuses_sizes_the_model_refuses(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = _named()
    save_weights(model, tmp_path / "model.safetensors")
    assert main(["export", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "m.onnx")]) == 0
    props = {prop.key: prop.value for prop in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props["classes"])[3] == "kind 3"
    assert json.loads(props["preprocessing"])["img_size"] == [32, 32]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    good = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        expected = model(good).numpy()
    assert np.abs(session.run(None, {"pixels": good.numpy()})[0] - expected).max() < 1e-4
    bad = torch.randn(1, 3, 30, 30)
    with pytest.raises(VitlabError):
        model(bad)
    with pytest.raises(Exception, match="(?i)reshape|shape"):
        session.run(None, {"pixels": bad.numpy()})
