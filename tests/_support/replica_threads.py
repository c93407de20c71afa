"""Run DataParallel-style replicas as CPU threads, wired by fsyncbn's own callback.

Replica 0 is the module itself (as in nn.DataParallel, where the first replica's buffers are
the module's); the others are deep copies. Each thread runs its replica's forward through
``ReplicaRun.run`` and then its own backward, since on CPU one autograd call would run every
replica's backward in a single thread.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from fsyncbn import execute_replication_callbacks
from tests._support.threads import run_threads


def replicate(module: nn.Module, count: int) -> list[nn.Module]:
    return [module] + [copy.deepcopy(module) for _ in range(count - 1)]


def run_replicas(
    replicas: Sequence[nn.Module],
    inputs: Sequence[Any],
    after: Callable[[int, Any], Any] | None = None,
    *,
    timeout: float = 10.0,
    callables: Sequence[Callable[[Any], Any]] | None = None,
) -> list[Any]:
    """One thread per replica: ``out = replica(inputs[i])`` then ``after(i, out)``.

    ``callables`` (for example compiled replicas) replace the plain replica calls.
    Returns per replica the value of ``after`` (or the output), or the exception raised.
    """
    run = execute_replication_callbacks(replicas, timeout=timeout)
    calls = list(callables) if callables is not None else list(replicas)

    def participant(i: int) -> Any:
        out = run.run_with(i, calls[i], inputs[i])
        return after(i, out) if after is not None else out

    return run_threads(len(replicas), participant, timeout=4 * timeout + 10)
