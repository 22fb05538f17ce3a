"""ONNX export (dynamic batch and image size) and int8 inference through ONNX Runtime, against PyTorch fp32."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import vitlab
from helpers import one_error_line, random_model
from vitlab.cli import main
from vitlab.commands import export as export_command
from vitlab.data.datasets import load_dataset
from vitlab.export import (
    INPUT_NAME,
    OnnxRuntimeModel,
    bf16_against_int8,
    export_onnx,
    quantize,
    quantize_model,
    torch_int8_model,
)
from vitlab.models.vit import ViTConfig, VisionTransformer


@pytest.fixture(scope="module")
def ort() -> ModuleType:
    return pytest.importorskip("onnxruntime")


def run_onnx(ort: ModuleType, path: Path, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: images.numpy()})[0]


@pytest.mark.parametrize("overrides", [{"posemb_resample": "official"}, {"posemb_resample": "bicubic"},
                                       {"posemb": "sincos2d", "pool": "gap"}])
def test_onnx_matches_pytorch_at_two_sizes_and_any_batch(ort: ModuleType, one_thread: None, tmp_path: Path,
                                                         overrides: dict[str, str]) -> None:
    model = random_model(ViTConfig(img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_dim=64,
                                   num_classes=5, **overrides))
    path = export_onnx(model, tmp_path / "model.onnx")
    # The traced size (4×4 grid), a smaller and non-square one (3×5, the position embeddings resampled inside the
    # graph) and a larger one, each at a batch size other than the traced one.
    for batch, height, width in [(1, 32, 32), (3, 24, 40), (2, 48, 56)]:
        images = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            expected = model(images).numpy()
        got = run_onnx(ort, path, images)
        assert got.shape == (batch, 5)
        assert np.abs(got - expected).max() < 1e-4, (height, width)


@pytest.fixture(scope="module")
def digits_model(one_thread: None) -> tuple[VisionTransformer, torch.Tensor, torch.Tensor]:
    """A ViT trained for a few seconds on scikit-learn's 8×8 digits (about 98% test accuracy), so its top-1
    predictions mean something, with the whole data set (1,797 images) as inputs."""
    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    images = (torch.cat([test.images, train.images]).float() / 255 - 0.5) / 0.5
    labels = torch.cat([test.labels, train.labels])
    train_images, train_labels = images[len(test):], labels[len(test):]
    model = VisionTransformer(ViTConfig(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2,
                                        num_heads=4, mlp_dim=64))
    steps = 300
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-2, total_steps=steps)
    for _ in range(steps):
        batch = torch.randint(len(train_labels), (64,))
        loss = torch.nn.functional.cross_entropy(model(train_images[batch]), train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), images, labels


@pytest.mark.slow
def test_int8_agrees_with_fp32(ort: ModuleType, digits_model: tuple[VisionTransformer, torch.Tensor, torch.Tensor]
                               ) -> None:
    model, images, labels = digits_model
    quantized = quantize_model(model)
    assert isinstance(quantized, OnnxRuntimeModel) and quantized.config == model.config
    with torch.no_grad():
        expected = model(images)
    got = quantized(images)
    assert (expected.argmax(1) == labels).float().mean() > 0.9  # the model is worth agreeing with
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.99
    assert (got - expected).norm() / expected.norm() < 0.05
    # The int8 graph keeps the dynamic batch and image size: 12×16 resamples the 4×4 position grid to 6×8.
    larger = torch.nn.functional.interpolate(images[:7], size=(12, 16), mode="bilinear")
    with torch.no_grad():
        expected = model(larger)
    assert (quantized(larger) - expected).norm() / expected.norm() < 0.05


def test_int8_reduces_the_weight_range_on_cpus_without_vnni(ort: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    """Without VNNI, x86 int8 kernels saturate on full-range weights: the export picks 7-bit weights there and
    records the choice; `reduce_range` overrides it."""
    import onnx

    from vitlab.export import quantize as quantize_module

    model = random_model(ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1,
                                   num_heads=2, mlp_dim=32))
    recorded, largest = [], []
    for units, forced in ((None, None), ("AVX512-VNNI", None), ("AMX-INT8", True)):
        monkeypatch.setattr(quantize_module, "cpu_int8_units", lambda units=units: units)
        path = quantize_module.export_int8_onnx(model, tmp_path / f"{units}-{forced}.onnx", reduce_range=forced)
        graph = onnx.load(str(path))
        recorded.append({prop.key: prop.value for prop in graph.metadata_props}["int8_reduce_range"])
        weights = [onnx.numpy_helper.to_array(tensor) for tensor in graph.graph.initializer
                   if tensor.data_type == onnx.TensorProto.INT8]
        largest.append(max(int(np.abs(weight.astype(np.int32)).max()) for weight in weights))
    assert recorded == ["true", "false", "true"]
    assert largest[0] <= 64 and largest[1] == 127 and largest[2] <= 64


def test_torch_int8_agrees_with_fp32(digits_model: tuple[VisionTransformer, torch.Tensor, torch.Tensor]) -> None:
    """PyTorch's own dynamic int8, the other int8 path the int8 benchmark times, on the same trained model."""
    model, images, _ = digits_model
    quantized = torch_int8_model(model)
    assert isinstance(quantized.blocks[0].mlp.fc1, torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(model.blocks[0].mlp.fc1, torch.nn.Linear)  # the model itself is left as it was
    with torch.no_grad():
        expected, got = model(images), quantized(images)
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.99
    assert (got - expected).norm() / expected.norm() < 0.05


def test_bf16_against_int8_times_both_where_bf16_is_native(
        ort: ModuleType, digits_model: tuple[VisionTransformer, torch.Tensor, torch.Tensor],
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = digits_model
    int8 = quantize_model(model)
    monkeypatch.setattr(quantize, "cpu_bf16_units", lambda: None)
    assert bf16_against_int8(model, int8) is None  # emulated bf16: nothing to compare
    monkeypatch.setattr(quantize, "cpu_bf16_units", lambda: "AMX-BF16")
    rates = bf16_against_int8(model, int8, batch=4, calls=1)
    assert rates is not None and all(rate > 0 for rate in rates)


def test_create_model_quantize(ort: ModuleType, one_thread: None) -> None:
    model = vitlab.create_model("vit-ti16", num_classes=3, img_size=32, depth=1, quantize="int8")
    assert isinstance(model, OnnxRuntimeModel) and model.config.depth == 1
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_bad_quantize_values(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(vitlab.VitlabError, match="quantize must be one of"):
        vitlab.create_model("vit-ti16", quantize="int4")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(vitlab.VitlabError, match=r"vitlab\[export\]"):
        vitlab.create_model("vit-ti16", num_classes=3, img_size=32, depth=1, quantize="int8")


@pytest.mark.slow
def test_export_command(ort: ModuleType, digits_model: tuple[VisionTransformer, torch.Tensor, torch.Tensor],
                        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    model, images, _ = digits_model
    checkpoint = tmp_path / "digits.safetensors"
    vitlab.save_weights(model, checkpoint, format="vitlab")
    with torch.no_grad():
        expected = model(images[:50]).numpy()
    out = tmp_path / "digits.onnx"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    assert f"wrote {out} (ONNX, fp32" in capsys.readouterr().out
    assert np.abs(run_onnx(ort, out, images[:50]) - expected).max() < 1e-4
    out = tmp_path / "digits-int8.onnx"
    for rates, noted in (((300.0, 200.0), True), ((200.0, 300.0), False), (None, False)):
        monkeypatch.setattr(export_command, "bf16_against_int8", lambda *args, rates=rates: rates)
        assert main(["export", str(checkpoint), "--out", str(out), "--int8"]) == 0
        printed = capsys.readouterr().out
        assert f"wrote {out} (ONNX, int8" in printed
        assert ("note: this CPU runs bf16 autocast natively" in printed) == noted
        assert ("300 img/s under bf16 against 200" in printed) == noted
    assert np.linalg.norm(run_onnx(ort, out, images[:50]) - expected) / np.linalg.norm(expected) < 0.05
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x.onnx")]) == 2
    one_error_line(capsys, "missing")
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "no" / "x.onnx")]) == 2
    one_error_line(capsys, "does not exist")


def test_export_usage_errors() -> None:
    for argv in (["export", "model.safetensors"], ["export", "model.safetensors", "--out", "x.onnx", "--fp8"]):
        with pytest.raises(SystemExit) as raised:
            main(argv)
        assert raised.value.code == 2


def test_an_output_that_is_a_directory_is_refused_before_exporting(tmp_path: Path) -> None:
    from vitlab.errors import VitlabError
    from vitlab.export import writable_path

    with pytest.raises(VitlabError, match="is a directory; name the file to write"):
        writable_path(tmp_path)
    with pytest.raises(VitlabError, match="does not exist"):
        writable_path(tmp_path / "missing" / "model.onnx")
    assert writable_path(tmp_path / "model.onnx") == tmp_path / "model.onnx"
