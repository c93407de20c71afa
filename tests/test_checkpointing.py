"""Activation checkpointing (torch.utils.checkpoint, reentrant and not) with synchronized layers.

Each batch counts once in the running statistics; the recomputed forward uses exactly the
original forward's statistics, so outputs and gradients equal an uncheckpointed run; and a
recomputation costs no collective beyond the layer's backward one (the checkpointed step
makes exactly as many all_reduce calls as the uncheckpointed step). In one process and over
gloo with 2 ranks, against torch's batch norm on the whole batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from fsyncbn import convert_model, routing
from tests._support.distributed import spawn
from tests._support.reference import informative_grad
from tests._support.replica_threads import replicate, run_replicas
from tests._support.threads import raise_first

MODES = [True, False]
SPLIT = [4, 6]


class Net(nn.Module):
    """A stem, then two checkpointed blocks holding batch-norm layers (one with momentum=None)."""

    def __init__(self, use_reentrant: bool | None = None) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant  # None: no checkpointing
        self.stem = nn.Linear(4, 6)
        self.block1 = nn.Sequential(nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5))
        self.block2 = nn.Sequential(nn.BatchNorm1d(5, momentum=None), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in (self.block1, self.block2):
            if self.use_reentrant is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.use_reentrant)
        return x


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(sum(SPLIT), 4, generator=gen, dtype=torch.float64) * 2 + 0.5
    return x, informative_grad((sum(SPLIT), 3), torch.float64, seed=step)


def _plain() -> Net:
    torch.manual_seed(0)
    return Net().double()


def _step(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward; returns the output and the input's gradient (grads stay on params)."""
    x = x.clone().requires_grad_()
    out = model(x)
    (out * g).sum().backward()
    return out.detach(), x.grad


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("use_reentrant", MODES, ids=["reentrant", "non-reentrant"])
def test_checkpointed_layers_equal_an_uncheckpointed_run(use_reentrant):
    reference = _plain()
    synced = convert_model(copy.deepcopy(reference))
    synced.use_reentrant = use_reentrant
    for step in range(2):
        x, g = _data(step)
        for model in (reference, synced):
            model.zero_grad()
        out_ref, dx_ref = _step(reference, x, g)
        out, dx = _step(synced, x, g)
        torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)
        for name, grad in _grads(reference).items():
            torch.testing.assert_close(_grads(synced)[name], grad, rtol=1e-12, atol=1e-12, msg=name)
        for key, value in reference.state_dict().items():  # counted once: num_batches_tracked too
            torch.testing.assert_close(synced.state_dict()[key], value, rtol=1e-12, atol=0, msg=key)


@pytest.mark.parametrize("use_reentrant", MODES, ids=["reentrant", "non-reentrant"])
def test_checkpointed_replicas_equal_the_whole_batch(use_reentrant):
    """DataParallel replicas (threads): the recomputation happens after the replica left its
    group, and still replays the group's statistics and sums its backward with the group."""
    reference = _plain()
    synced = convert_model(copy.deepcopy(reference))
    synced.use_reentrant = use_reentrant
    for step in range(2):
        x, g = _data(step)
        reference.zero_grad()
        synced.zero_grad()
        out_ref, dx_ref = _step(reference, x, g)
        replicas = replicate(synced, 2)
        gs = g.split(SPLIT)

        def backward(i, out, gs=gs):  # type: ignore[no-untyped-def]
            (out * gs[i]).sum().backward()
            return out.detach()

        xs = [t.clone().requires_grad_() for t in x.split(SPLIT)]
        outs = raise_first(run_replicas(replicas, xs, backward))
        torch.testing.assert_close(torch.cat(outs), out_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.cat([t.grad for t in xs]), dx_ref, rtol=1e-12, atol=1e-12)
        for name, p in reference.named_parameters():
            total = sum(r.get_parameter(name).grad for r in replicas)
            torch.testing.assert_close(total, p.grad, rtol=1e-10, atol=1e-12, msg=name)
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(synced.state_dict()[key], value, rtol=1e-12, atol=0, msg=key)


def test_a_layer_with_remembered_statistics_copies_and_pickles_without_them():
    import pickle

    from fsyncbn.recompute import RecomputeCache

    layer = convert_model(nn.BatchNorm1d(3))
    cache = routing.recompute_cache(layer)
    cache.remember(torch.ones(5), torch.ones(5), reducer=lambda t: t)
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        fresh = routing.recompute_cache(copied)
        assert isinstance(fresh, RecomputeCache) and len(fresh) == 0
    assert len(cache) == 1


def test_torch_batch_norm_double_counts_under_reentrant_checkpointing():
    """Why this matters: nn.BatchNorm's running statistics count a reentrant recomputation."""
    reference, checkpointed = _plain(), _plain()
    checkpointed.use_reentrant = True
    x, g = _data(0)
    _step(reference, x, g)
    _step(checkpointed, x, g)
    assert int(checkpointed.block1[0].num_batches_tracked) == 2 * int(reference.block1[0].num_batches_tracked)


class _CountingAllReduce:
    def __init__(self) -> None:
        self.calls = 0
        self.original = dist.all_reduce

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self.original(*args, **kwargs)


def _checkpointed_ranks(rank: int, world_size: int, use_reentrant: bool) -> None:
    counter = _CountingAllReduce()
    dist.all_reduce = counter  # the process-group reducer looks it up at call time
    try:
        reference = _plain()
        plain_synced = convert_model(copy.deepcopy(reference))
        checkpointed = convert_model(copy.deepcopy(reference))
        checkpointed.use_reentrant = use_reentrant
        lo, hi = sum(SPLIT[:rank]), sum(SPLIT[: rank + 1])
        for step in range(3):
            x, g = _data(step)
            for model in (reference, plain_synced, checkpointed):
                model.zero_grad()
            out_ref, dx_ref = _step(reference, x, g)
            calls = []
            for model in (plain_synced, checkpointed):
                before = counter.calls
                out, dx = _step(model, x[lo:hi], g[lo:hi])
                calls.append(counter.calls - before)
                torch.testing.assert_close(out, out_ref[lo:hi], rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(dx, dx_ref[lo:hi], rtol=1e-10, atol=1e-10)
                for name, p in model.named_parameters():
                    total = p.grad.clone()
                    counter.original(total)  # the ranks' shares sum to the whole batch's gradient
                    torch.testing.assert_close(total, reference.get_parameter(name).grad, rtol=1e-10,
                                               atol=1e-10, msg=f"{name} (step {step})")
                for key, value in reference.state_dict().items():
                    torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-10, atol=0,
                                               msg=f"{key} (step {step})")
            if step > 0:  # after the first step's one-off size checks
                assert calls[1] == calls[0] == 4, f"step {step}: all_reduce calls {calls}"
    finally:
        dist.all_reduce = counter.original


@pytest.mark.distributed
@pytest.mark.parametrize("use_reentrant", MODES, ids=["reentrant", "non-reentrant"])
def test_checkpointed_ranks_equal_the_whole_batch_with_no_extra_collective(use_reentrant):
    spawn(2, _checkpointed_ranks, use_reentrant)
