"""Packaging: one version, the typing marker, and a [test] extra that installs what the tests import."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import fsyncbn

ROOT = Path(__file__).resolve().parent.parent
LOCAL = {"fsyncbn", "tests", "benchmarks", "examples"}
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_is_written_once_and_read_by_the_build():
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*", fsyncbn.__version__)
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fsyncbn.__version__"}
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog or f"## [{fsyncbn.__version__}]" in changelog


def test_license_typing_marker_and_supported_versions():
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (ROOT / "fsyncbn" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["fsyncbn"]
    assert PYPROJECT["project"]["requires-python"] == ">=3.10"
    assert PYPROJECT["project"]["dependencies"] == ["torch>=2.4"]
    readme = (ROOT / "README.md").read_text()
    assert "Python >= 3.10" in readme and "torch >= 2.4" in readme


def _extra_requirements(extra: str) -> list[Requirement]:
    """The requirements of ``fsyncbn[extra]`` as pyproject.toml states them, self-references expanded."""
    found = []
    for text in PYPROJECT["project"]["optional-dependencies"][extra]:
        requirement = Requirement(text)
        if requirement.name == "fsyncbn":
            for inner in sorted(requirement.extras):
                found += _extra_requirements(inner)
        else:
            found.append(requirement)
    return found


def _installed_closure(requirements: list[Requirement]) -> set[str]:
    """Distributions installed by ``requirements`` and, recursively, their own requirements."""
    seen: set[str] = set()
    todo = [r.name for r in requirements]
    todo += [Requirement(text).name for text in PYPROJECT["project"]["dependencies"]]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether an import sits in a ``try`` that catches ImportError (an optional import)."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Try) and node in parent.body:
            names = {ast.unparse(h.type) for h in parent.handlers if h.type is not None}
            if names & {"ImportError", "ModuleNotFoundError", "(ImportError, ModuleNotFoundError)"}:
                return True
        node = parent
    return False


def _third_party_imports() -> dict[str, str]:
    """Top-level modules that the tests and examples import unconditionally -> a file."""
    modules: dict[str, str] = {}
    for folder in ("tests", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                if _guarded(node, parents):
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in LOCAL:
                        modules.setdefault(top, str(path.relative_to(ROOT)))
    return modules


def test_the_test_extra_installs_every_module_the_tests_and_examples_import():
    """``pip install -e ".[test]"`` must be enough for ``pytest``: nothing installed by hand."""
    closure = _installed_closure(_extra_requirements("test"))
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module, where in _third_party_imports().items():
        distributions = {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(module, [module])}
        if not distributions & closure:
            missing[module] = where
    assert not missing, f"imported but not installed by the [test] extra: {missing}"


def test_the_optional_integrations_have_extras_that_test_includes():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"examples", "lightning", "accelerate", "onnx", "test"} <= extras.keys()
    names = {r.name for r in _extra_requirements("test")}
    assert {"scikit-learn", "matplotlib", "tqdm", "lightning", "accelerate", "onnx", "onnxruntime",
            "onnxscript", "pytest"} <= names
