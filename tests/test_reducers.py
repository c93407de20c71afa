"""The reducers shipped with fsyncbn, and the contract they share."""

from __future__ import annotations

import pytest
import torch

from fsyncbn.reducers import LocalReducer, ProcessGroupReducer
from tests._support.threads import ThreadGroup, raise_first, run_threads


def test_local_reducer_is_identity_and_differentiable():
    t = torch.randn(5, requires_grad=True)
    out = LocalReducer()(t)
    assert torch.equal(out, t)
    g = torch.randn(5)
    out.backward(g)
    assert torch.equal(t.grad, g)


def test_thread_reducer_follows_the_contract():
    """The test harness's reducer: sum forward, sum of gradients backward."""
    group = ThreadGroup(3)

    def participant(rank):
        t = torch.full((4,), float(rank), requires_grad=True)
        total = group.reducer(rank)(t)
        (total * (rank + 1)).sum().backward()
        return total, t.grad

    for total, grad in raise_first(run_threads(3, participant)):
        assert torch.equal(total, torch.full((4,), 3.0))
        assert torch.equal(grad, torch.full((4,), 6.0))


def test_process_group_reducer_rejects_a_non_group():
    with pytest.raises(TypeError, match=r"ProcessGroupReducer: expected group to be a "
                                        r"torch.distributed.ProcessGroup or None, got str"):
        ProcessGroupReducer("world")  # type: ignore[arg-type]


def test_process_group_reducer_needs_an_initialized_group():
    with pytest.raises(RuntimeError, match=r"ProcessGroupReducer: torch.distributed is not "
                                           r"initialized; call torch.distributed.init_process_group"):
        ProcessGroupReducer()(torch.ones(2))


def _errors_of_the_backend(rank, world_size):
    import torch.distributed as dist

    from fsyncbn import SynchronizationError

    original = dist.all_reduce
    reducer = ProcessGroupReducer(name="layer 'features.1'")
    reducer(torch.ones(4, dtype=torch.float64))  # sizes checked and tag assigned for real
    try:
        def usage_error(*args, **kwargs):
            raise RuntimeError("Invalid scalar type")

        dist.all_reduce = usage_error
        with pytest.raises(RuntimeError, match=r"^Invalid scalar type$") as info:
            reducer(torch.ones(4, dtype=torch.float64))
        assert not isinstance(info.value, SynchronizationError)

        def peer_closed(*args, **kwargs):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1")

        dist.all_reduce = peer_closed
        expected = r"^layer 'features.1': the sum over the process group failed: a rank died.*Connection"
        with pytest.raises(SynchronizationError, match=expected):
            reducer(torch.ones(4, dtype=torch.float64))
    finally:
        dist.all_reduce = original


def test_only_failed_peers_become_synchronization_errors():
    """Backend errors that mean a dead, hung or out-of-step peer become SynchronizationError;
    any other backend error passes through as it is."""
    from tests._support.distributed import spawn

    spawn(1, _errors_of_the_backend)
