"""One rank of the exit race (issue 19): gloo's worker thread held up after fsyncbn's last sum.

Run as ``python -m tests._scripts.exit_race VARIANT`` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
set (as torchrun sets them), VARIANT one of ``forward``, ``backward``, ``join``. Every
``dist.all_reduce`` that fsyncbn calls is made asynchronous, with a future callback that sleeps
0.3 s, then waited for: gloo's worker then keeps its references to the sum's tensors (and the
backward's thread-local state) for 0.3 s after the caller has moved on, as a worker preempted
under load does. The script then ends normally; the last collective is a forward sum, a
backward sum, or one of fsyncbn.Join's sums. Without fsyncbn's exit drain the worker drops
those references during interpreter finalization and the process aborts ("terminate called
without an active exception").

The default group is kept alive to the end, as torch keeps it once DDP has run (torch's
``torch.distributed.nn.functional`` binds ``group.WORLD`` as a default argument).
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

HOLD_S = 0.3
_all_reduce = dist.all_reduce


def _held_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):  # type: ignore[no-untyped-def]
    """dist.all_reduce whose worker thread stays HOLD_S busy after the sum, for fsyncbn's calls."""
    if not sys._getframe(1).f_globals.get("__name__", "").startswith("fsyncbn"):
        return _all_reduce(tensor, op=op, group=group, async_op=async_op)
    work = _all_reduce(tensor, op=op, group=group, async_op=True)
    work.get_future().then(lambda _: time.sleep(HOLD_S))
    if async_op:
        return work
    work.get_future().wait()  # returns once the sum is done, before the callback has run
    return None


def _model() -> nn.Module:
    import fsyncbn

    torch.manual_seed(0)
    return fsyncbn.convert_model(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(),
                                               nn.Linear(6, 2), nn.BatchNorm1d(2)))


def _step(model: nn.Module, x: torch.Tensor) -> None:
    y = model(x)
    (y * torch.randn_like(y)).sum().backward()


def main(variant: str) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=datetime.timedelta(seconds=30))
    dist.all_reduce = _held_all_reduce
    keep = [dist.group.WORLD]  # torch's own reference, after DDP has run once
    model = _model()
    if variant == "forward":
        _step(model, torch.randn(5, 4))
        keep.append(model(torch.randn(5, 4)))  # the last collectives: the forward sums
    elif variant == "backward":
        _step(model, torch.randn(5, 4))  # the last collectives: the backward sums
    elif variant == "join":
        from torch.nn.parallel import DistributedDataParallel as DDP

        import fsyncbn

        ddp = DDP(model)
        with fsyncbn.Join([ddp]):
            for _ in range(2 + rank):  # rank 0 joins first, and shadows rank 1's last step
                _step(ddp, torch.randn(3, 4))
        keep.append(ddp)
    else:
        raise SystemExit(f"exit_race: unknown variant {variant!r}")
    print(f"rank {rank}: {variant} done", flush=True)
    globals()["_kept"] = keep  # what a script's top level would still hold at exit
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
