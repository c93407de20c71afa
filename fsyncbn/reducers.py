"""Reducers for torch.distributed.

What a reducer is, is written once, with the functional ops: :mod:`fsyncbn.functional.reducer`.
Here: :class:`ProcessGroupReducer` (the ranks of a torch.distributed process group) and
:func:`all_reduce_sum`; :class:`LocalReducer` (one participant) is re-exported. DataParallel
replicas meet in :mod:`fsyncbn.replicas`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from . import group_keys, teardown
from .functional.agreement import SynchronizationError, agreement_header, disagreement
from .functional.reducer import LocalReducer, Reducer

__all__ = ["LocalReducer", "ProcessGroupReducer", "Reducer", "SynchronizationError", "all_reduce_sum"]


def all_reduce_sum(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The sum of ``t`` over ``group``, out of place.

    torch.compile traces the functional collective. In eager mode the plain c10d call costs
    far less around the collective itself (gloo, one rank, 132 numbers: about 75 us against
    335 us for funcol's all_reduce + wait_tensor). A CPU tensor is summed in a buffer that
    fsyncbn keeps until gloo has let it go, and the caller gets a copy, so that gloo's worker
    never holds the last reference to a Python object at interpreter exit (see
    :mod:`fsyncbn.teardown`); other devices sum in place, with no host synchronisation.
    """
    if torch.compiler.is_compiling():
        summed: Tensor = funcol.wait_tensor(  # type: ignore[no-untyped-call]  # untyped in torch
            funcol.all_reduce(t, "sum", group)
        )
        return summed
    if t.device.type != "cpu":
        total = t.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total
    buffer = teardown.hold(t.clone())
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer.clone()


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the gradients."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return all_reduce_sum(t, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return all_reduce_sum(grad.contiguous(), ctx.group), None


