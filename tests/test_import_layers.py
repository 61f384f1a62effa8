"""The house's floors, read from the code: every import of arbor's own modules points down or sideways
within a package, never up, and no modules import each other in a circle (lazy imports in function
bodies and importlib calls by name count too).

    python tests/test_import_layers.py      # prints the arrows between packages; exits 1 on a bad one

Floors, lowest first (docs/architecture.md draws them):
  0 ground    core/arbor_core        config, errors, rope, kv layout, planner, tokenizer, protocols
  1 weights   weights/arbor_weights  formats and the model store
  2 backends  backends/arbor_torch, backends/arbor_mlx (neither imports the other)
  3 app       arbor_cli              Model, sessions, commands, serve
"""

from __future__ import annotations

import ast
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {  # import name -> (folder, floor)
    "arbor_core": ("core/arbor_core", 0),
    "arbor_weights": ("weights/arbor_weights", 1),
    "arbor_torch": ("backends/arbor_torch", 2),
    "arbor_mlx": ("backends/arbor_mlx", 2),
    "arbor_cli": ("arbor_cli", 3),
}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of every package."""
    found = {}
    for package, (folder, _) in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [package, *path.relative_to(root / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported_names(name: str, path: Path, known: dict[str, Path]):
    """The names one module imports, at any depth of its body, relative imports resolved."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
            yield node.value  # importlib.import_module("arbor_torch") and tables of such names


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the arbor modules it imports."""
    known = modules(root)
    graph = {}
    for name, path in known.items():
        targets = set()
        for imported in _imported_names(name, path, known):
            while imported and imported not in known:  # `from pkg.mod import function` names pkg.mod
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def floor(module: str) -> int:
    return PACKAGES[module.split(".")[0]][1]


def upward_arrows(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports that point to a higher floor, or across to another package of the same floor."""
    bad = []
    for source, targets in graph.items():
        for target in targets:
            same_package = source.split(".")[0] == target.split(".")[0]
            if floor(target) > floor(source) or (floor(target) == floor(source) and not same_package):
                bad.append((source, target))
    return sorted(bad)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_points_up_a_floor():
    assert upward_arrows(import_graph()) == []


def test_no_modules_import_each_other_in_a_circle():
    assert circles(import_graph()) == []


def test_the_checks_catch_an_upward_arrow_and_a_circle():
    graph = {"arbor_core.rope": {"arbor_cli.model"}, "arbor_cli.model": {"arbor_core.rope"},
             "arbor_torch.model": {"arbor_mlx.model"}, "arbor_mlx.model": set()}
    assert upward_arrows(graph) == [("arbor_core.rope", "arbor_cli.model"), ("arbor_torch.model", "arbor_mlx.model")]
    assert circles(graph) == [["arbor_cli.model", "arbor_core.rope"]]


def test_every_package_is_found():
    found = {name.split(".")[0] for name in modules()}
    assert found == set(PACKAGES)


def main() -> int:
    graph = import_graph()
    arrows = Counter((s.split(".")[0], t.split(".")[0]) for s, targets in graph.items() for t in targets
                     if s.split(".")[0] != t.split(".")[0])
    by_floor = defaultdict(list)
    for package, (folder, level) in PACKAGES.items():
        by_floor[level].append(f"{package} ({folder})")
    for level in sorted(by_floor, reverse=True):
        print(f"floor {level}: {', '.join(by_floor[level])}")
    for (source, target), count in sorted(arrows.items(), key=lambda kv: (-floor(kv[0][0]), kv[0])):
        print(f"  {source} -> {target}: {count} imports")
    bad, loops = upward_arrows(graph), circles(graph)
    for source, target in bad:
        print(f"UPWARD: {source} -> {target}")
    for loop in loops:
        print(f"CIRCLE: {' <-> '.join(loop)}")
    print("no upward arrow, no circle" if not bad and not loops else "the layering is broken")
    return 1 if bad or loops else 0


if __name__ == "__main__":
    sys.exit(main())
