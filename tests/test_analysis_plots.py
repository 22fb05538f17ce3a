"""vitlab.analysis.plots and `vitlab analyze`: the pictures are written, non-blank, and indexed with their numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from matplotlib.image import imread

import vitlab
from helpers import tiny_vit
from vitlab import cli
from vitlab.analysis import (
    attention_maps,
    attention_rollout,
    mean_attention_distance,
    patch_embedding_components,
    plots,
    position_embedding_similarity,
)
from vitlab.analysis.attention import class_token_attention
from vitlab.commands import analyze
from vitlab.data import read_idx
from vitlab.weights import save_weights

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


pytestmark = pytest.mark.usefixtures("one_thread")


def check_png(path: Path, min_side: int = 100) -> np.ndarray:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert min(pixels.shape[:2]) >= min_side
    assert pixels[..., :3].std() > 0.01  # something was drawn, not a blank canvas
    return pixels


def test_plots_write_pngs_and_index_references_them(tmp_path):
    model = tiny_vit("vit-mini-p4-28", depth=3)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    grid = model.config.grid_size
    rollout = attention_rollout(model, x)
    layers = class_token_attention(attention_maps(model, x), grid, model.num_prefix_tokens)[:, 0, 1]
    assert layers.shape == (3, 7, 7)
    distances = mean_attention_distance(model, x)
    similarity = position_embedding_similarity(model)
    components = patch_embedding_components(model)

    files = [plots.plot_rollout(x, rollout, tmp_path / "rollout.png", titles=["a", "b", "c"]),
             plots.plot_layer_attention(layers, tmp_path / "layers.png", head=1, image=x[0]),
             plots.plot_layer_attention(layers, tmp_path / "layers_plain.png", head=1),
             plots.plot_attention_distance(distances, tmp_path / "distance.png", (28, 28)),
             plots.plot_position_similarity(similarity, tmp_path / "similarity.png"),
             plots.plot_embedding_components(components, tmp_path / "components.png")]
    for file in files:
        check_png(file)
    data = {"rollout": rollout, "layers": layers, "layers_plain": layers, "distance": distances,
            "similarity": similarity, "components": components}
    entries = [{"file": file.name, "caption": f"caption <{file.stem}> & more", "data": {"values": data[file.stem]}}
               for file in files]
    index = plots.write_index(tmp_path, entries)
    page = index.read_text()
    for file in files:
        assert f'src="{file.name}"' in page
    assert "caption &lt;rollout&gt; &amp; more" in page  # captions are escaped
    numbers = json.loads((tmp_path / "analysis.json").read_text())
    assert set(numbers) == {file.stem for file in files}
    assert np.allclose(numbers["distance"]["data"]["values"], distances.numpy())
    assert np.array(numbers["similarity"]["data"]["values"]).shape == (7, 7, 7, 7)


def test_rgb_components_and_rectangular_similarity(tmp_path):
    torch.manual_seed(0)
    model = vitlab.create_model("vit-mini-p4-32", depth=1)
    check_png(plots.plot_embedding_components(patch_embedding_components(model, 10), tmp_path / "rgb.png"))
    check_png(plots.plot_position_similarity(position_embedding_similarity(model, (4, 9)), tmp_path / "rect.png"))


def test_write_index_rejects_missing_png(tmp_path):
    with pytest.raises(vitlab.VitlabError, match="missing.png"):
        plots.write_index(tmp_path, [{"file": "missing.png", "caption": "nothing"}])


def write_images(directory: Path) -> list[str]:
    """An RGB, a gray and a palette image of other sizes: all must come out as the model's 28×28 gray input."""
    rng = np.random.default_rng(0)
    paths = [directory / "rgb.png", directory / "gray.jpg", directory / "palette.png"]
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(paths[1])
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P").save(paths[2])
    return [str(path) for path in paths]


