"""One module per `vitlab` sub-command: `add_parser(subparsers)` declares it, `args.run(args)` executes it."""

import argparse

from vitlab.precision import AMP_CHOICES


def positive_int(text: str) -> int:
    """argparse type for counts: the usage error names the flag, before any model or data is loaded."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def add_amp_option(parser: argparse.ArgumentParser) -> None:
    """`--amp` for commands that run a model: bf16 autocast where the hardware has it natively (`auto`), or forced."""
    parser.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                        help="auto: bf16 autocast on CUDA and on CPUs with AMX-BF16 or AVX512-BF16, else fp32 "
                             "(default); bf16 or fp32 force one")
