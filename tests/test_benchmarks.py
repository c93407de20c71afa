"""The benchmark suite's non-timing cases are checked as properties (never timed here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cases

ROOT = Path(__file__).resolve().parent.parent


def test_memory_saved_for_backward_is_torch_plus_o_of_c():
    for row in cases.memory():
        # At most O(C) more than torch; never less than the input, which backward needs.
        assert abs(row["extra_bytes"]) <= 16 * row["channels"], row


def test_communication_per_layer_is_constant_in_the_world_size():
    rows = cases.communication(channels=64)
    sent = {row["world_size"]: row["fsyncbn"] for row in rows}
    assert set(sent.values()) == {4 * 64 + 4}, sent  # 2C + 4 forward, 2C backward


@pytest.mark.slow
def test_entry_point_writes_json_and_markdown(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--cases", "c,e", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "results.json").stat().st_size > 100
    assert "| world size |" in (tmp_path / "results.md").read_text()
