"""`vitlab` command line: one entry point, each sub-command parsed into configs and handed to the library.

Exit codes are a contract: 0 success, 2 bad input or usage (one line on stderr, no traceback), 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from vitlab.allocator import keep_freed_memory
from vitlab.errors import TrainingDiverged, VitlabError

# Module name → the module that defines `add_parser(subparsers)`, which adds its sub-commands (`evaluate` adds
# eval, fewshot and predict; `train` adds train and finetune), each with `run(args) -> int`.
COMMANDS: dict[str, str] = {
    "models": "vitlab.commands.models",
    "convert": "vitlab.commands.convert",
    "export": "vitlab.commands.export",
    "train": "vitlab.commands.train",
    "evaluate": "vitlab.commands.evaluate",
    "demo": "vitlab.commands.demo",
    "analyze": "vitlab.commands.analyze",
    "data": "vitlab.commands.data",
    "study": "vitlab.commands.study",
    "serve": "vitlab.commands.serve",
}


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors already; keep its message to one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitlab", description="Vision Transformers: build, train, load, analyse.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that re-launch themselves (torchrun)
    keep_freed_memory()
    try:
        return int(args.run(args) or 0)
    except VitlabError as error:
        print(f"vitlab {args.command}: error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"vitlab {args.command}: error: no such file: {error.filename or error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.filename is None:  # a failure that names no file: a real one, with its traceback
            raise
        # A file in the way of a directory, an unwritable or full output: the file's name says what to change.
        in_the_way = isinstance(error, FileExistsError) and not os.path.isdir(error.filename)
        reason = "exists and is not a directory" if in_the_way else error.strerror
        print(f"vitlab {args.command}: error: {error.filename}: {reason or error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"vitlab {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
