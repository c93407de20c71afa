"""DDP with synchronized batch norm, launched by torchrun (gloo on CPU, nccl on GPUs).

Alone, as a group of one process (statistics over its own batch, as plain batch norm):

    python examples/ddp_torchrun.py

One machine, two processes:

    torchrun --nproc-per-node 2 examples/ddp_torchrun.py

Two "nodes" (here both on 127.0.0.1; on a cluster use the first node's address):

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --rdzv-endpoint 127.0.0.1:29511 \\
        examples/ddp_torchrun.py
    torchrun --nnodes 2 --node-rank 1 --nproc-per-node 1 --rdzv-endpoint 127.0.0.1:29511 \\
        examples/ddp_torchrun.py

Every rank draws the same global batches and trains on its slice; with ``--stats-dir`` each
rank writes its batch-norm running statistics there (the tests compare them).
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fsyncbn import convert_model


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).double()


def global_batches(steps: int, global_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(global_batch, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 + 1,
         torch.randint(0, 4, (global_batch,), generator=gen))
        for _ in range(steps)
    ]


def train(model: nn.Module, batches, rank: int, world_size: int, lr: float = 0.1) -> nn.Module:
    """SGD on this rank's equal slice of every global batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in batches:
        per = x.shape[0] // world_size
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        loss = nn.functional.cross_entropy(model(xs), ys)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--per-process-batch", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="process-group timeout: a lost peer fails the job after this")
    parser.add_argument("--stats-dir", type=Path, default=None)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    backend, timeout = "nccl" if use_cuda else "gloo", datetime.timedelta(seconds=args.timeout)
    if dist.is_torchelastic_launched():  # torchrun set RANK, WORLD_SIZE and the rendezvous
        dist.init_process_group(backend, timeout=timeout)
    else:  # started alone: a group of one, with no address to agree on
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else None
    if device is not None:
        torch.cuda.set_device(device)
    model = convert_model(make_model()).to(device)
    ddp = DDP(model)
    batches = global_batches(args.steps, args.per_process_batch * world_size)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    train(ddp, batches, rank, world_size)
    stats = {k: v.cpu() for k, v in model.state_dict().items() if "running" in k}
    if args.stats_dir is not None:
        args.stats_dir.mkdir(parents=True, exist_ok=True)
        torch.save(stats, args.stats_dir / f"rank{rank}.pt")
    print(f"rank {rank}/{world_size}: running_mean of the first BN = "
          f"{stats['1.running_mean'][:3].tolist()}")
    del ddp  # a DDP model must not outlive its process group (gloo may abort at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
