"""No docstring or comment under src/ carries a measurement: figures go stale with the code, so they live in docs/."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# What a benchmark figure looks like: a percentage with a decimal or a gain (+4-5%, ~30%, up to 20%), a speed-up
# (1.22×, 1.2x, 3-7x), a throughput, a time in ms or µs, or a date.
MEASUREMENT = re.compile(
    r"\d+\.\d+ ?%"
    r"|(?:[+~]|\bup to |\babout )\d+(?:[-–]\d+)? ?%"
    r"|\d+\.\d+ ?(?:×|x\b)"
    r"|\b\d+(?:\.\d+)? ?[-–] ?\d+(?:\.\d+)? ?(?:×|x\b)"
    r"|img/s|GFLOP/?s"
    r"|\b\d+(?:\.\d+)? ?(?:ms|µs|us)\b"
    r"|\b20\d\d-\d\d-\d\d\b")


def texts(source: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every docstring line and every comment in `source`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                for offset, line in enumerate(first.value.value.splitlines()):
                    yield first.value.lineno + offset, line
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string


def measurements(source: str, name: str) -> list[str]:
    """`name:line: text` for each docstring or comment line of `source` that carries a measurement."""
    return [f"{name}:{line}: {text.strip()}" for line, text in texts(source) if MEASUREMENT.search(text)]


def test_src_docstrings_and_comments_carry_no_measurements() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert files
    found = [hit for path in files for hit in measurements(path.read_text(encoding="utf-8"),
                                                           str(path.relative_to(SRC.parent)))]
    assert not found, "measurements belong in docs/, not in code:\n" + "\n".join(found)


@pytest.mark.parametrize("text", [
    "1.22x faster at 9 tokens", "about 1.7× torch.ao", "3-7x as long", "reaches 90.36% top-1", "9.9 against 30.9 ms",
    "434 us over the last dim", "+4-5% on a step", "~30% more time", "up to 20% of a step",
    "at 3,850 img/s", "12 GFLOP/s", "measured on 2026-12-01"])
def test_a_reintroduced_figure_is_named(text: str) -> None:
    source = f'"""Module."""\n\n\ndef f() -> None:\n    """Does f: {text}."""\n\n\nx = 1  # {text}\n'
    assert measurements(source, "m.py") == [f"m.py:5: Does f: {text}.", f"m.py:8: # {text}"]


@pytest.mark.parametrize("text", [
    "4×4 patches", "widen 4×", "bf16 autocast", "paper §3.1", "0.8 GB per image", "R50x1", "std 0.02", "1×1 conv",
    "torch 2.14"])
def test_facts_that_are_not_measurements_pass(text: str) -> None:
    assert measurements(f'"""{text}."""\n# {text}\n', "m.py") == []


def test_strings_that_are_not_docstrings_are_not_scanned() -> None:
    source = 'def f(top1: float) -> str:\n    """Format a result."""\n    return f"{top1:.2%} at 1.22x, 5 ms"\n'
    assert measurements(source, "m.py") == []
