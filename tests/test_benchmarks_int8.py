"""benchmarks/int8_speed.py's reduced run: every precision and int8 path is timed, compared and reported.

Speed itself is never asserted (the machine is shared); which paths appear, their ratios and accuracies are."""

from __future__ import annotations

import json

import pytest

import vitlab
from helpers import load_benchmark, random_model
from vitlab.models.vit import ViTConfig

pytest.importorskip("timm")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("int8_speed")


@pytest.mark.parametrize("units", ["AMX-BF16", None])
def test_quick_speed_run_times_every_path(bench, tmp_path, monkeypatch, capsys, units) -> None:
    monkeypatch.setattr(bench, "cpu_bf16_units", lambda: units)
    path = tmp_path / "int8.json"
    bench.main(["--quick", "--model", "fmnist-vit", "--threads", "1", "--json", str(path)])
    speed = json.loads(path.read_text())["speed"]
    paths = ["timm fp32", "vitlab fp32"] + (["vitlab bf16"] if units else []) + ["vitlab int8", "torch int8"]
    assert list(speed["img_per_s"]) == paths and all(rate > 0 for rate in speed["img_per_s"].values())
    assert speed["ratio_to_timm"]["vitlab fp32"] == pytest.approx(
        speed["img_per_s"]["vitlab fp32"] / speed["img_per_s"]["timm fp32"])
    assert speed["fastest_int8"] == max(("vitlab int8", "torch int8"), key=speed["img_per_s"].get)
    differences = speed["relative_logit_difference_to_vitlab_fp32"]
    assert differences["timm fp32"] < 1e-5 and all(differences[name] < 0.1 for name in paths[2:])
    assert (speed["bf16_over_fastest_int8"] is None) == (units is None)
    assert f"fastest int8 here: {speed['fastest_int8']}" in capsys.readouterr().out


def test_accuracy_of_every_path_against_fp32(bench, tmp_path) -> None:
    model = random_model(ViTConfig(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2,
                                   num_heads=4, mlp_dim=64))
    checkpoint = tmp_path / "digits.safetensors"
    vitlab.save_weights(model, checkpoint, format="vitlab")
    accuracy = bench.main(["--skip-speed", "--checkpoint", str(checkpoint), "--dataset", "digits", "--threads", "1"]
                          )["accuracy"]
    assert list(accuracy["top1"]) == ["fp32", "bf16", "vitlab int8", "torch int8"] and accuracy["images"] == 360
    assert accuracy["agreement_with_fp32"]["fp32"] == 1.0 and accuracy["minus_fp32_points"]["fp32"] == 0.0
    assert all(0.5 < share <= 1.0 for share in accuracy["agreement_with_fp32"].values())
