"""Reducers: how participants meet.

The contract, public and complete: **a reducer is any callable ``reducer(t: Tensor) ->
Tensor`` returning the element-wise sum of ``t`` over all participants, differentiable (its
backward is the same sum of the incoming gradients).** Every participant calls it the same
number of times with tensors of the same shape. fsyncbn calls it once per batch-norm layer
in forward and once in backward, on O(C) numbers. Write your own for another transport
(Horovod, a custom RPC): nothing else is required.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

__all__ = [
    "LocalReducer",
    "ProcessGroupReducer",
    "ReplicaGroup",
    "ReplicaMonitor",
    "SynchronizationError",
]


class LocalReducer:
    """The reducer of a single participant: the sum over one is the tensor itself.

    Example:
        >>> import torch
        >>> LocalReducer()(torch.ones(3))
        tensor([1., 1., 1.])
    """

    def __call__(self, t: Tensor) -> Tensor:
        return t

    def __repr__(self) -> str:
        return "LocalReducer()"


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the gradients."""

    @staticmethod
    def forward(ctx, t: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", ctx.group)), None


class ProcessGroupReducer:
    """Sum over the ranks of a torch.distributed process group (one all_reduce per call).

    Uses torch's functional collectives, which torch.compile traces without a graph break.
    Works with any backend the group has: gloo on CPU, nccl on GPUs. Waiting is governed by
    the process group's timeout (``init_process_group(timeout=...)``): a rank that never
    arrives makes the others raise after that time rather than hang.

    Args:
        group: the process group; None means the default group (WORLD), looked up at call
            time so the reducer may be built before ``init_process_group``.

    Raises:
        TypeError: ``group`` is neither None nor a ProcessGroup.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                "ProcessGroupReducer: expected group to be a torch.distributed.ProcessGroup "
                f"or None, got {type(group).__name__}"
            )
        self.group = group

    def __call__(self, t: Tensor) -> Tensor:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ProcessGroupReducer: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group first"
            )
        group = self.group if self.group is not None else dist.group.WORLD
        return _AllReduceSum.apply(t, group)

    def __repr__(self) -> str:
        return f"ProcessGroupReducer(group={'WORLD' if self.group is None else self.group})"


class SynchronizationError(RuntimeError):
    """Participants could not complete a sum: one raised, hung, skipped or added a call, or
    sent a different shape. Raised in every participant that was waiting, naming the layer."""


class _Round:
    """One sum among the replicas: their parts, then the result (or why there is none)."""

    def __init__(self, num_replicas: int) -> None:
        self.parts: list[Tensor | None] = [None] * num_replicas
        self.arrived = 0
        self.taken = 0
        self.result: Tensor | None = None


def _use_name(use: int) -> str:
    return {0: "forward", 1: "backward"}.get(use, f"use {use + 1}")


class ReplicaMonitor:
    """What the replicas of one forward are doing, shared by all of its replica groups.

    It lets a wait end as soon as it can never succeed: a replica raised, finished without
    making the call, or every replica still running waits at a sum that cannot complete (a
    deadlock across layers, as when one replica skips a layer and waits at the next).
    A failure in one layer fails every wait of the forward.
    """

    def __init__(self, num_replicas: int) -> None:
        self.num_replicas = num_replicas
        self.cv = threading.Condition()
        self.ended: list[tuple[BaseException | None] | None] = [None] * num_replicas
        self.waiting: list[str | None] = [None] * num_replicas  # where, in forward
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
        if any(e is None and w is None for e, w in zip(self.ended, self.waiting, strict=True)):
            return None
        where = "; ".join(f"replica {i} at {w}" for i, w in enumerate(self.waiting) if w)
        return (
            f"the replicas wait for each other at different layers ({where}): they must call "
            "the synchronized batch-norm layers in the same order and number"
        )


class ReplicaGroup:
    """Where the replicas of one batch-norm layer meet during one DataParallel forward.

    The i-th call of the layer on each replica meets the i-th call on the others; each such
    call gets its own reducer (:meth:`reducer`), whose first use is the forward sum and whose
    second use (from backward) is the backward sum, whatever order backward runs in. The
    sum is computed on the first replica's device in at least float32 and copied back.

    Nothing waits forever: a replica that raised, finished its forward without making the
    call others wait at, or waits at another layer while everyone else waits too, fails the
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
        self._rounds: dict[tuple[int, int], _Round] = {}
        self._calls = [0] * num_replicas

    def reducer(self, replica: int) -> Callable[[Tensor], Tensor]:
        """The reducer for ``replica``'s next call of the layer."""
        with self.monitor.cv:
            call = self._calls[replica]
            self._calls[replica] += 1
        return _ReplicaCallReducer(self, replica, call)

    def _unreachable(self, rnd: _Round, call: int, replica: int) -> str | None:
        """Why some replica missing from ``rnd`` can never arrive, or None."""
        for other, part in enumerate(rnd.parts):
            ended = self.monitor.ended[other]
            if part is not None or ended is None:
                continue
            (error,) = ended
            if error is not None:
                return (
                    f"replica {other} raised {type(error).__name__}({error}) and will not reach "
                    f"call {call + 1} of this layer, where replica {replica} waits"
                )
            if self._calls[other] <= call:
                return (
                    f"replica {other} finished its forward after {self._calls[other]} call(s) of "
                    f"this layer, but replica {replica} is at call {call + 1}: every replica must "
                    "call each synchronized batch-norm layer the same number of times"
                )
        return None

    def _sum_parts(self, rnd: _Round, call: int, use: int) -> str | None:
        """Sum the parts into ``rnd.result``; or say why they cannot be summed."""
        parts = rnd.parts
        shapes = [tuple(p.shape) for p in parts]  # type: ignore[union-attr]
        if len(set(shapes)) != 1:
            listing = ", ".join(f"replica {i} {s}" for i, s in enumerate(shapes))
            return (
                f"replicas sent different shapes to the {_use_name(use)} sum of call "
                f"{call + 1} ({listing}); every replica must give this layer the same number "
                "of channels"
            )
        first = parts[0]
        dtype = torch.promote_types(first.dtype, torch.float32)  # never sum in float16
        rnd.result = torch.stack([p.to(first.device, dtype) for p in parts]).sum(0)
        return None

    def _exchange(self, replica: int, call: int, use: int, t: Tensor) -> Tensor:
        monitor = self.monitor
        deadline = time.monotonic() + self.timeout
        key = (call, use)
        with monitor.cv:
            rnd = self._rounds.setdefault(key, _Round(self.num_replicas))
            rnd.parts[replica] = t.detach()
            rnd.arrived += 1
            if rnd.arrived == self.num_replicas and monitor.failure is None:
                problem = self._sum_parts(rnd, call, use)
                if problem is not None:
                    monitor.fail(f"{self.layer}: {problem}")
                monitor.cv.notify_all()
            in_forward = monitor.ended[replica] is None
            if in_forward:
                monitor.waiting[replica] = f"{self.layer} call {call + 1}"
            try:
                while rnd.result is None and monitor.failure is None:
                    reason = self._unreachable(rnd, call, replica)
                    if reason is None and in_forward:
                        reason = monitor.deadlocked()
                    remaining = deadline - time.monotonic()
                    if reason is None and remaining <= 0:
                        missing = [i for i, p in enumerate(rnd.parts) if p is None]
                        reason = (
                            f"replica {replica} waited {self.timeout:g} s at the "
                            f"{_use_name(use)} sum of call {call + 1} for replica(s) {missing}, "
                            "which did not arrive (one hangs, or calls this layer a different "
                            "number of times); the timeout is DataParallelWithCallback("
                            "sync_timeout=...)"
                        )
                    if reason is not None:
                        monitor.fail(f"{self.layer}: {reason}")
                        break
                    monitor.cv.wait(remaining)
            finally:
                monitor.waiting[replica] = None
            if rnd.result is None:
                raise SynchronizationError(monitor.failure)
            result = rnd.result
            rnd.taken += 1
            if rnd.taken == self.num_replicas:
                del self._rounds[key]
        return result.to(t.device, t.dtype)


class _ReplicaCallReducer:
    """The reducer of one call of one replica: each use meets the same use on the others."""

    def __init__(self, group: ReplicaGroup, replica: int, call: int) -> None:
        self._group, self._replica, self._call = group, replica, call
        self._uses = 0

    def _next(self, t: Tensor) -> Tensor:
        use = self._uses
        self._uses += 1
        return self._group._exchange(self._replica, self._call, use, t)

    def __call__(self, t: Tensor) -> Tensor:
        return _ReplicaSum.apply(t, self)

    def __repr__(self) -> str:
        return f"<replica {self._replica} reducer of {self._group.layer}, call {self._call + 1}>"


class _ReplicaSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, reducer: _ReplicaCallReducer) -> Tensor:  # type: ignore[override]
        ctx.reducer = reducer
        return reducer._next(t)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return ctx.reducer._next(grad), None
