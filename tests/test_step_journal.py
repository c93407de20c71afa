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


def test_journals_are_per_process_group_and_thread():
    import threading

    from fsyncbn.step_journal import journal_for

    group_a, group_b = object.__new__(type("G", (), {})), object.__new__(type("G", (), {}))
    here = journal_for(group_a)
    assert journal_for(group_a) is here and journal_for(group_b) is not here
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(journal_for(group_a)))
    thread.start()
    thread.join()
    assert elsewhere[0] is not here


def _two_models_in_two_threads(rank, world_size):
    """Each thread trains its own model over its own process group; thread B fails mid-step
    and rolls back. Thread A's writes of its own step must survive."""
    import threading

    import torch.distributed as dist

    from fsyncbn import SynchronizedBatchNorm1d, convert_model, roll_back_step

    groups = [dist.new_group([0, 1]), dist.new_group([0, 1])]
    models = [convert_model(nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3)),
                            process_group=g) for g in groups]
    assert all(isinstance(m[0], SynchronizedBatchNorm1d) for m in models)
    a_wrote, b_rolled_back = threading.Event(), threading.Event()
    outcome = {}

    def thread_a():
        model = models[0]
        y = model(torch.randn(4, 3))
        (y * torch.randn_like(y)).sum().backward()  # step 1
        h = model[0](torch.randn(4, 3, requires_grad=True))  # step 2 writes layer 0
        after_write = _buffers([model[0]])
        a_wrote.set()
        assert b_rolled_back.wait(30)
        outcome["a"] = (after_write, _buffers([model[0]]))
        y = model[2](model[1](h))
        (y * torch.randn_like(y)).sum().backward()

    def thread_b():
        model = models[1]
        y = model(torch.randn(4, 3))
        (y * torch.randn_like(y)).sum().backward()
        assert a_wrote.wait(30)
        before = _buffers([model[0]])
        model[0](torch.randn(4, 3, requires_grad=True))
        roll_back_step()  # this thread's own code failed mid-step
        outcome["b"] = (before, _buffers([model[0]]))
        b_rolled_back.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after_write, after_b_rolled_back = outcome["a"]
    _assert_buffers_equal(after_b_rolled_back, after_write)  # A kept its step
    before, after = outcome["b"]
    _assert_buffers_equal(after, before)  # B undid its own


def _assert_buffers_equal(actual, expected) -> None:
    for got, wanted in zip(actual, expected, strict=True):
        for key in wanted:
            assert torch.equal(got[key], wanted[key]), key


def test_a_failure_in_one_thread_keeps_another_threads_step():
    from tests._support.distributed import spawn

    spawn(2, _two_models_in_two_threads)