# Words of the backends' errors when a peer failed: it died, closed its connection, did not
# arrive before the timeout, or called another collective (torch's fingerprint check under
# TORCH_DISTRIBUTED_DEBUG=DETAIL). Other backend errors pass through as they are.
_PEER_FAILURE = (
    "timed out", "timeout", "connection", "closed", "reset by peer", "broken pipe", "abort",
    "peer", "socket", "shutdown", "terminated", "watchdog", "mismatch between collectives",
)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether a backend error means that a peer died, hung, left or is out of step, rather
    than a problem with this rank's own call."""
    if isinstance(exc, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(word in text for word in _PEER_FAILURE)


# Per process group (named, not held: see group_keys), the tag of the next reducer to make its
# first call (see _tagged_sum).
_next_tag: dict[group_keys.GroupKey, itertools.count[int]] = {}
_tag_lock = threading.Lock()


class ProcessGroupReducer:
    """Sum over the ranks of a torch.distributed process group (one all_reduce per call).

    Works with any backend the group has: gloo on CPU, nccl on GPUs; under torch.compile it
    uses functional collectives, which trace without a graph break. Waiting is governed by
    the process group's timeout (``init_process_group(timeout=...)``): a rank that never
    arrives makes the others raise after that time rather than hang; a rank that dies makes
    them raise as soon as the backend notices.

    In eager mode, the first call with each tensor size first sums the agreement header
    ``[1, n, n*n]`` (see :mod:`fsyncbn.functional.agreement`) to check that every rank sends
    ``n`` numbers: backends do not sum tensors of different sizes (gloo aborts the process),
    so ranks that disagree, for example on a batch-norm layer's channel count, raise
    :class:`SynchronizationError` on every rank instead. Later calls of that size cost one
    all_reduce. On CPU, the agreement header of a tag travels with every float64 sum (the
    forward message of a batch-norm layer, and the float64 backward sums), 3 more numbers:
    the tag numbers the reducer by its first call among the group's reducers on its rank.
    Ranks running the same layers in the same order agree on every tag, so a rank that
    skipped a layer or called one again raises :class:`SynchronizationError` on every rank,
    instead of having its numbers summed with another layer's of the same size. Under
    torch.compile both checks are skipped.

    Backend errors that mean a missing peer (a rank died, hung past the timeout, or left)
    are re-raised as :class:`SynchronizationError`; any other error passes through as it is.

    Args:
        group: the process group; None means the default group (WORLD), looked up at call
            time so the reducer may be built before ``init_process_group``.
        name: how errors name the caller; None for no prefix (the layers add their own).

    Raises:
        TypeError: ``group`` is neither None nor a ProcessGroup.
    """

    def __init__(
        self, group: dist.ProcessGroup | None = None, *, name: str | None = "ProcessGroupReducer"
    ) -> None:
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"{name or 'ProcessGroupReducer'}: expected group to be a "
                f"torch.distributed.ProcessGroup or None, got {type(group).__name__}"
            )
        self.group = group
        self.name = name
        self._checked_sizes: set[int] = set()
        self._tag: int | None = None
        self._tag_header: Tensor | None = None  # agreement header of the tag, built with it

    def _message(self, text: str) -> str:
        return f"{self.name}: {text}" if self.name else text

    def __call__(self, t: Tensor) -> Tensor:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                self._message(
                    "torch.distributed is not initialized; call "
                    "torch.distributed.init_process_group first"
                )
            )
        # Initialized (checked above): the default group exists.
        group = self.group if self.group is not None else cast(dist.ProcessGroup, dist.group.WORLD)
        total: Tensor
        if torch.compiler.is_compiling():
            total = _AllReduceSum.apply(t, group)  # type: ignore[no-untyped-call]  # torch's apply
            return total
        try:
            if t.numel() not in self._checked_sizes:
                self._check_size(t, group)
            if t.device.type == "cpu" and t.dtype == torch.float64:
                return self._tagged_sum(t, group)
            total = _AllReduceSum.apply(t, group)  # type: ignore[no-untyped-call]  # torch's apply
            return total
        except (RuntimeError, dist.DistError) as exc:
            if isinstance(exc, SynchronizationError) or not is_peer_failure(exc):
                raise
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SynchronizationError(
                self._message(
                    "the sum over the process group failed: a rank died, hung past the process "
                    f"group's timeout, left, or called another collective ({type(exc).__name__}: "
                    f"{reason})"
                )
            ) from exc

    def _tagged_sum(self, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        """Sum the tag's agreement header with ``t``; raise if the ranks are at different tags."""
        if self._tag is None:
            self._assign_tag(group)
        tag = cast(int, self._tag)  # assigned by _assign_tag, with its header
        header = cast(Tensor, self._tag_header)
        total: Tensor = _AllReduceSum.apply(  # type: ignore[no-untyped-call]  # torch's apply
            torch.cat([header, t]), group
        )
        self._require_agreement(total[:3].tolist(), tag, lambda ranks, average: (
            f"the ranks are out of step: this rank is at the layer it first synchronised as "
            f"number {tag}, the {ranks:g} ranks average {average:g} (a rank skipped a "
            "synchronized layer or called one again)"
        ))
        return total[3:]

    def _assign_tag(self, group: dist.ProcessGroup) -> None:
        with _tag_lock:
            key = group_keys.key_of(group)
            if key not in _next_tag:
                group_keys.prune(_next_tag)
            index = next(_next_tag.setdefault(key, itertools.count()))
        # Kept small enough that float64 sums of tag^2 stay exact for any world size.
        self._tag = 1 + index % 65536
        self._tag_header = torch.tensor(agreement_header(self._tag), dtype=torch.float64)

    def _check_size(self, t: Tensor, group: dist.ProcessGroup) -> None:
        n = t.numel()
        probe = torch.tensor(agreement_header(n), dtype=torch.float64, device=t.device)
        self._require_agreement(all_reduce_sum(probe, group).tolist(), n, lambda ranks, average: (
            f"the ranks disagree on the size of the tensor to sum: this rank has {n} numbers, the "
            f"{ranks:g} ranks average {average:g} (for batch norm: a different number of channels; "
            "every rank must give the layer the same C)"
        ))
        self._checked_sizes.add(n)

    def _require_agreement(
        self, summed: list[float], value: float, explain: Callable[[float, float], str]
    ) -> None:
        """Raise SynchronizationError, ``explain(ranks, average)``, unless all ranks sent ``value``."""
        average = disagreement(summed, value)
        if average is not None:
            raise SynchronizationError(self._message(explain(summed[0], average)))

    def __deepcopy__(self, memo: dict[int, Any]) -> ProcessGroupReducer:
        # A process group is a handle to shared communicators: copies of a model share it.
        return ProcessGroupReducer(self.group, name=self.name)

    def __repr__(self) -> str:
        return f"ProcessGroupReducer(group={'WORLD' if self.group is None else self.group})"
