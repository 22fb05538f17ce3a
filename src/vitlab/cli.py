"""`vitlab` command line: one entry point, each sub-command parsed into configs and handed to the library.

Exit codes are a contract: 0 success, 2 bad input or usage (one line on stderr, no traceback), 1 anything else;
130 after Ctrl-C and 128 + N after signal N (SIGTERM, SIGHUP), each with one line. Everything printed about a
name the user or a file chose goes through `vitlab.errors.printable`, so it stays one line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from vitlab.allocator import keep_freed_memory
from vitlab.errors import TrainingDiverged, VitlabError, printable

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
        self.exit(2, f"{self.prog}: error: {printable(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitlab", description="Vision Transformers: build, train, load, analyse.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so it unwinds as after Ctrl-C (the trainer's `finally`
    blocks run, no traceback) and the CLI exits 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Interrupted` while the command runs; the previous handlers come back after (main
    is also called in-process, by tests and scripts). Signal handlers can only be set from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    numbers = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {number: signal.signal(number, _raise_interrupted) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def main(argv: Sequence[str] | None = None) -> int:
    command = "vitlab"
    try:  # from the very start: an interrupt while the sub-commands' modules (torch) import is one line too
        with _signals_as_interrupts():
            parser = build_parser()
            args = parser.parse_args(argv)
            command = f"vitlab {args.command}"
            args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that re-launch (torchrun)
            return _run(args, command)
    except KeyboardInterrupt as interrupt:
        return _interrupted(command, interrupt)


def _run(args: argparse.Namespace, command: str) -> int:
    from vitlab.limits import check_training_options

    keep_freed_memory()
    try:
        check_training_options(getattr(args, "epochs", None), getattr(args, "seed", None),
                               getattr(args, "settings", []), getattr(args, "device", None))
        return int(args.run(args) or 0)
    except VitlabError as error:
        print(f"{command}: error: {printable(error)}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"{command}: error: no such file: {printable(error.filename or error)}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.filename is None:  # a failure that names no file: a real one, with its traceback
            raise
        # A file in the way of a directory, an unwritable or full output: the file's name says what to change.
        in_the_way = isinstance(error, FileExistsError) and not os.path.isdir(error.filename)
        reason = "exists and is not a directory" if in_the_way else error.strerror
        print(f"{command}: error: {printable(error.filename)}: {printable(reason or error)}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"{command}: {printable(error)}", file=sys.stderr)
        return 1


def _interrupted(command: str, interrupt: KeyboardInterrupt) -> int:
    """One line for Ctrl-C (exit 130) or SIGTERM/SIGHUP (exit 128 + N); a training run says how to go on."""
    signum = getattr(interrupt, "signum", signal.SIGINT)
    cause = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    hint = getattr(interrupt, "resume_hint", None)  # the trainer's: which step is saved, and the command
    advice = ""
    if hint:
        advice = f"; {hint}"
    elif command in ("vitlab train", "vitlab finetune"):
        advice = "; run it again with --resume to continue from its last checkpoint"
    with contextlib.suppress(OSError, ValueError):  # stderr itself may be gone (a closed terminal: SIGHUP)
        print(f"{command}: {cause}{advice}", file=sys.stderr)
    return 128 + int(signum)


if __name__ == "__main__":
    sys.exit(main())
