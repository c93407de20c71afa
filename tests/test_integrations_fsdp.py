"""FSDP2 (``torch.distributed.fsdp.fully_shard``, gloo, 2 ranks) with synchronized layers.

The recipe: ``convert_model`` first, then ``fully_shard`` the sub-modules and the root.
Parameters are sharded, batch-norm buffers stay whole on every rank, and the synchronized
layers see the unsharded parameters in forward. Checked against one unsynchronized model on
the whole batch (weights, running statistics, outputs, every step), with and without a
MixedPrecisionPolicy, and through sharded and full state_dict round trips.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fsyncbn import convert_model
from tests._support.distributed import spawn
from tests._support.reference import informative_grad

pytestmark = [pytest.mark.distributed]

SPLIT = [4, 6]


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.BatchNorm1d(3, momentum=None)
    ).double()


def _sharded(plain: nn.Module, mp_policy=None) -> nn.Module:  # type: ignore[no-untyped-def]
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    model = convert_model(copy.deepcopy(plain))
    fully_shard(model[0], **kwargs)
    fully_shard(model[3], **kwargs)
    fully_shard(model, **kwargs)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + step)
    x = torch.randn(sum(SPLIT), 4, generator=gen, dtype=torch.float64) * 3 + 1
    return x, informative_grad((sum(SPLIT), 3), torch.float64, seed=step)


def _fsdp_trains_like_one_model(rank: int, world_size: int, mixed: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.float32) if mixed else None
    tol = dict(rtol=1e-4, atol=1e-5) if mixed else dict(rtol=1e-10, atol=1e-10)
    reference = _net()
    model = _sharded(reference, policy)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lo, hi = sum(SPLIT[:rank]), sum(SPLIT[: rank + 1])
    for step in range(3):
        x, g = _data(step)
        out_ref = reference(x)
        # FSDP averages the ranks' gradients: the reference loss is the union's sum over the ranks.
        ((out_ref * g).sum() / world_size).backward()
        out = model(x[lo:hi])
        assert out.dtype == (torch.float32 if mixed else torch.float64)
        (out * g[lo:hi]).sum().backward()
        torch.testing.assert_close(out.double(), out_ref[lo:hi].detach(), **tol)
        for o in (opt_ref, opt):
            o.step()
            o.zero_grad()
        state = {k: _full(v) for k, v in model.state_dict().items()}
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(state[key], value, **tol, msg=f"{key} (step {step})")
            assert state[key].dtype == value.dtype, key  # buffers and master weights stay float64
        for key in ("1.running_mean", "4.running_var"):  # the ranks agree exactly
            gathered = [torch.empty_like(state[key]) for _ in range(world_size)]
            dist.all_gather(gathered, state[key])
            assert torch.equal(gathered[0], gathered[1]), key


@pytest.mark.parametrize("mixed", [False, True], ids=["float64", "mixed-precision"])
def test_fsdp2_trains_like_one_model_on_the_whole_batch(mixed):
    spawn(2, _fsdp_trains_like_one_model, mixed)


def _state_dict_round_trips(rank: int, world_size: int) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    trained = _sharded(_net())
    x, g = _data(0)
    (trained(x) * g).sum().backward()  # running statistics that differ from a fresh model
    # Sharded: parameters as DTensors, buffers as tensors, into a fresh sharded model.
    sharded = trained.state_dict()
    fresh = _sharded(_net(seed=1))
    fresh.load_state_dict(sharded)
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(_full(fresh.state_dict()[key]), _full(value), rtol=0, atol=0, msg=key)
    # Full: plain tensors with nn.BatchNorm's keys, loadable into the unconverted model and back.
    full = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True))
    plain = _net(seed=2)
    plain.load_state_dict(full, strict=True)
    plain.eval()
    trained.eval()
    torch.testing.assert_close(trained(x), plain(x), rtol=1e-12, atol=1e-12)
    other = _sharded(_net(seed=3))
    set_model_state_dict(other, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(_full(other.state_dict()[key]), value, rtol=0, atol=0, msg=key)


def test_fsdp2_state_dict_round_trips():
    spawn(2, _state_dict_round_trips)
