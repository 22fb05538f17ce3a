"""Every picture vitlab draws: PNG panels in the style of the ViT paper's Fig. 6-7 with an index page that shows
them with their numbers, a run's training curves, and the studies' charts.

Uses matplotlib's object API on the Agg canvas (no pyplot), so it runs headless and never changes the backend
of an interactive session that imports it.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vitlab.atomic import atomic_path, atomic_write
from vitlab.errors import VitlabError

HEATMAP = "jet"


def literal(text: object) -> str:
    """`text` as Matplotlib draws it literally: every `$` escaped, so a name such as `$\\frac$.png` is not parsed as
    mathtext (which would raise on drawing, or render something else)."""
    return str(text).replace("$", r"\$")


def _numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


def _save(figure: Figure, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=dpi)
    return path


def _display_image(image: torch.Tensor | np.ndarray, mean: float, std: float) -> tuple[np.ndarray, str | None]:
    """A normalised (C, H, W) image back in [0, 1], as imshow wants it (gray for one channel)."""
    pixels = np.clip(_numpy(image) * std + mean, 0.0, 1.0)
    if pixels.shape[0] == 3:
        return pixels.transpose(1, 2, 0), None
    return pixels.mean(axis=0), "gray"


def _unit_scale(heatmap: np.ndarray) -> np.ndarray:
    """Stretch a map to [0, 1] (min to max) for display; a constant map becomes all zero."""
    low, high = (float(heatmap.min()), float(heatmap.max())) if heatmap.size else (0.0, 0.0)
    return (heatmap - low) / (high - low) if high > low else np.zeros_like(heatmap)


def _overlay(axes: Any, image: torch.Tensor | np.ndarray | None, heatmap: np.ndarray, mean: float,
             std: float, vmax: float | None = None) -> Any:
    """Draw a heatmap, over the image when given; stretched to [0, 1] unless a common `vmax` (scale 0..vmax)."""
    values, top = (_unit_scale(heatmap), 1.0) if vmax is None else (heatmap, vmax)
    if image is None:
        drawn = axes.imshow(values, cmap=HEATMAP, vmin=0.0, vmax=top, interpolation="nearest")
    else:
        pixels, cmap = _display_image(image, mean, std)
        height, width = pixels.shape[:2]
        axes.imshow(pixels, cmap=cmap, vmin=0.0, vmax=1.0)
        drawn = axes.imshow(values, cmap=HEATMAP, vmin=0.0, vmax=top, alpha=0.5, interpolation="bilinear",
                            extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    axes.set_xticks([])
    axes.set_yticks([])
    return drawn


def plot_rollout(images: torch.Tensor, rollout: torch.Tensor, path: str | Path, mean: float = 0.5,
                 std: float = 0.5, titles: Sequence[str] | None = None) -> Path:
    """Each input (top row) above its attention-rollout map overlaid on it (bottom row), as in Fig. 6.

    `images` are the normalised model inputs (B, C, H, W), `rollout` the (B, gh, gw) maps; each map is stretched
    over its own range (minimum to maximum), since only where the model looks matters here.
    """
    if images.shape[0] != rollout.shape[0]:
        raise VitlabError(f"plot_rollout: {images.shape[0]} images but {rollout.shape[0]} rollout maps")
    count = images.shape[0]
    figure = Figure(figsize=(1.8 * count + 0.4, 3.8))
    grid = figure.subplots(2, count, squeeze=False)
    maps = _numpy(rollout)
    for index in range(count):
        pixels, cmap = _display_image(images[index], mean, std)
        grid[0, index].imshow(pixels, cmap=cmap, vmin=0.0, vmax=1.0)
        grid[0, index].set_xticks([])
        grid[0, index].set_yticks([])
        if titles is not None:
            grid[0, index].set_title(literal(titles[index]), fontsize=8)
        _overlay(grid[1, index], images[index], maps[index], mean, std)
    grid[0, 0].set_ylabel("input")
    grid[1, 0].set_ylabel("rollout")
    figure.suptitle("Attention rollout")
    figure.tight_layout()
    return _save(figure, path)


def plot_layer_attention(layer_maps: torch.Tensor, path: str | Path, head: int, image: torch.Tensor | None = None,
                         mean: float = 0.5, std: float = 0.5, label: str = "class-token attention") -> Path:
    """One small map per layer, (L, gh, gw), of what one head attends to, overlaid on `image` when given.

    All layers share one colour scale (0 to the largest weight anywhere), so a layer that spreads its attention
    evenly looks flat instead of being stretched into apparent structure.
    """
    layers = layer_maps.shape[0]
    columns = min(layers, 6)
    rows = math.ceil(layers / columns)
    figure = Figure(figsize=(1.7 * columns + 0.9, 1.8 * rows + 0.5), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    maps = _numpy(layer_maps)
    top = max(float(maps.max()), 1e-12) if maps.size else 1.0
    drawn = None
    for index, axes in enumerate(grid.flat):
        if index >= layers:
            axes.axis("off")
            continue
        drawn = _overlay(axes, image, maps[index], mean, std, vmax=top)
        axes.set_title(f"layer {index + 1}", fontsize=8)
    figure.suptitle(literal(f"{label}, head {head}"))
    if drawn is not None:
        figure.colorbar(drawn, ax=grid.ravel().tolist(), shrink=0.9, label="attention weight")
    return _save(figure, path)


def _scatter_per_head(values: np.ndarray) -> tuple[Figure, Any, np.ndarray]:
    """A figure with one dot per head for each row of a (rows, heads) array, rows numbered from 1 on the x axis."""
    figure = Figure(figsize=(4.8, 3.6))
    axes = figure.subplots()
    position = np.arange(1, values.shape[0] + 1)
    for head in range(values.shape[1]):
        axes.scatter(position, values[:, head], s=14, label=f"head {head}")
    return figure, axes, position


def plot_attention_distance(distances: torch.Tensor, path: str | Path, image_size: tuple[int, int] | None = None
                            ) -> Path:
    """Mean attention distance (L, H) against depth, one dot per head, as in Fig. 7 (right)."""
    values = _numpy(distances)
    heads = values.shape[1]
    figure, axes, depth = _scatter_per_head(values)
    if heads <= 16:
        axes.legend(fontsize=6, ncol=2, loc="lower right")
    axes.set_xlabel("Network depth (layer)")
    axes.set_ylabel("Mean attention distance (pixels)")
    axes.set_xticks(depth)
    top = float(np.nanmax(values)) if values.size else 1.0
    if image_size is not None:
        top = max(top, math.hypot(*image_size) / 2)
    axes.set_ylim(0.0, top * 1.05 + 1e-6)
    axes.set_title(f"Attention distance ({heads} heads per layer)", fontsize=10)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_position_similarity(similarity: torch.Tensor, path: str | Path) -> Path:
    """The (gh, gw, gh, gw) similarity as a grid of small grids, as in Fig. 7 (centre).

    The tile at row i, column j shows the cosine similarity of patch (i, j)'s position embedding to all others.
    """
    values = _numpy(similarity)
    rows, columns = values.shape[:2]
    step_y, step_x = rows + 1, columns + 1  # one blank row/column between tiles
    mosaic = np.full((rows * step_y - 1, columns * step_x - 1), np.nan, dtype=np.float32)
    for i in range(rows):
        for j in range(columns):
            mosaic[i * step_y:i * step_y + rows, j * step_x:j * step_x + columns] = values[i, j]
    figure = Figure(figsize=(5.2, 4.6 * rows / columns + 0.4 if columns else 4.6))
    axes = figure.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = axes.imshow(np.ma.masked_invalid(mosaic), cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
    axes.set_xticks([j * step_x + (columns - 1) / 2 for j in range(columns)], [str(j + 1) for j in range(columns)],
                    fontsize=6)
    axes.set_yticks([i * step_y + (rows - 1) / 2 for i in range(rows)], [str(i + 1) for i in range(rows)], fontsize=6)
    axes.tick_params(length=0)
    for side in axes.spines.values():
        side.set_visible(False)
    axes.set_xlabel("Input patch column")
    axes.set_ylabel("Input patch row")
    axes.set_title("Position embedding similarity", fontsize=10)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="Cosine similarity")
    figure.tight_layout()
    return _save(figure, path)


def plot_embedding_components(components: torch.Tensor, path: str | Path) -> Path:
    """The (k, C, P, P) principal components of the patch-embedding filters, as in Fig. 7 (left).

    Each component is min-max scaled on its own (their sign and scale carry no meaning); three channels are
    shown in colour, any other count as the channel mean in gray.
    """
    values = _numpy(components)
    count = values.shape[0]
    columns = min(max(count, 1), 7)
    rows = max(math.ceil(count / columns), 1)
    figure = Figure(figsize=(1.1 * columns + 0.2, 1.2 * rows + 0.5))
    grid = figure.subplots(rows, columns, squeeze=False)
    for index, axes in enumerate(grid.flat):
        axes.set_xticks([])
        axes.set_yticks([])
        if index >= count:
            axes.axis("off")
            continue
        component = values[index]
        low, high = float(component.min()), float(component.max())
        component = (component - low) / (high - low) if high > low else np.zeros_like(component)
        if component.shape[0] == 3:
            axes.imshow(component.transpose(1, 2, 0), interpolation="nearest")
        else:
            axes.imshow(component.mean(axis=0), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.suptitle(f"Embedding filters (first {count} principal components)", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def plot_cross_attention(image: torch.Tensor, maps: torch.Tensor, latents: torch.Tensor, path: str | Path,
                         mean: float = 0.5, std: float = 0.5, title: str = "Cross-attention") -> Path:
    """A Perceiver's attention from its latents to one image's pixels, as in the Perceiver paper's Fig. 3 and 7.

    `maps` is (S, N, H, W) for one head, `latents` (S, k) the latent indices to draw. The input is shown once; each
    row is one cross-attend: the mean map over all N latents, then the k latents' maps. Each map is stretched over
    its own range, since one latent's attention can be far sharper than another's.
    """
    values = _numpy(maps)
    chosen = latents.tolist()
    steps, columns = len(chosen), len(chosen[0]) + 2
    figure = Figure(figsize=(1.3 * columns + 0.2, 1.45 * steps + 0.6))
    grid = figure.subplots(steps, columns, squeeze=False)
    pixels, cmap = _display_image(image, mean, std)
    grid[0, 0].imshow(pixels, cmap=cmap, vmin=0.0, vmax=1.0)
    grid[0, 0].set_xticks([])
    grid[0, 0].set_yticks([])
    grid[0, 0].set_title("input", fontsize=7)
    for row in range(steps):
        if row:
            grid[row, 0].axis("off")
        _overlay(grid[row, 1], None, values[row].mean(axis=0), mean, std)
        grid[row, 1].set_title("mean of latents", fontsize=7)
        grid[row, 1].set_ylabel(f"cross-attend {row + 1}", fontsize=7)
        for column, latent in enumerate(chosen[row], start=2):
            _overlay(grid[row, column], None, values[row, latent], mean, std)
            grid[row, column].set_title(f"latent {latent}", fontsize=7)
    figure.suptitle(literal(title), fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def plot_cross_attention_entropy(entropy: torch.Tensor, path: str | Path, max_entropy: float) -> Path:
    """Mean entropy of the latents' attention over the pixels, (S, heads), against the cross-attend: one dot per head.

    The dashed line is `max_entropy`, log(H·W), attention spread evenly over every pixel; 0 would be every latent
    reading a single pixel, so the plot shows how local each cross-attend's reads are.
    """
    values = _numpy(entropy)
    heads = values.shape[1]
    figure, axes, position = _scatter_per_head(values)
    axes.axhline(max_entropy, color="gray", linestyle="--", linewidth=1, label="uniform")
    axes.legend(fontsize=6, loc="lower right")
    axes.set_xlabel("Cross-attend")
    axes.set_ylabel("Mean entropy of a latent's attention (nats)")
    axes.set_xticks(position)
    axes.set_ylim(0.0, max_entropy * 1.05 + 1e-6)
    axes.set_title(f"Cross-attention entropy ({heads} head{'s' if heads > 1 else ''})", fontsize=10)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def _jsonable(value: Any) -> Any:
    """Tensors and arrays become (nested) lists, so the numbers behind each picture can be re-plotted."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def write_index(out_dir: str | Path, entries: Sequence[Mapping[str, Any]], title: str = "vitlab analysis") -> Path:
    """Write `out_dir/index.html` showing each entry's PNG with its caption, and `out_dir/analysis.json`.

    Each entry is a mapping with `file` (a PNG inside `out_dir`, relative or absolute), `caption`, and optional
    `title` and `data` (the numbers behind the picture; tensors and arrays are stored as lists). The JSON maps
    each PNG's stem to {file, title, caption, data}. Returns the index path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections, numbers = [], {}
    for position, entry in enumerate(entries):
        if "file" not in entry:
            raise VitlabError(f"write_index: entry {position} has no 'file'")
        file = Path(entry["file"])
        if not file.is_absolute():
            file = out_dir / file
        if not file.is_file():
            raise VitlabError(f"write_index: {file} does not exist")
        try:
            relative = file.resolve().relative_to(out_dir.resolve()).as_posix()
        except ValueError:
            raise VitlabError(f"write_index: {file} is not inside {out_dir}") from None
        heading = str(entry.get("title", file.stem))
        caption = str(entry.get("caption", ""))
        sections.append(f'<figure id="{html.escape(file.stem, quote=True)}">\n<h2>{html.escape(heading)}</h2>\n'
                        f'<img src="{html.escape(relative, quote=True)}" alt="{html.escape(heading, quote=True)}">\n'
                        f'<figcaption>{html.escape(caption)}</figcaption>\n</figure>')
        numbers[file.stem] = {"file": relative, "title": heading, "caption": caption,
                              "data": _jsonable(entry.get("data", {}))}
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            "<style>body{font-family:sans-serif;max-width:64em;margin:auto;padding:1em}"
            "figure{margin:2em 0}img{max-width:100%;border:1px solid #ddd}figcaption{color:#444}</style>\n"
            f"</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            '<p>Numbers behind each picture: <a href="analysis.json">analysis.json</a>.</p>\n'
            + "\n".join(sections) + "\n</body>\n</html>\n")
    atomic_write(out_dir / "analysis.json", json.dumps(numbers, indent=1))
    index = out_dir / "index.html"
    atomic_write(index, page)
    return index


# ---------------------------------------------------------------------------------------------------- training
def plot_training_curves(records: Sequence[Mapping[str, Any]], out_path: str | Path) -> Path | None:
    """A run's loss and test accuracy against steps, from its metrics records; None (nothing drawn) without any."""
    if not records:
        return None
    steps = [record["step"] for record in records]
    figure = Figure(figsize=(10, 3.8))
    loss_axis, acc_axis = figure.subplots(1, 2)
    loss_axis.plot(steps, [record["train_loss"] for record in records], label="train loss")
    loss_axis.plot(steps, [record["test_loss"] for record in records], label="test loss")
    loss_axis.set_xlabel("step")
    loss_axis.legend()
    acc_axis.plot(steps, [100 * record["test_top1"] for record in records], label="test top-1")
    acc_axis.plot(steps, [100 * record["test_top5"] for record in records], label="test top-5")
    acc_axis.set_xlabel("step")
    acc_axis.set_ylabel("%")
    acc_axis.legend()
    figure.tight_layout()
    return _save(figure, out_path, dpi=110)


