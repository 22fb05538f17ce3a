"""README.md stays short, its links resolve, and its model table is the registry's (`vitlab models --markdown`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from vitlab.commands.models import markdown_table
from vitlab.models.registry import list_models

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 250
START, END = "<!-- models:start -->", "<!-- models:end -->"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def readme_table(text: str) -> str:
    """The text between the model-table markers, which must each appear exactly once and in order."""
    assert text.count(START) == 1 and text.count(END) == 1, f"README.md needs one {START} and one {END}"
    _, rest = text.split(START)
    table, _ = rest.split(END)
    return table.strip()


def relative_links(text: str) -> list[str]:
    """Link targets that are neither absolute URLs nor in-page anchors, without their #fragment."""
    targets = [match.group(1) for match in LINK.finditer(text)]
    return [target.split("#")[0] for target in targets if not re.match(r"[a-z]+:|#", target)]


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; the limit is {MAX_LINES}"


def test_readme_model_table_is_the_registry() -> None:
    expected = markdown_table(list_models())
    assert readme_table(README.read_text(encoding="utf-8")) == expected, (
        "README.md's model table differs from the registry; paste `python -m vitlab models --markdown` between "
        f"{START} and {END}")


def test_markdown_table_names_every_registered_model_once() -> None:
    rows = markdown_table(list_models()).splitlines()[2:]
    names = [row.split("|")[1].strip().strip("`") for row in rows]
    assert names == list_models()


def test_models_markdown_cli_prints_the_table() -> None:
    result = subprocess.run([sys.executable, "-m", "vitlab", "models", "vit-ti", "--markdown"], capture_output=True,
                            text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == markdown_table(list_models("vit-ti"))
    assert "| `vit-ti16` | vit | 5,717,416 | 224×224 |" in result.stdout


def test_readme_relative_links_resolve() -> None:
    links = relative_links(README.read_text(encoding="utf-8"))
    assert links, "README.md links to no docs page"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_link_and_table_parsers_catch_mistakes() -> None:
    text = f"[a](docs/x.md#part) [b](https://example.org) [c](#top)\n{START}\n| t |\n{END}\n"
    assert relative_links(text) == ["docs/x.md"]
    assert readme_table(text) == "| t |"
