"""int8 inference: speed of vitlab's `quantize="int8"` against timm fp32, and its accuracy on a trained checkpoint.

    python benchmarks/int8_speed.py [--batch 32] [--repeats 5] [--threads 2] [--checkpoint RUN_DIR] [--json PATH]

Speed: ViT-S/16 at 224 px with identical (seeded random) weights in timm's `vit_small_patch16_224` (fp32), vitlab
(fp32) and vitlab int8 (ONNX Runtime dynamic int8 dense layers). The three are timed interleaved (A, B, C, A, B, C,
...) after a warm-up, and the median of the repeats is reported with the ratio to timm. The ratio is the number to
compare: on a shared machine absolute img/s drift, but drift hits all three alike.

Accuracy (`--checkpoint`): fp32 and int8 top-1 on the test split of the data set the run was trained on (or
`--dataset`), and the share of test images on which both predict the same class.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from vitlab import create_model
from vitlab.export import quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's timer
from throughput import interleaved_rates  # noqa: E402


def int8_speed(batch: int = 32, repeats: int = 5, threads: int = 2) -> dict[str, Any]:
    """img/s of timm fp32, vitlab fp32 and vitlab int8 for ViT-S/16 at 224 px on the same weights."""
    import timm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    reference = timm.create_model("vit_small_patch16_224").eval()
    with torch.no_grad():
        reference.head.weight.normal_(0.0, 0.02)  # timm's head starts at zero; give the logits something to show
    model = create_model("vit-s16").eval()
    model.load_state_dict(reference.state_dict())  # vitlab uses timm's key names
    quantized = quantize_model(model, threads=threads)
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(images)
        fp32_difference = float((model(images) - expected).abs().max())
        int8_difference = float((quantized(images) - expected).norm() / expected.norm())
        rates = interleaved_rates({"timm fp32": lambda: reference(images), "vitlab fp32": lambda: model(images),
                                   "vitlab int8": lambda: quantized(images)}, batch, repeats, warmup=1,
                                  target_s=0.0)
    return {"model": "vit-s16", "img_size": 224, "batch": batch, "threads": threads, "repeats": repeats,
            "img_per_s": rates, "ratio_to_timm": {name: rate / rates["timm fp32"] for name, rate in rates.items()},
            "max_abs_logit_difference_fp32": fp32_difference,
            "relative_logit_difference_int8": int8_difference}


def int8_accuracy(checkpoint: str | Path, dataset: str | None = None, threads: int = 2) -> dict[str, Any]:
    """fp32 and int8 top-1 of a checkpoint on a test set, and how often the two predict the same class."""
    from vitlab.data import EvalTransform, load_dataset, match_channels
    from vitlab.errors import VitlabError
    from vitlab.eval.metrics import evaluate
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
    images = match_channels(test.images, config.in_chans)
    transform = EvalTransform(tuple(config.img_size))
    device = torch.device("cpu")
    fp32 = evaluate(model, images, test.labels, transform, device)
    int8 = evaluate(quantize_model(model, threads=threads), images, test.labels, transform, device)
    return {"checkpoint": str(checkpoint), "dataset": dataset, "images": len(test), "top1_fp32": fp32.top1,
            "top1_int8": int8.top1, "int8_minus_fp32_points": 100 * (int8.top1 - fp32.top1),
            "agreement": float((fp32.predictions == int8.predictions).double().mean())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", help="also measure accuracy on this run directory or weights file")
    parser.add_argument("--dataset", help="test set for --checkpoint (default: the one it was trained on)")
    parser.add_argument("--skip-speed", action="store_true", help="only the --checkpoint accuracy")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    if not args.skip_speed:
        speed = results["speed"] = int8_speed(args.batch, args.repeats, args.threads)
        print(f"ViT-S/16, 224 px, batch {speed['batch']}, {speed['threads']} threads, median of {speed['repeats']} "
              "interleaved repeats")
        for name, rate in speed["img_per_s"].items():
            print(f"  {name:12s} {rate:7.1f} img/s  {speed['ratio_to_timm'][name]:5.2f}x timm fp32")
        print(f"  max |vitlab fp32 - timm| logit {speed['max_abs_logit_difference_fp32']:.1e}; "
              f"|int8 - fp32| / |fp32| {speed['relative_logit_difference_int8']:.3f}")
    if args.checkpoint:
        accuracy = results["accuracy"] = int8_accuracy(args.checkpoint, args.dataset, args.threads)
        print(f"{accuracy['checkpoint']} on {accuracy['dataset']} test ({accuracy['images']} images): "
              f"top-1 fp32 {accuracy['top1_fp32']:.2%}, int8 {accuracy['top1_int8']:.2%} "
              f"({accuracy['int8_minus_fp32_points']:+.2f} points), agreement {accuracy['agreement']:.2%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
