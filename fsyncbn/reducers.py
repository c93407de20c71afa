"""Reducers: how participants meet.

The contract, public and complete: **a reducer is any callable ``reducer(t: Tensor) ->
Tensor`` returning the element-wise sum of ``t`` over all participants, differentiable (its
backward is the same sum of the incoming gradients).** Every participant calls it the same
number of times with tensors of the same shape. fsyncbn calls it once per batch-norm layer
in forward and once in backward, on O(C) numbers. Write your own for another transport
(Horovod, a custom RPC): nothing else is required.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

__all__ = ["LocalReducer", "ProcessGroupReducer"]


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
