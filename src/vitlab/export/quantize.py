"""int8 inference: the model's dense layers as dynamic int8 matrix products, run by ONNX Runtime.

ONNX Runtime's dynamic quantisation is used because it was the fastest int8 path on CPU, ahead of PyTorch's
`torch.ao` dynamic int8 Linear and torchao (docs/performance.md, int8). Weights are int8 per output channel;
activations are quantised per tensor on the fly, so no calibration data is needed. The patch-embedding convolution
and attention's Q·Kᵀ and P·V products stay fp32: the dense layers carry most of a ViT's FLOPs.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitlab.atomic import atomic_path
from vitlab.errors import VitlabError
from vitlab.export.onnx import INPUT_NAME, export_onnx, require_onnxruntime, writable_path

QUANTIZE_MODES = ("int8",)


def check_quantize_mode(mode: str) -> None:
    if mode not in QUANTIZE_MODES:
        raise VitlabError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")


def export_int8_onnx(model: nn.Module, path: str | Path) -> Path:
    """Write `model` as an ONNX graph (dynamic axes as `export_onnx`) whose MatMul/Gemm layers are dynamic int8."""
    path = writable_path(path)
    require_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs a pre-processing hint on the root logger for every call
    try:
        with tempfile.TemporaryDirectory(prefix="vitlab-int8-") as folder:
            fp32 = export_onnx(model, Path(folder) / "fp32.onnx")
            with atomic_path(path) as temporary:
                quantize_dynamic(str(fp32), str(temporary), weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.setLevel(level)
    return path


class OnnxRuntimeModel(nn.Module):
    """An inference-only stand-in for a model: `forward(images) → logits` through an ONNX Runtime session.

    It keeps the source model's `config`; it has no parameters, attention maps or training mode. The session uses
    as many threads as `torch.get_num_threads()` did when it was created, so both libraries share one setting.
    """

    def __init__(self, graph: bytes, config: Any, threads: int | None = None) -> None:
        super().__init__()
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        logits = self.session.run(None, {INPUT_NAME: pixels})[0]
        return torch.from_numpy(logits).to(x.device)


def quantize_model(model: nn.Module, mode: str = "int8", threads: int | None = None) -> OnnxRuntimeModel:
    """`model` with dynamic int8 dense layers, for CPU inference; `model` itself is left unchanged."""
    check_quantize_mode(mode)
    with tempfile.TemporaryDirectory(prefix="vitlab-int8-") as folder:
        graph = export_int8_onnx(model, Path(folder) / "int8.onnx").read_bytes()
    return OnnxRuntimeModel(graph, model.config, threads)
