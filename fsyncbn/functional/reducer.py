"""The reducer contract, and the reducer of a single participant.

**A reducer is any callable ``reducer(t: Tensor) -> Tensor`` returning the element-wise sum of
``t`` over all participants, differentiable (its backward is the same sum of the incoming
gradients).** Every participant calls it the same number of times with tensors of the same
shape. fsyncbn calls it once per batch-norm layer in forward and once in backward, on O(C)
numbers. Write your own for another transport (Horovod, a custom RPC): nothing else is
required. :mod:`fsyncbn.reducers` has the ones for torch.distributed.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Reducer = Callable[[Tensor], Tensor]


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


LOCAL_REDUCER = LocalReducer()
