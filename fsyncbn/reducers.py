"""Reducers: how participants meet.

The contract, public and complete: **a reducer is any callable ``reducer(t: Tensor) ->
Tensor`` returning the element-wise sum of ``t`` over all participants, differentiable (its
backward is the same sum of the incoming gradients).** Every participant calls it the same
number of times with tensors of the same shape. fsyncbn calls it once per batch-norm layer
in forward and once in backward, on O(C) numbers. Write your own for another transport
(Horovod, a custom RPC): nothing else is required.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

__all__ = [
    "LocalReducer",
    "ProcessGroupReducer",
    "ReplicaGroup",
    "ReplicaMonitor",
    "ReplicaReducer",
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


def _all_reduce_sum(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The sum of ``t`` over ``group``, out of place.

    torch.compile traces the functional collective. In eager mode the plain c10d call costs
    far less around the collective itself (gloo, one rank, 132 numbers: about 75 us against
    335 us for funcol's all_reduce + wait_tensor).
    """
    if torch.compiler.is_compiling():
        return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))
    total = t.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the gradients."""

    @staticmethod
    def forward(ctx, t: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _all_reduce_sum(t, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _all_reduce_sum(grad.contiguous(), ctx.group), None


# Per process group, the tag of the next reducer to make its first call (see _tagged_sum).
_next_tag: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_tag_lock = threading.Lock()


class ProcessGroupReducer:
    """Sum over the ranks of a torch.distributed process group (one all_reduce per call).

    Uses torch's functional collectives, which torch.compile traces without a graph break.
    Works with any backend the group has: gloo on CPU, nccl on GPUs. Waiting is governed by
    the process group's timeout (``init_process_group(timeout=...)``): a rank that never
    arrives makes the others raise after that time rather than hang; a rank that dies makes
    them raise as soon as the backend notices.

    In eager mode, the first call with each tensor size first sums three numbers
    ``[1, n, n*n]`` to check that every rank sends ``n`` numbers: backends do not sum
    tensors of different sizes (gloo aborts the process), so this turns, for example,
    ranks that disagree on a batch-norm layer's channel count into a ValueError on every
    rank. Later calls of that size cost one all_reduce. On CPU, two more numbers travel with
    every float64 sum (the forward's message of every batch-norm layer): a tag numbering the
    reducer by its first call among the group's reducers on its rank. Ranks running the same
    layers in the same order agree on every tag, so a rank that skipped a layer or called
    one again raises :class:`SynchronizationError` on every rank, instead of having its
    numbers summed with another layer's of the same size. Under torch.compile both checks
    are skipped. Failures of the collective are re-raised as
    :class:`SynchronizationError` naming ``name``.

    Args:
        group: the process group; None means the default group (WORLD), looked up at call
            time so the reducer may be built before ``init_process_group``.
        name: how errors name the caller (the modules pass their layer's description).

    Raises:
        TypeError: ``group`` is neither None nor a ProcessGroup.
    """

    def __init__(
        self, group: dist.ProcessGroup | None = None, *, name: str = "ProcessGroupReducer"
    ) -> None:
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                "ProcessGroupReducer: expected group to be a torch.distributed.ProcessGroup "
                f"or None, got {type(group).__name__}"
            )
        self.group = group
        self.name = name
        self._checked_sizes: set[int] = set()
        self._tag: int | None = None
        self._tag_header: Tensor | None = None  # [tag, tag^2], built with the tag

    def __call__(self, t: Tensor) -> Tensor:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"{self.name}: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group first"
            )
        group = self.group if self.group is not None else dist.group.WORLD
        if torch.compiler.is_compiling():
            return _AllReduceSum.apply(t, group)
        try:
            if t.numel() not in self._checked_sizes:
                self._check_size(t, group)
            if t.device.type == "cpu" and t.dtype == torch.float64:
                return self._tagged_sum(t, group)
            return _AllReduceSum.apply(t, group)
        except (RuntimeError, dist.DistError) as exc:
            if isinstance(exc, SynchronizationError):
                raise
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SynchronizationError(
                f"{self.name}: the sum over the process group failed: a rank died, hung past "
                f"the process group's timeout, or called a different number of collectives "
                f"({type(exc).__name__}: {reason})"
            ) from exc

    def _tagged_sum(self, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        """Sum ``[tag, tag^2, *t]``, where the tag numbers this reducer by its first call among
        the group's reducers on this rank. Ranks that run the same layers in the same order
        agree on every tag; a rank that skipped a layer or called one again would otherwise
        have its numbers summed with another layer's of the same size, silently."""
        if self._tag is None:
            self._assign_tag(group)
        tag = self._tag
        total = _AllReduceSum.apply(torch.cat([self._tag_header, t]), group)
        tag_sum, tag_square_sum = total[:2].tolist()
        ranks = dist.get_world_size(group)
        if tag_sum != ranks * tag or tag_square_sum != ranks * tag * tag:
            raise SynchronizationError(
                f"{self.name}: the ranks are out of step: this rank is at the layer it first "
                f"synchronised as number {tag}, the {ranks} ranks average {tag_sum / ranks:g} "
                "(a rank skipped a synchronized layer or called one again)"
            )
        return total[2:]

    def _assign_tag(self, group: dist.ProcessGroup) -> None:
        with _tag_lock:
            index = next(_next_tag.setdefault(group, itertools.count()))
        # Kept small enough that float64 sums of tag^2 stay exact for any world size.
        self._tag = 1 + index % 65536
        self._tag_header = torch.tensor([self._tag, self._tag**2], dtype=torch.float64)

    def _check_size(self, t: Tensor, group: dist.ProcessGroup) -> None:
        n = t.numel()
        probe = torch.tensor([1.0, n, n * n], dtype=torch.float64, device=t.device)
        ranks, total, total_sq = _all_reduce_sum(probe, group).tolist()
        if total != ranks * n or total_sq != ranks * n * n:
            raise ValueError(
                f"{self.name}: the ranks disagree on the size of the tensor to sum: this rank "
                f"has {n} numbers, the {ranks:g} ranks average {total / ranks:g} (for batch "
                "norm: a different number of channels)"
            )
        self._checked_sizes.add(n)

    def __repr__(self) -> str:
        return f"ProcessGroupReducer(group={'WORLD' if self.group is None else self.group})"


class SynchronizationError(RuntimeError):
    """Participants could not complete a sum: one raised, hung, skipped or added a call, or
    sent a different shape. Raised in every participant that was waiting, naming the layer."""


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
        parts = rnd.parts
        shapes = [tuple(p.shape) for p in parts]  # type: ignore[union-attr]
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

    def exchange(self, replica: int, t: Tensor) -> Tensor:
        """``replica``'s next sum: wait for the others, return the total (not differentiable)."""
        monitor = self.monitor
        deadline = time.monotonic() + self.timeout
        with monitor.cv:
            index = self._sums[replica]
            self._sums[replica] += 1
            rnd = self._rounds.setdefault(index, _Round(self.num_replicas))
            rnd.parts[replica] = t.detach()
            rnd.arrived += 1
            if rnd.arrived == self.num_replicas and monitor.failure is None:
                problem = self._sum_parts(rnd, index)
                if problem is not None:
                    monitor.fail(f"{self.layer}: {problem}")
                monitor.cv.notify_all()
            in_forward = monitor.ended[replica] is None
            if in_forward:
                monitor.waiting[replica] = (f"{self.layer} sum {index + 1}", rnd)
            try:
                while rnd.result is None and monitor.failure is None:
                    reason = self._unreachable(rnd, index, replica) if in_forward else None
                    if reason is None and in_forward:
                        reason = monitor.deadlocked()
                    remaining = deadline - time.monotonic()
                    if reason is None and remaining <= 0:
                        missing = [i for i, p in enumerate(rnd.parts) if p is None]
                        reason = (
                            f"replica {replica} waited {self.timeout:g} s at sum {index + 1} "
                            f"({'forward' if in_forward else 'backward'}) for replica(s) "
                            f"{missing}, which did not arrive (one hangs, or calls this layer a "
                            "different number of times); the timeout is "
                            "DataParallelWithCallback(sync_timeout=...)"
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
                del self._rounds[index]
        return result.to(t.device, t.dtype, copy=True)


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


def _replica_sum_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    ctx.handle = inputs[1]


def _replica_sum_backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def]
    return torch.ops.fsyncbn.replica_sum(grad.contiguous(), ctx.handle), None


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
        return torch.ops.fsyncbn.replica_sum(t, self.handle)

    def __repr__(self) -> str:
        return f"<replica {self.replica} reducer of {self.group.layer}>"