# ---------------------------------------------------------------------------------------------------- studies
def plot_study_lines(series: Mapping[str, Sequence[tuple[int, float | None]]], sizes: Sequence[int], title: str,
                     out_path: str | Path) -> Path:
    """Test top-1 (%) against training-set size on a log axis, one line per label; a None point is left out."""
    figure = Figure(figsize=(6, 4.2))
    axes = figure.add_subplot()
    for label, points in series.items():
        finished = [(size, top1) for size, top1 in points if top1 is not None]
        axes.plot([size for size, _ in finished], [top1 for _, top1 in finished], marker="o", label=label)
    axes.set_xscale("log")
    axes.set_xticks(sizes, [f"{size:,}" for size in sizes])
    axes.minorticks_off()
    axes.set_xlabel("training images")
    axes.set_ylabel("test top-1 (%)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return _save(figure, out_path, dpi=110)


def plot_study_bars(labels: Sequence[str], values: Sequence[float | None], title: str, out_path: str | Path) -> Path:
    """Test top-1 (%) as one bar per run; a None value (a run not finished yet) is labelled pending, with no bar."""
    figure = Figure(figsize=(max(4.0, 1.6 * len(values)), 4.2))
    axes = figure.add_subplot()
    finished = [value for value in values if value is not None] or [0.0]
    bars = axes.bar(range(len(values)), [value or 0.0 for value in values], color="tab:blue")
    axes.bar_label(bars, labels=["pending" if value is None else f"{value:.1f}" for value in values])
    axes.set_xticks(range(len(values)), labels, fontsize=8)
    axes.set_ylabel("test top-1 (%)")
    axes.set_ylim(max(0.0, min(finished) - 10), min(100.0, max(finished) + 5))
    axes.set_title(title)
    figure.tight_layout()
    return _save(figure, out_path, dpi=110)
