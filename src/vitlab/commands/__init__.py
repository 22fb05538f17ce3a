"""One module per `vitlab` sub-command: `add_parser(subparsers)` declares it, `args.run(args)` executes it."""

import argparse


def positive_int(text: str) -> int:
    """argparse type for counts: the usage error names the flag, before any model or data is loaded."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value
