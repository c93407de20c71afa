"""The architecture as docs/architecture.md draws it, checked statically: no import circle (lazy
imports included), the pure math imports nothing of the rest, the layer module stays thin, one
router, and the map names only modules that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fsyncbn"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every fsyncbn module -> the fsyncbn modules it imports, anywhere in its body."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    assert len(modules) > 20, sorted(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    found.add(target)
        graph[name] = found
    return graph


GRAPH = _imports()


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _strip_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ re-exports its modules: importing a submodule imports its package
    first, which is not a dependency between rooms."""
    packages = {n for n in graph if (PACKAGE.parent / n.replace(".", "/") / "__init__.py").exists()}
    return {n: {m for m in deps if m not in packages} for n, deps in graph.items() if n not in packages}


def test_the_circle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_lazy_imports_included():
    assert _cycle(_strip_packages(GRAPH)) is None, _cycle(_strip_packages(GRAPH))


def test_the_pure_math_imports_nothing_of_the_rest():
    functional = [n for n in GRAPH if n.startswith("fsyncbn.functional")]
    assert functional
    for name in functional:
        outside = {m for m in GRAPH[name] if not m.startswith("fsyncbn.functional")}
        assert not outside, (name, outside)


def test_the_layer_module_is_thin():
    lines = (PACKAGE / "modules.py").read_text().count("\n")
    assert lines <= 300, lines


def test_one_function_chooses_the_path():
    """Only functional/ops.py's choose_path decides between the paths."""
    deciders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if re.search(r"def (choose_path|runs_fused|serves_natively)\b", text):
            deciders.append(path.relative_to(ROOT).as_posix())
    assert deciders == ["fsyncbn/functional/ops.py"], deciders


def test_the_map_names_only_modules_that_exist():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:fsyncbn|tests|benchmarks|examples|scripts)/[\w/]+\.py)", text))
    assert len(named) > 20, sorted(named)
    missing = sorted(p for p in named if not (ROOT / p).exists()
                     and not (ROOT / p.replace(".py", "/__init__.py")).exists())
    assert not missing, missing


def test_every_module_of_the_package_is_on_the_map():
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
                     if p.name != "__init__.py")
    assert modules
    absent = [m for m in modules if m.split("/")[-1] not in text]
    assert not absent, absent
