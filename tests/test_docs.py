"""Every Python block of docs/*.md runs as written: single-process blocks in this process, complete
multi-process scripts (``if __name__ == "__main__":``) as a subprocess (10 to 30 s each on 2 cores).

Blocks whose first line is a ``# train.py`` comment are recipes for a launcher (torchrun, a
Lightning Trainer with several processes): their dedicated tests run them and check their
results (tests/test_integrations_*.py). A block that needs an optional library that does not
import here (timm, torchvision) is skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = [
    (path.name, index, block)
    for path in sorted((ROOT / "docs").glob("*.md"))
    for index, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))
]


OPTIONAL = ("timm", "torchvision")


def test_docs_have_python_blocks():
    assert {name for name, _, _ in BLOCKS} >= {"deployment.md", "distributed.md", "integrations.md"}


def test_every_launcher_recipe_says_how_to_launch_it():
    recipes = [block for _, _, block in BLOCKS if block.startswith("# train.py")]
    assert len(recipes) == 3
    assert all("python train.py" in b or "torchrun" in b for b in recipes)


def _is_script(block: str) -> bool:
    return '__name__ == "__main__"' in block


CASES = [
    pytest.param(name, index, block, id=f"{name}-{index}",
                 marks=[pytest.mark.distributed, pytest.mark.slow] if _is_script(block) else [])
    for name, index, block in BLOCKS
]


@pytest.mark.parametrize(("name", "index", "block"), CASES)
def test_docs_block_runs(name, index, block, tmp_path, monkeypatch):
    """Each block runs in a temporary directory: what it writes (checkpoints, lightning_logs/,
    exported files) stays out of the repository."""
    if block.startswith("# train.py"):
        pytest.skip("a recipe for a launcher: its dedicated test runs it")
    code = compile(block, f"{name} block {index}", "exec")
    if _is_script(block):
        script = tmp_path / f"{Path(name).stem}_{index}.py"
        script.write_text(block)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0 and "terminate called" not in done.stderr, (
            f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's chatter
        try:
            exec(code, {"__name__": "docs"})
        except ImportError as exc:
            if exc.name is None or exc.name.split(".")[0] not in OPTIONAL:
                raise
            pytest.skip(f"needs {exc.name}")
