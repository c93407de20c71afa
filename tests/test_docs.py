"""Every Python block of docs/*.md runs as written: single-process blocks in this process, complete
multi-process scripts (``if __name__ == "__main__":``) as a subprocess."""

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


def test_docs_have_python_blocks():
    assert {name for name, _, _ in BLOCKS} >= {"deployment.md", "distributed.md"}


@pytest.mark.parametrize(("name", "index", "block"), BLOCKS, ids=[f"{n}-{i}" for n, i, _ in BLOCKS])
def test_docs_block_runs(name, index, block, tmp_path):
    if '__name__ == "__main__"' in block:
        script = tmp_path / f"{Path(name).stem}_{index}.py"
        script.write_text(block)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's chatter
        exec(compile(block, f"{name} block {index}", "exec"), {"__name__": "docs"})
