"""Spawn torch.distributed (gloo, 127.0.0.1) workers for a test; short timeouts everywhere."""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp

PG_TIMEOUT_S = 20.0
# How long a fault test's rank may take to exit after its report (destroying a gloo group waits
# for a collective in flight, up to the group's timeout).
EXIT_S = 30.0


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
        _settle_torch_collectives()
    finally:
        dist.destroy_process_group()


def _settle_torch_collectives() -> None:
    """Let gloo's workers drop the test body's own collectives before the interpreter exits.

    fsyncbn's sums are drained by fsyncbn.teardown; a test's own ``dist.all_gather`` or FSDP's
    collectives are torch's (docs/distributed.md, "Leaving the interpreter"): a worker that drops
    such a tensor during finalization aborts the process (pytorch#190489). The documented remedy
    is applied: drop references, then two barriers (each worker takes new work only after it has
    dropped its last), and a moment for the dropping worker to get the GIL.
    """
    import gc
    import time

    gc.collect()
    try:
        for _ in range(2):
            dist.barrier()
    except RuntimeError:
        pass  # a peer already left (a test of a failing rank): its collectives are over
    time.sleep(0.05)


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


def _fault_bootstrap(rank, world_size, port, fn, results, pg_timeout_s, stderr_path) -> None:
    import time

    import torch

    # The C++ runtime writes "terminate called ..." to file descriptor 2: keep it for the test.
    with open(stderr_path, "w") as stderr:
        os.dup2(stderr.fileno(), 2)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout_s),
    )
    start = time.monotonic()
    try:
        fn(rank, world_size)
        results.put((rank, "ok", "", time.monotonic() - start))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        results.put((rank, type(exc).__name__, str(exc), time.monotonic() - start))
    results.close()
    results.join_thread()  # flush the report before leaving
    # Then leave as a training script should, peers gone or not: destroy the group, return.
    dist.destroy_process_group()


def launch_with_faults(world_size: int, fn: Callable, *, pg_timeout_s: float = 5.0,
                       timeout_s: float = 120.0) -> dict[int, tuple[str, str, float]]:
    """Run ``fn(rank, world_size)`` per rank where ranks may die: per rank, the outcome
    ``(exception type name or "ok", message, seconds)``, or ``("exited", code, nan)`` for a
    rank that reported nothing. Fails if any rank is still running after ``timeout_s``, and
    if a rank that reported did not then exit cleanly (status 0, no "terminate called"), within
    ``EXIT_S`` of its report."""
    import queue
    import tempfile
    import time
    from pathlib import Path

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="fsyncbn-faults-"))
    procs = [ctx.Process(target=_fault_bootstrap,
                         args=(r, world_size, port, fn, results, pg_timeout_s, str(logs / f"rank{r}.err")))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    outcomes: dict[int, tuple[str, str, float]] = {}
    while len(outcomes) < world_size and time.monotonic() < deadline:
        try:
            rank, kind, message, seconds = results.get(timeout=0.5)
            outcomes[rank] = (kind, message, seconds)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    hung = [r for r, p in enumerate(procs) if p.is_alive() and r not in outcomes]
    exit_deadline = time.monotonic() + EXIT_S
    for p in procs:
        p.join(timeout=max(0.1, exit_deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        raise AssertionError(f"ranks {hung} still running after {timeout_s} s: a hang")
    unclean = []
    for r, p in enumerate(procs):
        stderr = (logs / f"rank{r}.err").read_text(errors="replace")
        if r in outcomes and (p.exitcode != 0 or "terminate called" in stderr):
            unclean.append(f"rank {r} reported {outcomes[r][0]}, then exit status {p.exitcode}\n"
                           f"{stderr[-1500:]}")
        outcomes.setdefault(r, ("exited", str(p.exitcode), float("nan")))
    if unclean:
        raise AssertionError("ranks did not exit cleanly:\n" + "\n".join(unclean))
    return outcomes


def launch_ranks(module_args: list[str], world_size: int = 2, *, timeout_s: float = 120.0,
                 env: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """Run ``python -m MODULE ARGS...`` as ``world_size`` ranks, as torchrun would (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT); per rank, its exit status and its stderr. A rank
    still running after ``timeout_s`` is killed (its status is then negative)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    base = {
        **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    procs = [subprocess.Popen([sys.executable, "-m", *module_args], cwd=root,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(world_size)]
    deadline = time.monotonic() + timeout_s
    outcomes = []
    for p in procs:
        try:
            _, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            _, stderr = p.communicate()
        outcomes.append((p.returncode, stderr))
    return outcomes


def unclean_exits(outcomes: list[tuple[int, str]]) -> list[str]:
    """The ranks of ``launch_ranks``'s outcomes that did not exit cleanly: a non-zero status,
    or "terminate called" in their stderr (an abort at interpreter exit)."""
    return [f"rank {r}: exit status {code}\n{stderr[-1500:]}"
            for r, (code, stderr) in enumerate(outcomes)
            if code != 0 or "terminate called" in stderr]
