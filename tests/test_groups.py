"""fsyncbn.sync_groups: groups made collectively; each group's statistics are its own union's."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fsyncbn
from tests._support.distributed import spawn
from tests._support.models import TinyResNet
from tests._support.reference import informative_grad
from tests.test_join import groups_and_join

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Samples per rank; groups are ranks {0, 1} and {2, 3}. Rank 1 holds none.
SPLITS = [3, 0, 2, 4]


def _two_groups(rank, world_size):
    # Refused identically on every rank, before any collective: nobody is left waiting.
    with pytest.raises(ValueError, match=r"sync_groups: group_size=3 does not divide the world size 4; "
                                         r"use one of \[1, 2, 4\]"):
        fsyncbn.sync_groups(group_size=3)
    with pytest.raises(ValueError, match="exactly one of group_size"):
        fsyncbn.sync_groups()
    with pytest.raises(ValueError, match="positive int, got 0"):
        fsyncbn.sync_groups(group_size=0)
    dist.barrier()  # every rank got here: the refusals left no collective pending

    assert dist.get_world_size(fsyncbn.sync_groups(per_node=True)) == world_size  # one host
    group = fsyncbn.sync_groups(group_size=2)
    assert dist.get_process_group_ranks(group) == [2 * (rank // 2), 2 * (rank // 2) + 1]

    torch.manual_seed(0)
    model = fsyncbn.convert_model(TinyResNet(), process_group=group).double()
    reference = TinyResNet().double()
    reference.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(sum(SPLITS), 3, 8, 8, dtype=torch.float64, generator=gen)
    x[4:] = 3 * x[4:] + 2  # the second group's data is distributed differently
    g = informative_grad((sum(SPLITS), 5), torch.float64)
    shards, grads = x.split(SPLITS), g.split(SPLITS)
    first = 2 * (rank // 2)
    union = torch.cat(shards[first:first + 2])
    union_grad = torch.cat(grads[first:first + 2])
    out = model(shards[rank])
    (out * grads[rank]).sum().backward()
    ref_out = reference(union)
    (ref_out * union_grad).sum().backward()
    mine = ref_out.split(SPLITS[first:first + 2])[rank - first]
    torch.testing.assert_close(out, mine, rtol=1e-9, atol=1e-9)
    # Without DDP each rank's parameter gradient is its share: the pair's sum is the union's.
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        total = p.grad.clone()
        dist.all_reduce(total, group=group)
        torch.testing.assert_close(total, p_ref.grad, rtol=1e-9, atol=1e-9, msg=name)
    for (name, b), b_ref in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, rtol=1e-9, atol=1e-9, msg=name)
    # The two groups' statistics differ from each other.
    mean = model.stem[1].running_mean
    gathered = [torch.empty_like(mean) for _ in range(world_size)]
    dist.all_gather(gathered, mean)
    assert torch.equal(gathered[0], gathered[1]) and torch.equal(gathered[2], gathered[3])
    assert (gathered[0] - gathered[2]).abs().min() > 1e-3
    groups_and_join(rank, group)  # uneven data within each group: see tests/test_join.py


def test_two_groups_of_two_each_equal_their_own_union():
    spawn(4, _two_groups)


def test_sync_groups_needs_torch_distributed():
    with pytest.raises(RuntimeError, match="sync_groups: torch.distributed is not initialized"):
        fsyncbn.sync_groups(group_size=2)
