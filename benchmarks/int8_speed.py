"""int8 and bf16 inference against fp32: speed on one model, and accuracy on a trained checkpoint.

    python benchmarks/int8_speed.py [--model vit-s16] [--batch 32] [--repeats 5] [--threads 2] [--quick]
                                    [--checkpoint RUN_DIR] [--dataset NAME] [--skip-speed] [--json PATH]

Speed: one model (ViT-S/16 at 224 px by default, or `fmnist-vit`) with identical seeded weights in timm (fp32, the
reference) and vitlab: fp32, bf16 autocast (on CPUs with bf16 units, AMX-BF16 or AVX512-BF16; elsewhere bf16 is
emulated and left out), ONNX Runtime's dynamic int8 (`vitlab int8`, what `vitlab export --int8` and
`create_model(..., quantize="int8")` give) and PyTorch's dynamic int8 Linear (`torch int8`, `torch.ao` with the
x86 engine). All are timed interleaved (A, B, C, A, B, C, ...) after a warm-up, and the median of the repeats is
reported with the ratio to timm fp32: on a shared machine absolute img/s drift, but drift hits all of them alike.
The summary names the faster int8 path on this CPU and sets bf16 against it.

Accuracy (`--checkpoint`): top-1 in fp32, bf16 autocast and both int8 paths on the test split of the data set the
run was trained on (or `--dataset`), and the share of test images on which each predicts the same class as fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from vitlab.export import torch_int8_model
from vitlab.precision import autocast, cpu_bf16_units

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's models and timer
from throughput import SPECS, build_int8, build_timm, build_vitlab, images, interleaved_rates  # noqa: E402

INT8_PATHS = ("vitlab int8", "torch int8")  # ONNX Runtime's, PyTorch's


def int8_speed(model: str = "vit-s16", batch: int = 32, repeats: int = 5, threads: int = 2) -> dict[str, Any]:
    """img/s of timm fp32 and vitlab fp32, bf16 (where native), ONNX Runtime int8 and PyTorch int8 on one model."""
    torch.set_num_threads(threads)
    spec = SPECS[model]
    source = build_vitlab(spec).eval()
    reference = build_timm(spec, source).model.eval()
    with tempfile.TemporaryDirectory(prefix="vitlab-int8-") as folder:
        ort_int8 = build_int8(source, Path(folder), threads).model
    torch_int8 = torch_int8_model(source)
    x, _ = images(spec, batch)
    cpu = torch.device("cpu")
    units = cpu_bf16_units()

    def bf16() -> torch.Tensor:
        with autocast(True, cpu):
            return source(x)

    calls = {"timm fp32": lambda: reference(x), "vitlab fp32": lambda: source(x),
             **({"vitlab bf16": bf16} if units else {}),
             "vitlab int8": lambda: ort_int8(x), "torch int8": lambda: torch_int8(x)}
    with torch.inference_mode():
        expected = source(x)
        difference = {name: float((call().float() - expected).norm() / expected.norm())
                      for name, call in calls.items() if name != "vitlab fp32"}
        rates = interleaved_rates(calls, batch, repeats, warmup=1, target_s=0.0)
    fastest_int8 = max(INT8_PATHS, key=lambda name: rates[name])
    return {"model": model, "img_size": list(spec.config.img_size), "batch": batch, "threads": threads,
            "repeats": repeats, "cpu_bf16_units": units, "quantized_engine": torch.backends.quantized.engine,
            "img_per_s": rates, "ratio_to_timm": {name: rate / rates["timm fp32"] for name, rate in rates.items()},
            "relative_logit_difference_to_vitlab_fp32": difference, "fastest_int8": fastest_int8,
            "bf16_over_fastest_int8": rates["vitlab bf16"] / rates[fastest_int8] if units else None}


def int8_accuracy(checkpoint: str | Path, dataset: str | None = None, threads: int = 2) -> dict[str, Any]:
    """Top-1 of a checkpoint in fp32, bf16 autocast and both int8 paths on a test set, and each one's agreement
    with fp32 (the share of images given the same class)."""
    from vitlab.data import EvalTransform, load_dataset, match_channels
    from vitlab.errors import VitlabError
    from vitlab.eval.metrics import evaluate
    from vitlab.export import quantize_model
    from vitlab.train.run_dir import checkpoint_train_config
    from vitlab.weights import load_model

    torch.set_num_threads(threads)
    model = load_model(checkpoint).eval()
    if dataset is None:
        train_config = checkpoint_train_config(Path(checkpoint))
        if train_config is None:
            raise VitlabError(f"{checkpoint} does not record its data set: pass --dataset")
        dataset = train_config.dataset
    config = model.config
    test = load_dataset(dataset, "test", img_size=config.img_size[0])
    test_images = match_channels(test.images, config.in_chans)
    transform = EvalTransform(tuple(config.img_size))
    device = torch.device("cpu")
    results = {"fp32": evaluate(model, test_images, test.labels, transform, device),
               "bf16": evaluate(model, test_images, test.labels, transform, device, autocast=True),
               "vitlab int8": evaluate(quantize_model(model, threads=threads), test_images, test.labels, transform,
                                       device),
               "torch int8": evaluate(torch_int8_model(model), test_images, test.labels, transform, device)}
    fp32 = results["fp32"]
    return {"checkpoint": str(checkpoint), "dataset": dataset, "images": len(test),
            "bf16_native": cpu_bf16_units() is not None,
            "top1": {name: result.top1 for name, result in results.items()},
            "minus_fp32_points": {name: 100 * (result.top1 - fp32.top1) for name, result in results.items()},
            "agreement_with_fp32": {name: float((fp32.predictions == result.predictions).double().mean())
                                    for name, result in results.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SPECS), default="vit-s16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="batch 2, one repeat: checks it runs")
    parser.add_argument("--checkpoint", help="also measure accuracy on this run directory or weights file")
    parser.add_argument("--dataset", help="test set for --checkpoint (default: the one it was trained on)")
    parser.add_argument("--skip-speed", action="store_true", help="only the --checkpoint accuracy")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 2, 1
    results: dict[str, Any] = {}
    if not args.skip_speed:
        speed = results["speed"] = int8_speed(args.model, args.batch, args.repeats, args.threads)
        print(f"{speed['model']}, {speed['img_size'][0]} px, batch {speed['batch']}, {speed['threads']} threads, "
              f"median of {speed['repeats']} interleaved repeats; CPU bf16 units: {speed['cpu_bf16_units']}; "
              f"torch quantized engine: {speed['quantized_engine']}")
        for name, rate in speed["img_per_s"].items():
            difference = speed["relative_logit_difference_to_vitlab_fp32"].get(name)
            print(f"  {name:12s} {rate:8.1f} img/s  {speed['ratio_to_timm'][name]:5.2f}x timm fp32"
                  + (f"  |logits - vitlab fp32| / |vitlab fp32| {difference:.3f}" if difference is not None else ""))
        line = f"  fastest int8 here: {speed['fastest_int8']}"
        if speed["bf16_over_fastest_int8"] is not None:
            line += f"; bf16 autocast runs at {speed['bf16_over_fastest_int8']:.2f}x its speed"
        print(line)
    if args.checkpoint:
        accuracy = results["accuracy"] = int8_accuracy(args.checkpoint, args.dataset, args.threads)
        print(f"{accuracy['checkpoint']} on {accuracy['dataset']} test ({accuracy['images']} images):")
        for name, top1 in accuracy["top1"].items():
            print(f"  {name:12s} top-1 {top1:.2%} ({accuracy['minus_fp32_points'][name]:+.2f} points), agreement "
                  f"with fp32 {accuracy['agreement_with_fp32'][name]:.2%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
