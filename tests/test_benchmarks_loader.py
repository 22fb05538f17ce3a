"""benchmarks/loader_throughput.py runs end to end on a tiny generated folder (no timing is checked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import load_benchmark

pytest.importorskip("skimage")


@pytest.mark.slow
def test_loader_benchmark_runs_on_a_tiny_folder(tmp_path: Path) -> None:
    bench = load_benchmark("loader_throughput")
    result = bench.main(["--images", "24", "--workers", "0", "--batch-size", "4", "--img-size", "32", "--batches",
                         "2", "--warmup", "1", "--repeats", "1", "--rss-counts", "12", "24", "--contenders", "vitlab",
                         "torchvision", "--folder", str(tmp_path), "--json", str(tmp_path / "out.json")])
    assert set(result["img_per_s"]) == {"vitlab", "torchvision"} and all(v > 0 for v in result["img_per_s"].values())
    assert set(result["peak_rss_mib"]) == {"12", "24"} and (tmp_path / "out.json").is_file()
    assert len(list((tmp_path / "jpegs-24").rglob("*.jpg"))) == 24
    assert len(list((tmp_path / "jpegs-24-links-12").rglob("*.jpg"))) == 12
