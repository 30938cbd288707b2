"""The runtime files import each other without loops, data and tokenizer below the model (every import counts,
lazy ones inside functions included)."""

import ast
from functools import cache

from conftest import ROOT


def import_graph() -> dict[str, set[str]]:
    """Each root *.py module -> the root modules it imports anywhere in its text."""
    modules = {p.stem for p in ROOT.glob("*.py")}
    graph = {}
    for name in modules:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[name] = (imported & modules) - {name}
    return graph


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """1 for a module importing no other, else 1 + the deepest of its imports (needs no loops)."""

    @cache
    def level(name: str, path: tuple[str, ...] = ()) -> int:
        assert name not in path, f"import loop: {' -> '.join((*path, name))}"
        return 1 + max((level(dep, (*path, name)) for dep in graph[name]), default=0)

    return {name: level(name) for name in graph}


def test_no_import_loops_and_fewer_than_16_levels():
    depth = levels(import_graph())
    assert max(depth.values()) < 16, depth


def test_data_and_tokenizer_sit_below_the_model():
    graph = import_graph()

    def reaches(a: str, b: str, seen: frozenset = frozenset()) -> bool:
        return b in graph[a] or any(reaches(c, b, seen | {a}) for c in graph[a] - seen)

    for low in ("data", "tokenizer", "precision", "schedule", "weights"):
        assert not reaches(low, "ola"), f"{low}.py imports the model"
    assert not reaches("probe", "train") and not reaches("train", "inference")
