"""The explicit batch-norm state: creating it and computing its next value."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

State = dict[str, Tensor]


def init_state(
    num_features: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> State:
    """A fresh batch-norm state, laid out exactly as nn.BatchNorm's buffers.

    Args:
        num_features: number of channels C.
        device: where the tensors live.
        dtype: floating dtype of ``running_mean``/``running_var`` (default: torch's default).

    Returns:
        ``{"running_mean": zeros (C,), "running_var": ones (C,), "num_batches_tracked": 0}``,
        ``num_batches_tracked`` a 0-dim int64 tensor, as ``nn.BatchNorm2d(C).state_dict()``.

    Raises:
        ValueError: ``num_features`` is not a positive integer.
        TypeError: ``dtype`` is not a floating dtype.

    Example:
        >>> state = init_state(3)
        >>> sorted(state)
        ['num_batches_tracked', 'running_mean', 'running_var']
        >>> state["running_var"]
        tensor([1., 1., 1.])
    """
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(f"init_state: expected num_features > 0, got {num_features!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"init_state: expected a floating dtype, got {dtype}")
    return {
        "running_mean": torch.zeros(num_features, device=device, dtype=dtype),
        "running_var": torch.ones(num_features, device=device, dtype=dtype),
        "num_batches_tracked": torch.tensor(0, dtype=torch.long, device=device),
    }


def update_factor(
    state: Mapping[str, Tensor], momentum: float | None, dtype: torch.dtype
) -> float | Tensor:
    """The weight of this batch in the running stats: momentum, or 1/(t+1) when None.

    The cumulative average stays a tensor (no ``.item()``, unlike nn.BatchNorm) so that it
    traces without a graph break.
    """
    if momentum is not None:
        return float(momentum)
    return 1.0 / (state["num_batches_tracked"] + 1).to(dtype)


def next_state(
    state: Mapping[str, Tensor], batch_mean: Tensor, batch_var_unbiased: Tensor,
    factor: float | Tensor,
) -> State:
    """``new = (1 - factor) * old + factor * batch`` for both running stats; count + 1."""

    def blend(old: Tensor, batch: Tensor) -> Tensor:
        mixed = old.to(batch.dtype) * (1 - factor) + batch * factor
        return mixed.to(old.dtype)

    return {
        "running_mean": blend(state["running_mean"], batch_mean),
        "running_var": blend(state["running_var"], batch_var_unbiased),
        "num_batches_tracked": state["num_batches_tracked"] + 1,
    }
