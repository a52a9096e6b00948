"""Static import graph of samtune's packages and its circles (a helper for tests, not a test file).

Every ``import`` / ``from ... import`` counts, at module level and inside functions (a lazy import
still ties the two modules together), except under ``if TYPE_CHECKING:`` (never executed).
``importlib.import_module("name")`` is not an edge: that is how registries load implementations
they know only by name.
"""

from __future__ import annotations

import ast
from pathlib import Path

# package name -> folder (relative to the repo root), as pyproject's package-dir maps them
SAMTUNE_PACKAGES = {
    "samtune": "finetune/_samtune",
    "samtune.finetune": "finetune",
    "samtune.datasets": "datasets",
    "samtune.adapters": "adapters",
}


def _modules(root: Path, package_dirs: dict[str, str]) -> dict[str, Path]:
    """Module name -> file. A file belongs to the package with the deepest folder holding it
    (finetune/_samtune/*.py is ``samtune.*``, not ``samtune.finetune._samtune.*``)."""
    folders = sorted(((root / d).resolve(), pkg) for pkg, d in package_dirs.items())
    found: dict[str, Path] = {}
    for folder, _ in folders:
        for path in folder.rglob("*.py"):
            path = path.resolve()
            owner, pkg = max(((f, p) for f, p in folders if path.is_relative_to(f)), key=lambda fp: len(fp[0].parts))
            parts = list(path.relative_to(owner).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([pkg, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that ``name`` is or lies in; None for outside packages."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Known modules a module imports: ``import a.b`` -> a.b; ``from a import b`` -> a.b when
    that is a module, else a. Nodes under ``if TYPE_CHECKING:`` are skipped."""
    found: set[str | None] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the body runs only under a type checker
            continue
        if isinstance(node, ast.Import):
            found.update(_resolve(alias.name, known) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package, one level up per extra dot
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in known else _resolve(source, known))
        stack.extend(ast.iter_child_nodes(node))
    return {m for m in found if m is not None}


def import_edges(root: Path, package_dirs: dict[str, str] = SAMTUNE_PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of the same packages it imports (outside packages left out: they
    cannot close a circle through ours)."""
    files = _modules(root, package_dirs)
    known = set(files)
    edges: dict[str, set[str]] = {}
    for module, path in sorted(files.items()):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges[module] = _imports(tree, module, path.name == "__init__.py", known) - {module}
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative), each sorted;
    every module in one can reach every other through imports."""
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def describe_cycle(edges: dict[str, set[str]], component: list[str]) -> str:
    """The imports inside one component, one ``a -> b`` per line (the ones to cut)."""
    members = set(component)
    return "\n".join(f"  {a} -> {b}" for a in component for b in sorted(edges.get(a, ())) if b in members)
