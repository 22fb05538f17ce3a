"""`vitlab export`: write a checkpoint as an ONNX graph (fp32, or with dynamic int8 dense layers) and check it."""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from vitlab.atomic import check_regular_target
from vitlab.errors import printable
from vitlab.export import (INPUT_NAME, OnnxRuntimeModel, bf16_against_int8, export_int8_onnx, export_onnx,
                           require_onnxruntime, writable_path)
from vitlab.precision import cpu_bf16_units


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a checkpoint as an ONNX graph with dynamic batch, height and width",
        description="Write CHECKPOINT as an ONNX graph for ONNX Runtime: dynamic batch, and for ViTs dynamic height "
                    "and width (position embeddings are resampled inside the graph). --int8 quantises the dense "
                    "layers to int8 (dynamic activations, per-channel weights). The graph is then run once on two "
                    "random images and compared with PyTorch fp32. With --int8 on a CPU with bf16 units, the model is "
                    "also timed under bf16 autocast at batch 8, and a note says when bf16 is the faster.")
    parser.add_argument("checkpoint", help="a vitlab run directory or any weights file vitlab can load")
    parser.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    parser.add_argument("--int8", action="store_true", help="dynamic int8 MatMul/Gemm layers (CPU inference)")
    parser.add_argument("--model", metavar="NAME", help="registry name, for weight files that do not name their model")
    parser.set_defaults(run=run)


def onnx_metadata(model: torch.nn.Module) -> dict[str, str]:
    """The graph's `metadata_props`: the class names and preprocessing (JSON, as in vitlab files; the default
    ViT preprocessing when the checkpoint records none) and the input size."""
    from vitlab.weights.card import CLASSES_KEY, PREPROCESSING_KEY, Preprocessing
    from vitlab.weights.io import model_card

    card = model_card(model)
    config = model.config
    preprocessing = card.preprocessing or Preprocessing()
    return {CLASSES_KEY: json.dumps(card.class_names(config.num_classes)),
            PREPROCESSING_KEY: json.dumps(preprocessing.to_dict(config.img_size))}


def run(args: argparse.Namespace) -> int:
    from vitlab.weights import load_model
    from vitlab.weights.io import resolve_path

    ort = require_onnxruntime()
    out = check_regular_target(writable_path(args.out), args.checkpoint, resolve_path(args.checkpoint))
    model = load_model(args.checkpoint, model_name=args.model).eval()
    metadata = onnx_metadata(model)
    if args.int8:
        export_int8_onnx(model, out, metadata)
    else:
        export_onnx(model, out, metadata=metadata)
    config = model.config
    images = torch.randn(2, config.in_chans, *config.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images).numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: images.numpy()})[0]
    kind = "int8" if args.int8 else "fp32"
    print(f"wrote {printable(out)} (ONNX, {kind}, {out.stat().st_size / 2 ** 20:.1f} MiB); on 2 random "
          f"{config.img_size[0]}x{config.img_size[1]} images max |onnx - torch fp32| = "
          f"{float(np.abs(got - expected).max()):.2e}")
    if args.int8:
        _note_when_bf16_is_faster(model, OnnxRuntimeModel(out.read_bytes(), config))
    return 0


def _note_when_bf16_is_faster(model: torch.nn.Module, int8: torch.nn.Module, batch: int = 8) -> None:
    """One line when this CPU's native bf16 autocast outran the int8 graph just written, timed here at `batch`:
    capability alone does not decide it, as int8 can still win on CPUs with AVX512-BF16 but no AMX."""
    rates = bf16_against_int8(model, int8, batch)
    if rates is not None and rates[0] > rates[1]:
        print(f"note: this CPU runs bf16 autocast natively ({cpu_bf16_units()}); timed here at batch {batch}, the "
              f"model ran at {rates[0]:.0f} img/s under bf16 against {rates[1]:.0f} in this int8 graph, so "
              "`vitlab predict --amp bf16` (what --amp auto chooses here) is faster than int8 on this CPU")
