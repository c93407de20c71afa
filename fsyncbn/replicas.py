"""The DataParallel rendezvous: replicas of one forward meeting as threads on one host.

:class:`ReplicaMonitor` knows what every replica of a forward is doing; a
:class:`ReplicaGroup` per synchronized layer is where its replicas meet; a
:class:`ReplicaReducer` is one replica's reducer in a group, reaching torch.compile as the
single opaque op ``fsyncbn::replica_sum``. :mod:`fsyncbn.parallel` builds them each forward.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from typing import Any, cast

import torch
from torch import Tensor

from .functional.agreement import SynchronizationError

__all__ = ["ReplicaGroup", "ReplicaMonitor", "ReplicaReducer", "SynchronizationError"]


class _Round:
    """One sum among the replicas: their parts, then the result."""

    def __init__(self, num_replicas: int) -> None:
        self.parts: list[Tensor | None] = [None] * num_replicas
        self.arrived = 0
        self.taken = 0
        self.result: Tensor | None = None


class ReplicaMonitor:
    """What the replicas of one forward are doing, shared by all of its replica groups.

    It lets a wait end as soon as it can never succeed: a replica raised, finished its
    forward without making the sum, or every replica still in its forward waits at a sum
    that cannot complete (a deadlock across layers, as when one replica skips a layer and
    waits at the next). A failure in one layer fails every wait of the forward.
    """

    def __init__(self, num_replicas: int) -> None:
        self.num_replicas = num_replicas
        self.cv = threading.Condition()
        self.ended: list[tuple[BaseException | None] | None] = [None] * num_replicas
        # Where each replica waits in its forward: (description, round); a round that has its
        # result is over even if its waiter has not woken up yet.
        self.waiting: list[tuple[str, _Round] | None] = [None] * num_replicas
        self.failure: str | None = None

    def forward_ended(self, replica: int, error: BaseException | None = None) -> None:
        """Tell the groups that ``replica``'s forward returned (or raised ``error``)."""
        with self.cv:
            self.ended[replica] = (error,)
            self.cv.notify_all()

    def fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
        self.cv.notify_all()

    def deadlocked(self) -> str | None:
        """Every replica still in its forward waits at a sum: nothing can progress."""
        for ended, waiting in zip(self.ended, self.waiting, strict=True):
            if ended is None and (waiting is None or waiting[1].result is not None):
                return None  # this replica can still make progress
        where = "; ".join(f"replica {i} at {w[0]}" for i, w in enumerate(self.waiting) if w)
        return (
            f"the replicas wait for each other at different layers ({where}): they must call "
            "the synchronized batch-norm layers in the same order and number"
        )


