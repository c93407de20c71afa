"""Every Python block of docs/integrations.md that runs in one CPU process runs as written.

Blocks whose first line is a ``# train.py`` comment are multi-process recipes: they are not
run here but by their dedicated tests (named at the top of the document), which also check
their results. A block that needs a library not importable here is skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
OPTIONAL = ("timm", "torchvision", "lightning", "accelerate")


def test_every_multi_process_recipe_names_how_to_launch_it():
    recipes = [b for b in BLOCKS if b.startswith("# train.py")]
    assert len(recipes) == 3 and len(BLOCKS) == 6
    assert all("python train.py" in b or "torchrun" in b for b in recipes)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_docs_block_runs(index):
    block = BLOCKS[index]
    if block.startswith("# train.py"):
        pytest.skip("a multi-process recipe: see its dedicated test")
    try:
        code = compile(block, f"docs/integrations.md block {index}", "exec")
        exec(code, {"__name__": "docs"})
    except ImportError as exc:
        if exc.name is None or exc.name.split(".")[0] not in OPTIONAL:
            raise
        pytest.skip(f"needs {exc.name}")
