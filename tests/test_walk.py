"""Following the input through a layer's forward: each module is entered at most once per path
(one stay; see tests/_support/walk.py for what counts), and the walk is the one that
docs/architecture.md draws."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fsyncbn
from fsyncbn.functional import checks, host, init_state, ops, sync_batch_norm
from fsyncbn.functional.reducer import LocalReducer
from tests._support.walk import DRAWN_WALKS, module_entries, stays, walk

ROOT = Path(__file__).resolve().parents[1]


def _layer(layer: torch.nn.Module, *shape: int):
    """A layer's forward on a fresh input: (run, the input to follow)."""
    def case():
        x = torch.randn(*shape)
        return (lambda: layer(x)), x

    return case


def _op_with_reducer():
    x = torch.randn(4, 3, 5, 5)
    return (lambda: sync_batch_norm(x, init_state(3), reducer=LocalReducer())), x


def _walks():
    torch.manual_seed(0)
    cases = {
        # name: (a case, its path's walk)
        "native_local": (_layer(fsyncbn.SynchronizedBatchNorm2d(3), 4, 3, 5, 5), "native_local"),
        "native_local (N, C)": (_layer(fsyncbn.SynchronizedBatchNorm1d(3), 8, 3), "native_local"),
        "inference": (_layer(fsyncbn.SynchronizedBatchNorm2d(3).eval(), 4, 3, 5, 5), "inference"),
        "composed": (_layer(fsyncbn.SynchronizedBatchNorm2d(3, eps_mode="clamp"), 4, 3, 5, 5),
                     "composed"),
        "composed, the op with a reducer": (_op_with_reducer, "composed, the op"),
        "InPlaceABN": (_layer(fsyncbn.InPlaceABN(3), 4, 3, 5, 5), "InPlaceABN"),
    }
    assert cases
    return cases


WALKS = _walks()


@pytest.mark.parametrize("name", list(WALKS))
def test_following_the_input_visits_each_module_once(name):
    case, path = WALKS[name]
    run, x = case()
    assert walk(run, x) == DRAWN_WALKS[path]


def test_the_walk_sees_a_second_visit():
    """A return to a module already left counts (a call with a view of the input), and so do
    back-to-back calls into one module that ONE_STAY does not list."""
    x = torch.randn(4, 3)

    def twice():
        host.empty_batch_sums(x[:1], torch.float64)
        ops.choose_path(x, None, None, None, training=True, momentum=0.1, reducer=None,
                        eps_mode="plus")
        host.empty_batch_sums(x, torch.float64)

    assert stays(module_entries(twice, x)) == [
        "fsyncbn.functional.host", "fsyncbn.functional.ops", "fsyncbn.functional.host"]

    def checks_twice():
        checks.check_local_batch_size("f", x)
        checks.check_local_batch_size("f", x)

    with pytest.raises(AssertionError, match="entered twice"):
        walk(checks_twice, x)


def test_one_step_of_torch_and_of_the_router_is_one_stay():
    entries = [("fsyncbn.functional.ops", "run_batch_norm"),
               ("fsyncbn.functional.paths.cuda_sync", "accepts"),
               ("fsyncbn.functional.paths.cuda_sync", "ready"),
               ("fsyncbn.functional.paths.cuda_sync", "train")]
    assert stays(entries) == ["fsyncbn.functional.ops", "fsyncbn.functional.paths.cuda_sync"]


def test_the_architecture_page_draws_these_walks():
    text = (ROOT / "docs" / "architecture.md").read_text()
    drawn = dict(re.findall(r"^- `([^`]+)`: `([^`]+)`$", text, flags=re.MULTILINE))
    assert drawn == DRAWN_WALKS
    assert {path for _, path in WALKS.values()} | {"cuda_sync"} == set(DRAWN_WALKS)
