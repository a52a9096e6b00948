"""No import circles among samtune's modules, lazy (function-level) imports included
(tests/unit/import_graph.py builds the graph)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# loaded by path: tests/ has no __init__.py, and putting tests/unit on sys.path would let its
# adapters/ and datasets/ folders pass for packages of those names
_spec = importlib.util.spec_from_file_location("samtune_tests_import_graph", Path(__file__).with_name("import_graph.py"))
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)


def test_no_import_circles():
    edges = import_graph.import_edges(REPO, import_graph.SAMTUNE_PACKAGES)
    assert {"samtune.adapters.family", "samtune.finetune.cli", "samtune.datasets.formats", "samtune.errors"} <= set(edges)
    cycles = import_graph.find_cycles(edges)
    for cycle in cycles:
        print(f"import circle among {len(cycle)} modules:\n{import_graph.describe_cycle(edges, cycle)}")
    assert not cycles, f"{len(cycles)} import circle(s): {cycles} (the imports of each are printed above)"


def test_checker_sees_a_circle_closed_by_a_lazy_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from demo.b import helper\n")
    (pkg / "b.py").write_text("def helper():\n    from demo import a\n    return a\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import demo.a\n\nimport os\n"
    )  # a type-only import is no edge, an outside module no node
    edges = import_graph.import_edges(tmp_path, {"demo": "pkg"})
    assert edges == {"demo": set(), "demo.a": {"demo.b"}, "demo.b": {"demo.a"}, "demo.c": set()}
    assert import_graph.find_cycles(edges) == [["demo.a", "demo.b"]]
    # cut the lazy import: no circle left
    (pkg / "b.py").write_text("def helper():\n    return None\n")
    assert import_graph.find_cycles(import_graph.import_edges(tmp_path, {"demo": "pkg"})) == []
