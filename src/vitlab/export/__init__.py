"""Models out of PyTorch: ONNX graphs (`onnx`) and int8 inference through ONNX Runtime (`quantize`).

This layer sits above `vitlab.models` and imports nothing else of vitlab's but the ground floor.
"""

from vitlab.export.onnx import INPUT_NAME, OPSET, OUTPUT_NAME, export_onnx, require_onnxruntime, writable_path
from vitlab.export.quantize import (QUANTIZE_MODES, OnnxRuntimeModel, bf16_against_int8, check_quantize_mode,
                                    export_int8_onnx, quantize_model, torch_int8_model)

__all__ = ["INPUT_NAME", "OPSET", "OUTPUT_NAME", "QUANTIZE_MODES", "OnnxRuntimeModel", "bf16_against_int8",
           "check_quantize_mode", "export_int8_onnx", "export_onnx", "quantize_model", "require_onnxruntime",
           "torch_int8_model", "writable_path"]
