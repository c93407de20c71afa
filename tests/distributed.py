"""Spawn torch.distributed (gloo, 127.0.0.1) workers for a test; short timeouts everywhere."""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp

PG_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bootstrap(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(world_size: int, fn: Callable, *args, timeout_s: float = 120.0) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; re-raise failures.

    ``fn`` must be a module-level function (it is pickled by reference).
    """
    ctx = mp.spawn(
        _bootstrap, args=(world_size, free_port(), fn, args), nprocs=world_size, join=False
    )
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    while not ctx.join(timeout=1.0):
        if datetime.datetime.now() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"distributed workers still running after {timeout_s} s")
