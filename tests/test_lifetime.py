"""fsyncbn keeps no layer, tensor or process group alive once the user drops the model.

A layer kept alive past its model (by a module-level registry, an autograd graph's context,
a bound method in a hook) keeps its process group alive too, until interpreter shutdown,
where torch/gloo teardown order is fragile. nn.BatchNorm's graph references tensors only;
fsyncbn's must not reference more, even while the user keeps a loss (and so its graph).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fsyncbn import convert_model
from fsyncbn.step_journal import journal_for
from tests._support.distributed import spawn
from tests._support.replica_threads import replicate, run_replicas
from tests._support.threads import raise_first


def _model() -> nn.Module:
    return convert_model(nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.SyncBatchNorm(3, momentum=None)
    ))


def _train(model: nn.Module, steps: int = 2) -> torch.Tensor:
    """A few steps; returns the last loss, whose graph stays alive with it."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        out = model(torch.randn(8, 4))
        loss = (out * torch.randn_like(out)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss


def _assert_collected(refs: list[weakref.ref]) -> None:
    gc.collect()
    alive = [type(r()).__name__ for r in refs if r() is not None]
    assert not alive, f"still alive after the model was dropped: {alive}"


def test_a_dropped_model_is_collected_though_its_loss_is_kept():
    model = _model()
    loss = _train(model)
    refs = [weakref.ref(m) for m in model.modules()] + [weakref.ref(t) for t in model.buffers()]
    del model
    _assert_collected(refs)
    assert loss.grad_fn is not None  # the graph was alive all along


def test_dropped_replicas_are_collected():
    model = _model()
    replicas = replicate(model, 2)
    outs = raise_first(run_replicas(replicas, list(torch.randn(7, 4).split([3, 4]))))
    refs = [weakref.ref(m) for r in replicas for m in r.modules()]
    del model, replicas
    _assert_collected(refs)
    assert all(o.grad_fn is not None for o in outs)


def _dropped_ddp_model_is_collected(rank: int, world_size: int) -> None:
    torch.manual_seed(rank)
    model = _model()
    ddp = DDP(model)
    loss = _train(ddp, steps=3)
    refs = [weakref.ref(m) for m in model.modules()] + [weakref.ref(t) for t in model.buffers()]
    del model, ddp
    _assert_collected(refs)
    journal = journal_for(dist.group.WORLD)
    assert len(journal._saved) == 0, "the step journal kept a dropped layer's saved buffers"
    assert loss.grad_fn is not None


@pytest.mark.distributed
def test_a_dropped_ddp_model_is_collected_though_its_loss_is_kept():
    spawn(2, _dropped_ddp_model_is_collected)
