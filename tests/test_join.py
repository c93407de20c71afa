"""fsyncbn.Join: DDP on uneven data (ranks holding 5, 3 and 0 batches) with synchronized batch norm.
After every step the running statistics and weights equal one process training on the union of the
batches present at that step."""

from __future__ import annotations

import copy
import datetime
import inspect

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fsyncbn
from tests._support.distributed import free_port, spawn

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BATCHES = [3, 5, 0]  # batches per rank: rank 0, DDP's first choice to broadcast from, leaves early
NO_BN_STEP = 2  # a step that calls no synchronized layer
EVAL_AFTER = 1  # an eval forward after this step


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4, 6)
        self.bn1 = nn.BatchNorm1d(6, momentum=None)
        self.fc2 = nn.Linear(6, 3)
        self.use_bn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.bn2(x) if self.use_bn else x
        x = torch.relu(self.fc1(x.mean((2, 3))))
        return self.fc2(self.bn1(x) if self.use_bn else x)


def _data(step: int, rank: int, batches: list[int] = BATCHES) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rank ``rank``'s batch at ``step`` and its output gradient, or None once it has run out."""
    if step >= batches[rank]:
        return None
    gen = torch.Generator().manual_seed(100 * step + rank)
    size = 2 + rank % 3
    x = (1 + rank) * torch.randn(size, 3, 5, 5, dtype=torch.float64, generator=gen) + step
    return x, torch.randn(size, 3, dtype=torch.float64, generator=gen)


def _assert_matches(model: nn.Module, reference: nn.Module, what: str) -> None:
    for (name, t), ref in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(t, ref, rtol=1e-10, atol=1e-10, msg=f"{what}: {name}")


def _zero_unused_grads(reference: nn.Module) -> None:
    """DDP with find_unused_parameters hands unused parameters a zero gradient (momentum still moves them)."""
    for p in reference.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _reference_step(reference: nn.Module, optimizer, step: int, world_size: int) -> None:
    """One process on the union of the batches present at ``step``. DDP under Join divides the
    gradients' sum by the initial world size."""
    present = [d for d in (_data(step, r) for r in range(world_size)) if d is not None]
    optimizer.zero_grad()
    (reference(torch.cat([d[0] for d in present])) * torch.cat([d[1] for d in present])).sum().div(
        world_size).backward()
    _zero_unused_grads(reference)
    optimizer.step()


def _uneven_training(rank, world_size):
    torch.manual_seed(0)
    reference = Net().double()
    model = fsyncbn.convert_model(copy.deepcopy(reference))
    ddp = DDP(model, find_unused_parameters=True)  # one step leaves the batch-norm parameters out
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    with fsyncbn.Join([ddp, optimizer]):
        for step in range(BATCHES[rank]):
            model.use_bn = reference.use_bn = step != NO_BN_STEP
            x, g = _data(step, rank)
            optimizer.zero_grad()
            (ddp(x) * g).sum().backward()
            optimizer.step()
            _reference_step(reference, ref_optimizer, step, world_size)
            _assert_matches(model, reference, f"rank {rank} after step {step}")
            if step == EVAL_AFTER:  # an eval forward: no synchronisation, no backward
                ddp.eval()
                reference.eval()
                with ddp.no_sync(), torch.no_grad():
                    torch.testing.assert_close(ddp(x + 1), reference(x + 1), rtol=1e-10, atol=1e-10)
                ddp.train()
                reference.train()
    # Ranks that joined shadowed the others; DDP then copies the last rank's model everywhere.
    # The reference of the rank that trained to the end is complete; the others catch up.
    for step in range(BATCHES[rank], max(BATCHES)):
        model.use_bn = reference.use_bn = step != NO_BN_STEP
        _reference_step(reference, ref_optimizer, step, world_size)
    _assert_matches(model, reference, f"rank {rank} after the Join")
    # The private group is left idle: plain training and another Join work as before.
    model.use_bn = True
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    ddp(x).sum().backward()
    dist.barrier()
    _early_termination(rank)


def _early_termination(rank):
    """throw_on_early_termination=True: every rank raises torch's error, and nothing is left pending."""
    torch.manual_seed(0)
    ddp = DDP(fsyncbn.convert_model(Net().double()))
    with pytest.raises(RuntimeError, match="exhausted"):
        with fsyncbn.Join([ddp], throw_on_early_termination=True):
            for step in range(BATCHES[rank]):
                x, g = _data(step, rank)
                (ddp(x) * g).sum().backward()
    dist.barrier()  # every rank raised; no collective is left pending