def test_load_images_converts_mode_size_and_scale(tmp_path):
    paths = write_images(tmp_path)
    batch = analyze.load_images(paths, 1, (28, 28))
    assert batch.shape == (3, 1, 28, 28) and batch.min() >= -1 and batch.max() <= 1
    expected = (np.asarray(Image.open(paths[1]).convert("L"), dtype=np.float32) / 255 - 0.5) / 0.5
    assert np.allclose(batch[1, 0].numpy(), expected)
    assert analyze.load_images(paths[:1], 3, (32, 48)).shape == (1, 3, 32, 48)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(vitlab.VitlabError, match="broken.png"):
        analyze.load_images([str(tmp_path / "broken.png")], 1, (28, 28))


@pytest.mark.skipif(not FASHION_MNIST.is_file(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_reader():
    arrays = read_idx(FASHION_MNIST)[:5]
    batch = analyze.load_dataset_images("fashion-mnist", 5, 1, (28, 28))
    assert torch.allclose(batch[:, 0], (torch.from_numpy(arrays.copy()).float() / 255 - 0.5) / 0.5)
    assert analyze.load_dataset_images("fashion-mnist", 2, 3, (32, 32)).shape == (2, 3, 32, 32)


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny model saved as a vitlab checkpoint."""
    path = tmp_path / "tiny.safetensors"
    save_weights(tiny_vit("vit-mini-p4-28", depth=3), path)
    return path


def test_analyze_command_end_to_end(tmp_path, checkpoint, capsys):
    out = tmp_path / "report"
    paths = write_images(tmp_path)
    code = cli.main(["analyze", str(checkpoint), "--images", *paths, "--head", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    page = (out / "index.html").read_text()
    pngs = sorted(path.name for path in out.glob("*.png"))
    assert pngs == ["attention_distance.png", "embedding_components.png", "layer_attention.png",
                    "position_similarity.png", "rollout.png"]
    for name in pngs:
        check_png(out / name)
        assert f'src="{name}"' in page
    numbers = json.loads((out / "analysis.json").read_text())
    assert np.array(numbers["rollout"]["data"]["rollout"]).shape == (3, 7, 7)
    assert np.array(numbers["layer_attention"]["data"]["maps"]).shape == (3, 7, 7)
    assert np.array(numbers["attention_distance"]["data"]["distance_pixels"]).shape == (3, 4)
    # the numbers are the library's, for the saved model on the prepared images
    model, x = tiny_vit("vit-mini-p4-28", depth=3), analyze.load_images(paths, 1, (28, 28))
    assert np.allclose(numbers["rollout"]["data"]["rollout"], attention_rollout(model, x).numpy(), atol=1e-6)
    assert np.allclose(numbers["attention_distance"]["data"]["distance_pixels"],
                       mean_attention_distance(model, x).numpy(), atol=1e-5)


@pytest.mark.skipif(not FASHION_MNIST.is_file(), reason="Fashion-MNIST not installed")
def test_analyze_command_on_dataset(tmp_path, checkpoint):
    out = tmp_path / "report"
    assert cli.main(["analyze", str(checkpoint), "--dataset", "fashion-mnist", "--n", "6", "--overlays", "2",
                     "--out", str(out)]) == 0
    numbers = json.loads((out / "analysis.json").read_text())
    assert numbers["attention_distance"]["data"]["images"] == 6
    assert len(numbers["rollout"]["data"]["images"]) == 2


@pytest.mark.parametrize("argv_tail,message", [(["--images", "IMAGES_DIR/nope.png"], "nope.png"),
                                               (["--images", "IMAGES_DIR/bad.png"], "bad.png"),
                                               (["--images", "IMAGES_DIR/rgb.png", "--head", "4"], "--head"),
                                               (["--dataset", "fashion-mnist", "--n", "0"], "--n")])
def test_analyze_command_bad_input_exits_2_naming_it(tmp_path, checkpoint, capsys, argv_tail, message):
    write_images(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG but not really")
    argv = [arg.replace("IMAGES_DIR", str(tmp_path)) for arg in argv_tail]
    assert cli.main(["analyze", str(checkpoint), *argv, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
