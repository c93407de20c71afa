"""The benchmark suite's non-timing cases are checked as properties (never timed here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cases, report

ROOT = Path(__file__).resolve().parent.parent


def test_memory_saved_for_backward_is_torch_plus_o_of_c():
    for row in cases.memory():
        # At most O(C) more than torch; never less than the input, which backward needs.
        assert abs(row["extra_bytes"]) <= 16 * row["channels"], row


def test_communication_counts_forward_and_backward_for_both_libraries():
    c = 64
    rows = cases.communication(channels=c)
    for row in rows:
        # fsyncbn, measured: 2C + 4 float64 forward, 2C float32 backward, at every world size.
        assert (row["fsyncbn_forward"], row["fsyncbn_backward"]) == (2 * c + 4, 2 * c), row
        assert row["fsyncbn_total"] == 4 * c + 4 and row["fsyncbn_bytes"] == 8 * (2 * c + 4) + 4 * 2 * c
        # torch.nn.SyncBatchNorm: all_gather of W x (2C + 1), then all_reduce of 2C, float32.
        w = row["world_size"]
        assert (row["torch_forward"], row["torch_backward"]) == (w * (2 * c + 1), 2 * c), row
        assert row["torch_bytes"] == 4 * row["torch_total"]
    assert sorted(row["world_size"] for row in rows) == [2, 4, 8]


def test_summary_includes_a_new_timed_case():
    row = {"case": "f layer", "shape": "s", "mode": "eager", "vs": "torch sync", "ours_us": 1.0,
           "theirs_us": 2.0, "low": 0.4, "high": 0.6}
    results = {"machine": "GPU", "quick": False, "seconds": 1.0,
               "rows": [{**row, "ratio": 0.5}, {**row, "shape": "t", "ratio": 0.75}]}
    block = report.performance_block({"cuda": results})
    assert "| f layer, eager, against torch sync | 0.50 to 0.75 |" in block
    assert "| s | eager | torch sync | 1 | 2 | 0.50 (0.40-0.60) | - / - |" in report.markdown(results)


def test_report_shows_a_case_it_has_no_layout_for():
    results = {"machine": "m", "quick": True, "seconds": 1.0,
               "rows": [{"case": "f new case", "shape": "(2, 3)", "speedup": 1.23456}]}
    table = report.markdown(results)
    assert "| case | shape | speedup |" in table and "| f new case | (2, 3) | 1.23 |" in table


@pytest.mark.slow
def test_entry_point_writes_the_results_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--cases", "c,e", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "cpu.json").read_text())
    assert {row["case"].split()[0] for row in results["rows"]} == {"c", "e"}
    assert report.markdown(results) in result.stdout
    assert "| world size | C | fsyncbn forward |" in result.stdout


def test_inplace_abn_saves_at_most_055_of_torchs_bytes_at_depth_10():
    """Case g's saved-bytes figure as a property (deterministic, never timed)."""
    from benchmarks import inplace_abn

    row = inplace_abn.saved_over_depth((10,), compiled=False)[0]
    assert row["ratio vs torch"] <= 0.55, row
    # The out-of-place layer keeps what torch keeps.
    assert row[inplace_abn.VARIANTS[1]] == row[inplace_abn.VARIANTS[0]], row


def test_inplace_abn_block_shows_every_row_of_its_results_file():
    results = json.loads(report.INPLACE_ABN.read_text())
    block = report.inplace_abn_block(results)
    assert block.count("| saved for backward") == sum(r["case"] == "g saved bytes" for r in results["rows"])
    assert "peak memory of a training step, decoder head" in block