def test_uneven_batches_train_as_the_union_and_early_termination_raises_everywhere():
    spawn(3, _uneven_training, timeout_s=120)


NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
    else {"broadcast_buffers": False}
)
GROUP_BATCHES = [2, 0, 1, 3]  # batches per rank; sync groups {0, 1} and {2, 3}


def groups_and_join(rank: int, group: dist.ProcessGroup) -> None:
    """Sync groups under Join (run by tests/test_groups.py on its 4 ranks): each group is shadowed on
    its own private group, and a second Join reuses them."""
    torch.manual_seed(0)
    reference = Net().double()
    # DDP's buffer broadcast would copy one group's statistics over the other's.
    ddp = DDP(fsyncbn.convert_model(copy.deepcopy(reference), process_group=group), **NO_BUFFER_SYNC)
    members = dist.get_process_group_ranks(group)
    for round in range(2):  # a second Join reuses fsyncbn's private groups
        with fsyncbn.Join([ddp]):
            for step in range(GROUP_BATCHES[rank]):
                x, g = _data(step, rank, GROUP_BATCHES)
                (ddp(x + round) * g).sum().backward()
                # Each group's statistics: its own union of the batches present at this step.
                present = [_data(step, r, GROUP_BATCHES)[0] + round
                           for r in members if step < GROUP_BATCHES[r]]
                reference(torch.cat(present))
                torch.testing.assert_close(ddp.module.bn2.running_mean, reference.bn2.running_mean,
                                           rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(ddp.module.bn1.running_var, reference.bn1.running_var,
                                           rtol=1e-10, atol=1e-10)


def test_a_failed_step_inside_join_is_rolled_back():
    """One rank in this process: the layers' writes inside the Join are journaled as outside it."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=20))
    try:
        torch.manual_seed(0)
        model = fsyncbn.convert_model(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 5),
                                                    nn.BatchNorm1d(6)))  # 5 channels reach a 6-channel layer
        ddp = DDP(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="expected input with 6 channels"):
            with fsyncbn.Join([ddp]):
                assert fsyncbn.routing.announced_reducer(model[1]) is not None
                ddp(torch.randn(8, 4))
        assert fsyncbn.routing.announced_reducer(model[1]) is None
        for key, value in model.state_dict().items():  # model[1] had written its statistics
            assert torch.equal(value, before[key]), key
    finally:
        dist.destroy_process_group()


def test_join_needs_a_torch_joinable():
    with pytest.raises(ValueError, match=r"fsyncbn.Join: expected at least one torch Joinable .* "
                                         r"got \['Linear'\]"):
        fsyncbn.Join([nn.Linear(2, 2)])


def _evaluate_inside_join(rank, world_size):
    """docs/distributed.md, "Evaluating inside fsyncbn.Join": rank 1 joins at once; rank 0 evaluates
    on ``model.module`` right after the first backward (through DDP there, torch's bucket rebuild
    would hang), then through DDP under no_sync() once DDP has rebuilt its buckets."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    ddp = DDP(fsyncbn.convert_model(copy.deepcopy(reference)))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 4, dtype=torch.float64, generator=gen) for _ in range(3)]
    probe = torch.randn(5, 4, dtype=torch.float64, generator=gen)

    def evaluate(model: nn.Module) -> None:
        ddp.eval()
        reference.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(probe), reference(probe), rtol=1e-10, atol=1e-10)
        ddp.train()
        reference.train()

    with fsyncbn.Join([ddp, optimizer]):
        for step, x in enumerate(batches if rank == 0 else []):
            g = torch.randn(4, 3, dtype=torch.float64, generator=gen)
            optimizer.zero_grad()
            (ddp(x) * g).sum().backward()
            optimizer.step()
            ref_optimizer.zero_grad()
            (reference(x) * g).sum().div(world_size).backward()  # DDP divides by the initial world size
            ref_optimizer.step()
            if step == 0:  # right after the first backward: not through DDP
                evaluate(ddp.module)
            else:  # DDP rebuilt its buckets in the second training forward
                with ddp.no_sync():
                    evaluate(ddp)
    if rank == 0:
        _assert_matches(ddp.module, reference, "after the Join")


def test_evaluation_inside_join_on_the_schedule_the_docs_give():
    spawn(2, _evaluate_inside_join, timeout_s=120)
