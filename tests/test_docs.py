"""Every Python block of docs/*.md runs as written: single-process blocks in this process, complete
multi-process scripts (``if __name__ == "__main__":``) as a subprocess.

The 4-process sync-groups recipe runs only with ``FSYNCBN_DOCS_ALL=1`` (about 30 s on 2 cores):
tests/test_groups.py makes the same calls on 4 ranks; it is always compiled.
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
FOUR_PROCESS_RECIPES = {("distributed.md", 0)}


def test_docs_have_python_blocks():
    assert {name for name, _, _ in BLOCKS} >= {"deployment.md", "distributed.md"}
    assert all("nprocs=4" in block for name, index, block in BLOCKS if (name, index) in FOUR_PROCESS_RECIPES)


@pytest.mark.parametrize(("name", "index", "block"), BLOCKS, ids=[f"{n}-{i}" for n, i, _ in BLOCKS])
def test_docs_block_runs(name, index, block, tmp_path):
    code = compile(block, f"{name} block {index}", "exec")
    if '__name__ == "__main__"' in block:
        if (name, index) in FOUR_PROCESS_RECIPES and os.environ.get("FSYNCBN_DOCS_ALL") != "1":
            pytest.skip("4-process recipe: set FSYNCBN_DOCS_ALL=1 (tests/test_groups.py covers it)")
        script = tmp_path / f"{Path(name).stem}_{index}.py"
        script.write_text(block)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's chatter
        exec(code, {"__name__": "docs"})
