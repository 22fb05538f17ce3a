"""Print the import edges between vitlab's sub-packages, imports inside functions included.

Usage: python benchmarks/import_graph.py [SRC] [--modules]
SRC is the directory that holds `vitlab/` (default: src). Each line is `importer -> imported`: by default between
units (a sub-package such as `vitlab.models`, or a top-level module such as `vitlab.cli`), with edges inside a unit
left out; with `--modules`, between modules. `tests/test_layers.py` checks these edges against vitlab's layers.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(path: Path, src: Path) -> str:
    """`src/vitlab/models/vit.py` → `vitlab.models.vit`; a package's `__init__.py` → the package."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(src: Path) -> dict[str, Path]:
    """Every vitlab module under `src`, by dotted name."""
    return {module_name(path, src): path for path in sorted((src / "vitlab").rglob("*.py"))}


def imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The vitlab modules that the import statements anywhere in `path` (functions included) name.

    `from vitlab.models import checks` names the submodule `vitlab.models.checks`, `from vitlab.models import
    build_model` the package `vitlab.models`.
    """
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "vitlab")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "vitlab":
                continue
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    found.discard(module)
    return found


def module_edges(src: Path) -> set[tuple[str, str]]:
    """(importer, imported) pairs between vitlab modules."""
    found = modules(src)
    return {(module, target) for module, path in found.items() for target in imports(path, module, set(found))}


def unit_of(module: str) -> str:
    """`vitlab.models.vit` → `vitlab.models`; `vitlab.cli` → `vitlab.cli`; `vitlab` → `vitlab`."""
    return ".".join(module.split(".")[:2])


def unit_edges(src: Path) -> set[tuple[str, str]]:
    """(importer unit, imported unit) pairs, edges inside a unit left out."""
    return {(unit_of(source), unit_of(target)) for source, target in module_edges(src)
            if unit_of(source) != unit_of(target)}


def main(argv: list[str]) -> int:
    args = [arg for arg in argv if arg != "--modules"]
    src = Path(args[0]) if args else Path("src")
    for source, target in sorted(module_edges(src) if "--modules" in argv else unit_edges(src)):
        print(f"{source} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