class ReplicaGroup:
    """Where the replicas of one batch-norm layer meet during one DataParallel forward.

    The k-th sum a replica asks of this layer meets the k-th sum of every other replica:
    forward sums in call order, then backward sums in backward order, which identical
    replicas share. The sum is computed on the first replica's device in at least float32
    and copied back.

    Nothing waits forever: a replica that raised, finished its forward without making the
    sum others wait at, or waits at another layer while everyone else waits too, fails the
    forward at once; any other wait ends after ``timeout`` seconds. Every waiting replica
    then raises :class:`SynchronizationError` naming ``layer``.

    Args:
        num_replicas: how many replicas take part.
        layer: how errors name the layer, e.g. ``"SynchronizedBatchNorm2d 'features.1'"``.
        timeout: seconds a replica waits for the others.
        monitor: shared by the groups of one forward (a new one if None).
    """

    def __init__(
        self, num_replicas: int, layer: str, timeout: float, monitor: ReplicaMonitor | None = None
    ) -> None:
        self.num_replicas = num_replicas
        self.layer = layer
        self.timeout = timeout
        self.monitor = monitor or ReplicaMonitor(num_replicas)
        self._rounds: dict[int, _Round] = {}
        self._sums = [0] * num_replicas  # sums asked so far, per replica
        self._reducers = [ReplicaReducer(self, r) for r in range(num_replicas)]

    def reducer(self, replica: int) -> ReplicaReducer:
        """The reducer of ``replica`` in this group."""
        return self._reducers[replica]

    def exchange(self, replica: int, t: Tensor) -> Tensor:
        """``replica``'s next sum: wait for the others, return the total (not differentiable)."""
        with self.monitor.cv:
            index, rnd = self._arrive(replica, t)
            self._wait(replica, index, rnd)
            result = self._collect(index, rnd)
        return result.to(t.device, t.dtype, copy=True)

    def _arrive(self, replica: int, t: Tensor) -> tuple[int, _Round]:
        """Leave ``t`` as ``replica``'s part of its next round; the last to arrive sums."""
        index = self._sums[replica]
        self._sums[replica] += 1
        rnd = self._rounds.setdefault(index, _Round(self.num_replicas))
        rnd.parts[replica] = t.detach()
        rnd.arrived += 1
        if rnd.arrived == self.num_replicas and self.monitor.failure is None:
            problem = self._sum_parts(rnd, index)
            if problem is not None:
                self.monitor.fail(f"{self.layer}: {problem}")
            self.monitor.cv.notify_all()
        return index, rnd

    def _wait(self, replica: int, index: int, rnd: _Round) -> None:
        """Wait for the round's result, or fail the forward as soon as it cannot come."""
        monitor = self.monitor
        deadline = time.monotonic() + self.timeout
        in_forward = monitor.ended[replica] is None
        if in_forward:
            monitor.waiting[replica] = (f"{self.layer} sum {index + 1}", rnd)
        try:
            while rnd.result is None and monitor.failure is None:
                reason = self._why_it_cannot_complete(rnd, index, replica, in_forward, deadline)
                if reason is not None:
                    monitor.fail(f"{self.layer}: {reason}")
                    break
                monitor.cv.wait(deadline - time.monotonic())
        finally:
            monitor.waiting[replica] = None

    def _collect(self, index: int, rnd: _Round) -> Tensor:
        """The round's result; the last replica to take it closes the round."""
        if rnd.result is None:
            raise SynchronizationError(self.monitor.failure)
        rnd.taken += 1
        if rnd.taken == self.num_replicas:
            del self._rounds[index]
        return rnd.result

    def _why_it_cannot_complete(
        self, rnd: _Round, index: int, replica: int, in_forward: bool, deadline: float
    ) -> str | None:
        if in_forward:
            reason = self._unreachable(rnd, index, replica) or self.monitor.deadlocked()
            if reason is not None:
                return reason
        if time.monotonic() < deadline:
            return None
        missing = [i for i, p in enumerate(rnd.parts) if p is None]
        return (
            f"replica {replica} waited {self.timeout:g} s at sum {index + 1} "
            f"({'forward' if in_forward else 'backward'}) for replica(s) {missing}, which did "
            "not arrive (one hangs, or calls this layer a different number of times); the "
            "timeout is DataParallelWithCallback(sync_timeout=...)"
        )

    def _unreachable(self, rnd: _Round, index: int, replica: int) -> str | None:
        """Why some replica missing from ``rnd`` can never arrive, or None."""
        for other, part in enumerate(rnd.parts):
            ended = self.monitor.ended[other]
            if part is not None or ended is None:
                continue
            (error,) = ended
            if error is not None:
                return (
                    f"replica {other} raised {type(error).__name__}({error}) and will not reach "
                    f"sum {index + 1} of this layer, where replica {replica} waits"
                )
            if self._sums[other] <= index:
                return (
                    f"replica {other} finished its forward after {self._sums[other]} sum(s) of "
                    f"this layer, but replica {replica} waits at sum {index + 1}: every replica "
                    "must call each synchronized batch-norm layer the same number of times"
                )
        return None

    def _sum_parts(self, rnd: _Round, index: int) -> str | None:
        """Sum the parts into ``rnd.result``; or say why they cannot be summed."""
        parts = cast(list[Tensor], rnd.parts)  # every replica has arrived: no None left
        shapes = [tuple(p.shape) for p in parts]
        if len(set(shapes)) != 1:
            listing = ", ".join(f"replica {i} {s}" for i, s in enumerate(shapes))
            return (
                f"replicas sent different shapes to sum {index + 1} ({listing}); every replica "
                "must give this layer the same number of channels"
            )
        first = parts[0]
        dtype = torch.promote_types(first.dtype, torch.float32)  # never sum in float16
        rnd.result = torch.stack([p.to(first.device, dtype) for p in parts]).sum(0)
        return None


# Replica reducers reach the compiled graph as one opaque op that names its reducer by a
# handle tensor (a graph input, so a new forward's reducers cause no recompilation).
_replica_reducers: weakref.WeakValueDictionary[int, ReplicaReducer] = weakref.WeakValueDictionary()
_next_handle = itertools.count()


@torch.library.custom_op("fsyncbn::replica_sum", mutates_args=())
def _replica_sum(t: Tensor, handle: Tensor) -> Tensor:
    reducer = _replica_reducers.get(int(handle))
    if reducer is None:
        raise SynchronizationError("replica_sum: this replica reducer no longer exists")
    return reducer.group.exchange(reducer.replica, t)


@_replica_sum.register_fake
def _(t: Tensor, handle: Tensor) -> Tensor:
    return torch.empty_like(t)


def _replica_sum_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.handle = inputs[1]


def _replica_sum_backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
    grad_t: Tensor = torch.ops.fsyncbn.replica_sum(grad.contiguous(), ctx.handle)  # torch.ops: Any
    return grad_t, None


_replica_sum.register_autograd(_replica_sum_backward, setup_context=_replica_sum_setup)


class ReplicaReducer:
    """The reducer of one replica in a :class:`ReplicaGroup`: differentiable, and a single
    opaque op (``fsyncbn::replica_sum``) to torch.compile, so compiled replicas keep one
    graph."""

    def __init__(self, group: ReplicaGroup, replica: int) -> None:
        self.group, self.replica = group, replica
        key = next(_next_handle)
        self.handle = torch.tensor(key)
        _replica_reducers[key] = self

    def __call__(self, t: Tensor) -> Tensor:
        total: Tensor = torch.ops.fsyncbn.replica_sum(t, self.handle)  # torch.ops calls are untyped
        return total

    def __repr__(self) -> str:
        return f"<replica {self.replica} reducer of {self.group.layer}>"
