"""StepJournal: which writes belong to the current step, and restoring them all on failure.

The torch.distributed modules use it (the gloo scenarios in test_faults.py check it end to
end); here each rule is checked on plain layers, in one process.
"""

from __future__ import annotations

import torch
from torch import nn

from fsyncbn.step_journal import StepJournal


def _layers(n: int = 2) -> list[nn.BatchNorm1d]:
    return [nn.BatchNorm1d(3) for _ in range(n)]


def _train(journal: StepJournal, layer: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """One journaled layer call, as the module does it."""
    journal.layer_starts(layer)
    journal.layer_writes(layer)
    y = layer(x)  # nn.BatchNorm1d writes its buffers itself
    journal.layer_returns(layer, y)
    return y


def _buffers(layers: list[nn.BatchNorm1d]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]


def _assert_buffers(layers, expected) -> None:
    for actual, wanted in zip(_buffers(layers), expected, strict=True):
        assert actual.keys() == wanted.keys()
        for key in actual:
            assert torch.equal(actual[key], wanted[key]), key


def test_roll_back_restores_every_layer_of_the_step():
    journal, (a, b) = StepJournal(), _layers()
    before = _buffers([a, b])
    _train(journal, b, _train(journal, a, torch.randn(4, 3)))
    assert not torch.equal(a.running_mean, before[0]["running_mean"])
    journal.roll_back()
    _assert_buffers([a, b], before)


def test_a_step_ends_when_its_backward_begins():
    journal, (a, b) = StepJournal(), _layers()
    x = torch.randn(4, 3, requires_grad=True)
    y = _train(journal, b, _train(journal, a, x))
    (y * torch.randn_like(y)).sum().backward()
    after_step_one = _buffers([a, b])
    h = _train(journal, a, torch.randn(4, 3))  # step two begins here
    assert h is not None
    journal.roll_back()
    _assert_buffers([a, b], after_step_one)


def test_several_forwards_before_one_backward_are_one_step():
    journal, (a, b) = StepJournal(), _layers()
    before = _buffers([a, b])
    view1 = _train(journal, b, _train(journal, a, torch.randn(4, 3, requires_grad=True)))
    _train(journal, b, _train(journal, a, torch.randn(4, 3, requires_grad=True)))
    assert view1.grad_fn is not None  # the first view is alive, no backward yet: same step
    journal.roll_back()
    _assert_buffers([a, b], before)


def test_a_forward_whose_output_was_freed_unused_ends_its_step():
    journal, (a, b) = StepJournal(), _layers()
    _train(journal, b, _train(journal, a, torch.randn(4, 3, requires_grad=True)))  # output dropped
    after_step_one = _buffers([a, b])
    _train(journal, a, torch.randn(4, 3, requires_grad=True))
    journal.roll_back()
    _assert_buffers([a, b], after_step_one)


def test_without_autograd_every_pass_through_the_opener_is_a_step():
    journal, (a, b) = StepJournal(), _layers()
    with torch.no_grad():
        opener_output = _train(journal, a, torch.randn(4, 3))
        _train(journal, b, opener_output)
        after_step_one = _buffers([a, b])
        _train(journal, a, torch.randn(4, 3))
    assert opener_output is not None  # still alive, but no backward can come
    journal.roll_back()
    _assert_buffers([a, b], after_step_one)


def test_a_layer_written_twice_in_a_step_gets_its_first_values_back():
    journal, (a, b) = StepJournal(), _layers()
    before = _buffers([a, b])
    h = _train(journal, a, torch.randn(4, 3, requires_grad=True))
    _train(journal, b, h)
    _train(journal, b, h)  # a shared layer, used twice
    journal.roll_back()
    _assert_buffers([a, b], before)


def test_after_a_roll_back_the_next_layer_opens_a_new_step():
    journal, (a, b) = StepJournal(), _layers()
    _train(journal, a, torch.randn(4, 3))
    journal.roll_back()
    before = _buffers([a, b])
    _train(journal, b, torch.randn(4, 3))  # b opens the new step
    _train(journal, a, torch.randn(4, 3))
    journal.roll_back()
    _assert_buffers([a, b], before)


def test_layers_that_are_gone_are_skipped():
    journal, (a, b) = StepJournal(), _layers()
    before = _buffers([a])
    _train(journal, b, _train(journal, a, torch.randn(4, 3)))
    del b
    journal.roll_back()
    _assert_buffers([a], before)
