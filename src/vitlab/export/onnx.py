"""ONNX export: one graph that takes any batch size and, for ViTs, any image size the patch size divides.

The graph is traced with torch's TorchScript-based exporter (`dynamo=False`). With torch 2.14 it records the
run-time resampling of learned position embeddings as a Resize node fed by the input's shape, so the graph
matches PyTorch at sizes other than the traced one; the torch.export-based exporter would need the separate
onnxscript package. Opset 18 is the first whose Resize has the antialiasing that timm's bicubic mode uses.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from vitlab.atomic import atomic_path
from vitlab.errors import VitlabError
from vitlab.models.vit import VisionTransformer

OPSET = 18
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"


def require_onnxruntime() -> ModuleType:
    """The onnxruntime module, or an error that names the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise VitlabError("this needs onnxruntime: pip install 'vitlab[export]'") from None
    return onnxruntime


def writable_path(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path, after checking that its directory exists (so a long export does not fail at the end)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise VitlabError(f"{path}: the directory {path.parent} does not exist")
    if path.is_dir():
        raise VitlabError(f"{path} is a directory; name the file to write, such as {path / 'model.onnx'}")
    return path


def set_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Add key/value strings to an ONNX file's `metadata_props`, replacing keys it has already."""
    import onnx

    graph = onnx.load(str(path))
    kept = [prop for prop in graph.metadata_props if prop.key not in metadata]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def _bicubic_antialiased(g: Any, x: Any, output_size: Any, *_: Any) -> Any:
    """ONNX for `aten::_upsample_bicubic2d_aa`, which torch's exporter lacks: PyTorch's antialiased bicubic is
    PIL's (a = -0.5, half-pixel centres, weights renormalised over the taps inside the image)."""
    leading = g.op("Slice", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([0])),
                   g.op("Constant", value_t=torch.tensor([2])))
    sizes = g.op("Concat", leading, g.op("Cast", output_size, to_i=7), axis_i=0)  # 7: INT64
    unused = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    return g.op("Resize", x, unused, unused, sizes, mode_s="cubic", cubic_coeff_a_f=-0.5, antialias_i=1,
                exclude_outside_i=1, coordinate_transformation_mode_s="half_pixel")


class _SizeGuard(nn.Module):
    """The model behind a reshape that needs the input's height and width to be multiples of `stride`: ONNX
    Runtime then refuses the sizes PyTorch refuses, where a strided convolution would silently drop the rest."""

    def __init__(self, model: nn.Module, stride: int) -> None:
        super().__init__()
        self.model, self.stride = model, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tiles = x.reshape(batch, channels, height // self.stride, self.stride, width // self.stride, self.stride)
        return self.model(tiles.reshape(batch, channels, height, width))


def export_onnx(model: nn.Module, path: str | os.PathLike[str], opset: int = OPSET,
                metadata: dict[str, str] | None = None) -> Path:
    """Write `model`'s image → logits graph to `path` with dynamic batch (and, for ViTs, height and width) axes.

    The model is traced in eval mode at its configured image size; its training flag is restored afterwards.
    A ViT's graph refuses heights and widths its patch (or hybrid stride) does not divide, as the model does;
    other models take only their configured size. `metadata` goes into the graph's `metadata_props`.
    """
    try:
        import onnx  # noqa: F401  (torch's exporter imports it; fail with the extra's name, not torch's message)
    except ImportError:
        raise VitlabError("ONNX export needs the onnx package: pip install 'vitlab[export]'") from None
    path = writable_path(path)
    config = model.config
    vit = isinstance(model, VisionTransformer)
    axes = {0: "batch", 2: "height", 3: "width"} if vit else {0: "batch"}
    traced = _SizeGuard(model, config.stride) if vit else model
    sample = torch.zeros(2, config.in_chans, *config.img_size)  # batch 2: a batch of 1 can be folded into shapes
    was_training = model.training
    model.eval()
    torch.onnx.register_custom_op_symbolic("aten::_upsample_bicubic2d_aa", _bicubic_antialiased, opset)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter is deprecated but is the one that needs no extra package; the tracer warns
            # about the Python-side shape checks, which are constants by design.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            with atomic_path(path) as temporary:
                torch.onnx.export(traced, (sample,), str(temporary), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"}})
                if metadata:
                    set_metadata(temporary, metadata)
    finally:
        model.train(was_training)
    return path
