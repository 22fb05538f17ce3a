"""benchmarks/throughput.py's reduced run: every row, ratio and FLOP count lands in the JSON and the table.

Speed itself is never asserted: the machine is shared, and the benchmark's numbers are ratios read by people."""

from __future__ import annotations

import json

import pytest

from helpers import load_benchmark

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("throughput")


def test_quick_run_writes_rows_and_ratios(bench, tmp_path, capsys) -> None:
    path = tmp_path / "throughput.json"
    bench.main(["--quick", "--models", "fmnist-vit", "--threads", "1", "--no-memory", "--precisions", "fp32",
                "--json", str(path)])
    result = json.loads(path.read_text())
    assert [(row["model"], row["mode"], row["batch"]) for row in result["rows"]] == [
        ("fmnist-vit", "infer", 1), ("fmnist-vit", "infer", 2), ("fmnist-vit", "train", 4)]
    for row in result["rows"]:
        libraries = {"vitlab", "timm", "hf"} | ({"vitlab-int8"} if row["mode"] == "infer" else set())
        for key in ("img_s", "ratio_to_timm", "gflop_per_img", "gflops", "peak_share"):
            assert set(row[key]) == libraries, key
            assert all(value > 0 for value in row[key].values()), key
        assert row["ratio_to_timm"]["timm"] == 1.0
        assert row["ratio_to_timm"]["vitlab"] == pytest.approx(row["img_s"]["vitlab"] / row["img_s"]["timm"])
        assert row["gflop_per_img"]["vitlab"] == pytest.approx(row["gflop_per_img"]["timm"])  # the same model
    train = result["rows"][-1]
    assert train["gflop_per_img"]["vitlab"] > 2 * result["rows"][0]["gflop_per_img"]["vitlab"]  # backward counted
    assert result["matmul_peak_gflops"] > 0 and result["machine"]["threads"] == 1
    info = result["models"]["fmnist-vit"]
    assert info["max_logit_diff_to_vitlab"]["timm"] < 1e-4  # identical weights, identical function
    assert any(note.startswith("HF:") for note in info["notes"])  # HF has no GAP: said, not hidden
    out = capsys.readouterr().out
    assert "| fmnist-vit | train | 4 |" in out and "vitlab/timm" in out


@pytest.mark.parametrize("units", ["AVX512-BF16", None])
def test_bf16_rows_beside_fp32_where_the_cpu_has_bf16_units(bench, tmp_path, monkeypatch, units) -> None:
    """By default a CPU with bf16 units gets a bf16 pass after the fp32 one, each row set against the matmul peak of
    its own precision; a CPU without them gets fp32 only."""
    monkeypatch.setattr(bench, "cpu_bf16_units", lambda: units)
    path = tmp_path / "default.json"
    bench.main(["--quick", "--models", "fmnist-vit", "--threads", "1", "--no-memory", "--json", str(path)])
    result = json.loads(path.read_text())
    expected = ["fp32", "bf16"] if units else ["fp32"]
    assert [row["precision"] for row in result["rows"]] == [p for p in expected for _ in range(3)]
    assert list(result["matmul_peak_gflops_by_precision"]) == expected
    for row in result["rows"]:
        peak = result["matmul_peak_gflops_by_precision"][row["precision"]]
        assert row["peak_share"]["vitlab"] == pytest.approx(row["gflops"]["vitlab"] / peak)
        assert ("vitlab-int8" in row["img_s"]) == (row["precision"] == "fp32" and row["mode"] == "infer")
        assert row["ratio_to_timm"]["timm"] == 1.0
    assert any(note.startswith("bf16 rows:") for note in result["notes"]) == bool(units)


def test_memory_probe_measures_a_training_step(bench) -> None:
    probe = bench.memory_probe("vitlab", "fmnist-vit", 4)
    assert probe["peak_mb"] >= probe["baseline_mb"] > 0
    assert probe["step_mb"] == pytest.approx(probe["peak_mb"] - probe["baseline_mb"])


def test_bf16_autocast_rows_and_a_missing_gpu(bench, tmp_path, capsys) -> None:
    """The GPU run's bf16 path, exercised on the CPU; asking for CUDA where there is none is one clear line."""
    path = tmp_path / "bf16.json"
    bench.main(["--quick", "--models", "fmnist-vit", "--threads", "1", "--no-memory", "--bf16", "--json", str(path)])
    result = json.loads(path.read_text())
    assert result["precision"] == "bf16" and result["device"] == "cpu" and not result["compile"]
    assert all(row["img_s"]["vitlab"] > 0 and row["ratio_to_timm"]["timm"] == 1.0 for row in result["rows"])
    assert any("bf16 autocast" in note for note in result["notes"])
    assert "bf16 matmul peak" in capsys.readouterr().out
    if not bench.torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_:
            bench.parse_args(["--device", "cuda"])
        assert exit_.value.code == 2
        assert "--device cuda: CUDA is not available" in capsys.readouterr().err
