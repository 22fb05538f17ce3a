"""int8 inference: the model's dense layers as dynamic int8 matrix products, run by ONNX Runtime (or PyTorch).

ONNX Runtime's dynamic quantisation is used because it was the fastest int8 path on CPU, ahead of PyTorch's
`torch.ao` dynamic int8 Linear and torchao (docs/performance.md, int8). Weights are int8 per output channel;
activations are quantised per tensor on the fly, so no calibration data is needed. The patch-embedding convolution
and attention's Q·Kᵀ and P·V products stay fp32: the dense layers carry most of a ViT's FLOPs.
`torch_int8_model` is PyTorch's own dynamic int8 (`torch.ao`, the x86 engine's VNNI kernels), kept for
`benchmarks/int8_speed.py` to set against ONNX Runtime's on each CPU. On a CPU with bf16 units, bf16 autocast may
beat both: `bf16_against_int8` times the two on the machine at hand.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitlab.atomic import atomic_path
from vitlab.errors import VitlabError
from vitlab.export.onnx import INPUT_NAME, export_onnx, require_onnxruntime, set_metadata, writable_path
from vitlab.precision import autocast, cpu_bf16_units, cpu_int8_units

QUANTIZE_MODES = ("int8",)


def check_quantize_mode(mode: str) -> None:
    if mode not in QUANTIZE_MODES:
        raise VitlabError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")


def export_int8_onnx(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None,
                     reduce_range: bool | None = None) -> Path:
    """Write `model` as an ONNX graph (dynamic axes, size checks and `metadata` as `export_onnx`) whose MatMul/Gemm
    layers are dynamic int8. `reduce_range` quantises weights to 7 bits, as ONNX Runtime advises for CPUs without
    VNNI (whose int8 kernels would otherwise saturate); by default it is chosen for the CPU at hand."""
    if reduce_range is None:
        reduce_range = cpu_int8_units() is None
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
                                 reduce_range=reduce_range, op_types_to_quantize=["MatMul", "Gemm"])
                set_metadata(temporary, {**(metadata or {}), "int8_reduce_range": str(reduce_range).lower()})
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


def torch_int8_model(model: nn.Module) -> nn.Module:
    """A copy of `model` whose `nn.Linear` layers are PyTorch dynamic int8 (per-channel int8 weights, activations
    quantised per tensor on the fly, as ONNX Runtime's), run by the quantized engine PyTorch selected (`x86` on x86
    builds); for CPU inference. `torch.ao.quantization` warns that it is deprecated: silenced, as the call is
    deliberate."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)


def bf16_against_int8(model: nn.Module, int8: nn.Module, batch: int = 8, calls: int = 3
                      ) -> tuple[float, float] | None:
    """Images per second of `model` under bf16 autocast and of its int8 stand-in, each timed `calls` times in turn
    on `batch` random images at the model's size after a warm-up call (best of the calls), on the CPU; None where
    the CPU has no bf16 units, as bf16 would be emulated there and slower than fp32."""
    if cpu_bf16_units() is None:
        return None
    config = model.config
    images = torch.randn(batch, config.in_chans, *config.img_size, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")

    def bf16_call() -> None:
        with autocast(True, cpu):
            model(images)

    best = [float("inf"), float("inf")]
    with torch.inference_mode():
        for round_ in range(calls + 1):
            for index, call in enumerate((bf16_call, lambda: int8(images))):
                start = time.perf_counter()
                call()
                if round_:  # the first round warms up
                    best[index] = min(best[index], time.perf_counter() - start)
    return batch / best[0], batch / best[1]
