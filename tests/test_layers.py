"""vitlab's layers run one way: no module imports a layer above its own, inside functions or not.

Each unit (a sub-package, or a top-level module) has a rank and imports only units of a lower rank; units of one
rank do not import each other, except on the ground floor, at the top (`vitlab` and its factory) and in the CLI.
A new unit must be given a rank here before the suite passes.
"""

from __future__ import annotations

import graphlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import load_benchmark

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. Ground floor: vitlab's error type, file/memory helpers, precision choice. studies: the study
# package (`study.py` while it is one module). factory and `vitlab/__init__.py` join models, weights and export
# for `create_model`.
RANKS = {
    "vitlab.errors": 0, "vitlab.atomic": 0, "vitlab.allocator": 0, "vitlab.limits": 0, "vitlab.precision": 0,
    "vitlab.models": 1,
    "vitlab.data": 2, "vitlab.weights": 2,
    "vitlab.export": 3,
    "vitlab.eval": 4, "vitlab.analysis": 4,
    "vitlab.train": 5,
    "vitlab.study": 6, "vitlab.studies": 6,
    "vitlab.serve": 7,
    "vitlab.factory": 8, "vitlab": 8,
    "vitlab.commands": 9, "vitlab.cli": 9, "vitlab.__main__": 9,
}
SAME_RANK_ALLOWED = {0, 8, 9}  # ground-floor helpers use errors; `vitlab` re-exports the factory; demo calls cli
# Narrower than the ranks: data holds images and labels and may use only the public `vitlab.models` package.
ONLY_PUBLIC = {("vitlab.data", "vitlab.models")}
# Module → module edges allowed to break the rules for now; each is to be removed, then deleted here.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


@pytest.fixture(scope="module")
def graph():
    return load_benchmark("import_graph")


def violations(graph, edges: set[tuple[str, str]]) -> list[str]:
    """Every module → module edge that the table forbids, as readable lines."""
    found = []
    for source, target in sorted(edges):
        source_unit, target_unit = graph.unit_of(source), graph.unit_of(target)
        if source_unit == target_unit or (source, target) in KNOWN_EXCEPTIONS:
            continue
        low, high = RANKS[target_unit], RANKS[source_unit]
        if low > high or (low == high and low not in SAME_RANK_ALLOWED):
            found.append(f"{source} imports {target} (rank {high} -> {low})")
        elif (source_unit, target_unit) in ONLY_PUBLIC and target != target_unit:
            found.append(f"{source} imports {target}, an internal of {target_unit}; use {target_unit}")
    return found


def test_every_unit_has_a_rank(graph) -> None:
    units = {graph.unit_of(module) for module in graph.modules(SRC)}
    assert sorted(units - set(RANKS)) == []


def test_no_layer_imports_a_higher_one(graph) -> None:
    assert violations(graph, graph.module_edges(SRC)) == []


def test_no_import_cycles(graph) -> None:
    """No two modules import each other, however indirectly: an import inside a function hides a cycle from
    Python, not from this check."""
    sorter = graphlib.TopologicalSorter()
    for source, target in graph.module_edges(SRC) - KNOWN_EXCEPTIONS:
        sorter.add(source, target)
    try:
        sorter.prepare()
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_known_exceptions_still_exist(graph) -> None:
    """An exception that no longer occurs is deleted from the list, so the list only shrinks."""
    assert sorted(KNOWN_EXCEPTIONS - graph.module_edges(SRC)) == []


def test_the_check_sees_upward_imports(graph, tmp_path) -> None:
    """A function-level import of weights from models (the cycle the layers removed) and a data → models-internal
    import are both caught; an import of a lower layer is not."""
    package = tmp_path / "vitlab"
    for folder in ("models", "data", "weights"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "models" / "registry.py").write_text(
        "def create():\n    from vitlab.weights.hub import load_pretrained\n")
    (package / "data" / "sets.py").write_text("from ..models import registry\nfrom vitlab.models import thing\n")
    (package / "weights" / "hub.py").write_text("from vitlab.models.registry import create\n")
    found = violations(graph, graph.module_edges(tmp_path))
    assert found == ["vitlab.data.sets imports vitlab.models.registry, an internal of vitlab.models; use vitlab.models",
                     "vitlab.models.registry imports vitlab.weights.hub (rank 1 -> 2)"]


def test_vitlab_exposes_its_subpackages() -> None:
    """`import vitlab; vitlab.weights` works without anything else importing `vitlab.weights` first."""
    code = ("import vitlab; print(vitlab.weights.load_model.__module__, vitlab.export.export_onnx.__module__, "
            "hasattr(vitlab, 'no_such_part'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert result.stdout.split() == ["vitlab.weights.io", "vitlab.export.onnx", "False"]
