"""`vitlab convert`: rewrite a checkpoint in another format (vitlab, Google .npz, timm, Hugging Face)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitlab.atomic import check_regular_target
from vitlab.errors import VitlabError, printable
from vitlab.weights import FORMATS, hf, load_model, save_weights
from vitlab.weights.io import resolve_path

_BY_SUFFIX = {".safetensors": "vitlab", ".npz": "npz", "": "hf"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert weights between vitlab, .npz, timm and Hugging Face formats",
        description="Read IN (any format vitlab loads) and write OUT. Without --to the format follows OUT: "
                    ".safetensors → vitlab, .npz → npz, no extension → hf (a directory); timm needs --to timm "
                    "(a directory OUT gets timm's model.safetensors + config.json). Class names and preprocessing "
                    "go along (vitlab metadata; HF id2label and preprocessor_config.json; timm's config.json).")
    parser.add_argument("input", metavar="IN", help="weight file, Hugging Face directory, vitlab run directory or "
                                                    "catalogue name (`vitlab models --pretrained`)")
    parser.add_argument("output", metavar="OUT", help="file or directory to write")
    parser.add_argument("--to", choices=FORMATS, default=None, help="output format (default: from OUT)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="model name (see `vitlab models`); needed for timm files, which omit the head count")
    parser.add_argument("--img-size", type=int, default=None, metavar="N",
                        help="resample the position embedding to N×N pixels before writing")
    parser.set_defaults(run=run)


def output_format(output: Path, requested: str | None) -> str:
    if requested is not None:
        return requested
    suffix = output.suffix.lower()
    if suffix not in _BY_SUFFIX:
        raise VitlabError(f"cannot tell the output format from {output.name!r}; pass --to {{{','.join(FORMATS)}}}")
    return _BY_SUFFIX[suffix]


def check_output(output: Path, fmt: str, source: str) -> None:
    """Before any work: refuse an output that is a link, a special file or the input itself (a run directory's
    checkpoint included), which would be replaced rather than written, or lose what the conversion drops."""
    inputs = (source, resolve_path(source)) if Path(source).exists() else ()  # else a catalogue name
    if fmt != "hf":
        check_regular_target(output, *inputs)
        return
    if output.is_symlink():
        check_regular_target(output)
    for name in (hf.WEIGHTS_NAME, hf.CONFIG_NAME):  # a Hugging Face directory: the files written into it
        check_regular_target(output / name, *inputs)


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    fmt = output_format(output, args.to)
    check_output(output, fmt, args.input)
    overrides = {"img_size": args.img_size} if args.img_size is not None else {}
    model = load_model(args.input, args.model, **overrides)
    save_weights(model, output, fmt)
    config = model.config
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"wrote {printable(output)} ({fmt}): {type(model).__name__} with {parameters:,} parameters, "
          f"{config.img_size[0]}x{config.img_size[1]} px, {config.num_classes} classes")
    return 0
