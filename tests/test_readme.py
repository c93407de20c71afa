"""README.md: every Python block runs, its figures are the results files', its API table is __all__."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch.distributed as dist

import fsyncbn
import fsyncbn.functional
from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4  # a quick start for each way in


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    """Each block runs in a temporary directory: what it writes stays out of the repository."""
    import torch

    monkeypatch.chdir(tmp_path)
    torch._dynamo.reset()  # each block runs as a fresh program, not after the suite's compiles
    try:
        exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "readme"})
    finally:
        if dist.is_initialized():  # a failed block must not leave its process group to the next test
            dist.destroy_process_group()


def test_figures_are_those_of_the_results_files():
    """README.md's figure blocks and benchmarks/README.md are generated: regenerate, don't edit."""
    for path, expected in report.expected_files().items():
        assert path.read_text() == expected, (
            f"{path.relative_to(ROOT)} differs from the results files; run python -m benchmarks.report")


def test_every_figure_block_is_filled():
    for name in ("demo", "performance"):
        block = re.search(rf"<!-- figures:{name} -->\n(.*?)<!-- /figures:{name} -->", TEXT, re.S)
        assert block and block[1].strip(), f"the {name} block is missing or empty"
    assert (ROOT / "docs" / "results" / "demo.json").is_file()
    assert (ROOT / "benchmarks" / "results" / "cpu.json").is_file()


def test_fill_blocks_replaces_only_between_the_markers():
    text = "a\n<!-- figures:x -->\nold\n<!-- /figures:x -->\nb\n"
    assert report.fill_blocks(text, {"x": "new\n"}) == "a\n<!-- figures:x -->\nnew\n<!-- /figures:x -->\nb\n"
    with pytest.raises(ValueError, match=r"fill_blocks: no <!-- figures:y -->"):
        report.fill_blocks(text, {"y": "new\n"})


def _api_table_names() -> set[str]:
    section = (ROOT / "docs" / "api.md").read_text()
    names = set()
    for row in re.findall(r"^\| (.*?) \| .* \|$", section, flags=re.M):
        names |= set(re.findall(r"`(fsyncbn\.[\w.]+)`", row))
    return names


def test_api_table_lists_every_public_name():
    public = {f"fsyncbn.{name}" for name in fsyncbn.__all__}
    public |= {f"fsyncbn.functional.{name}" for name in fsyncbn.functional.__all__}
    listed = _api_table_names()
    assert listed == public, (f"missing from the API table (docs/api.md): {sorted(public - listed)}; "
                              f"listed but not public: {sorted(listed - public)}")


def test_readme_says_nothing_stale_about_itself():
    for phrase in ("this round", "session", "targets met", "before this round", "var_mean"):
        assert phrase not in TEXT, phrase
