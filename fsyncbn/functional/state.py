"""The explicit batch-norm state: its keys, creating it, and computing its next value."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

State = dict[str, Tensor]

# nn.BatchNorm's buffer names, so that state_dict() and torch.func.functional_call line up.
STATE_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def check_num_features(fn: str, num_features: object) -> None:
    """Raise unless ``num_features`` is a positive int (not a bool, not a float)."""
    if isinstance(num_features, bool) or not isinstance(num_features, int):
        raise TypeError(
            f"{fn}: expected num_features to be a positive int (the number of channels C), "
            f"got {type(num_features).__name__} {num_features!r}"
            + (f"; pass int({num_features!r})" if isinstance(num_features, float) else "")
        )
    if num_features <= 0:
        raise ValueError(f"{fn}: expected num_features > 0, got {num_features!r}")


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
        TypeError: ``num_features`` is not an int, or ``dtype`` is not a floating dtype.
        ValueError: ``num_features`` is not positive.

    Example:
        >>> state = init_state(3)
        >>> sorted(state)
        ['num_batches_tracked', 'running_mean', 'running_var']
        >>> state["running_var"]
        tensor([1., 1., 1.])
    """
    check_num_features("init_state", num_features)
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

    The one home of torch's rule ``new = (1 - momentum) * old + momentum * batch``. The
    cumulative average stays a tensor (no ``.item()``, unlike nn.BatchNorm) so that it traces
    without a graph break.
    """
    if momentum is not None:
        return float(momentum)
    return 1.0 / (state["num_batches_tracked"] + 1).to(dtype)


def _blend(old: Tensor, batch: Tensor, factor: float | Tensor) -> Tensor:
    """``old * (1 - factor) + batch * factor`` in the batch's dtype."""
    return old.to(batch.dtype) * (1 - factor) + batch * factor


def next_state(
    state: Mapping[str, Tensor], batch_mean: Tensor, batch_var_unbiased: Tensor,
    factor: float | Tensor,
) -> State:
    """``new = (1 - factor) * old + factor * batch`` for both running stats; count + 1.

    Plain ops, which torch.func transforms batch (foreach ops have no batching rule).
    """
    mean, var = state["running_mean"], state["running_var"]
    return {
        "running_mean": _blend(mean, batch_mean, factor).to(mean.dtype),
        "running_var": _blend(var, batch_var_unbiased, factor).to(var.dtype),
        "num_batches_tracked": state["num_batches_tracked"] + 1,
    }


def update_state_in_place(
    state: Mapping[str, Tensor], batch_mean: Tensor, batch_var_unbiased: Tensor,
    factor: float | Tensor,
) -> None:
    """:func:`next_state` written into ``state``'s own tensors (a layer's buffers), with the
    same element-wise operations in the same order, so the same bits. With a Python factor,
    both statistics go through one foreach op per step (each op is a dispatch on small
    tensors, a cost per layer step on the eager CPU path)."""
    olds = [state["running_mean"], state["running_var"]]
    batches = [batch_mean, batch_var_unbiased]
    with torch.no_grad():
        if any(old.dtype != batch.dtype for old, batch in zip(olds, batches, strict=True)):
            for old, batch in zip(olds, batches, strict=True):
                old.copy_(_blend(old, batch, factor))
        elif isinstance(factor, Tensor):
            for old, batch in zip(olds, batches, strict=True):
                old.mul_(1 - factor).add_(batch * factor)
        else:
            torch._foreach_mul_(olds, 1 - factor)
            torch._foreach_add_(olds, torch._foreach_mul(batches, factor))
        state["num_batches_tracked"].add_(1)


def commit(
    state: Mapping[str, Tensor], batch_mean: Tensor, batch_var_unbiased: Tensor,
    momentum: float | None, took_part: Tensor | float | None, in_place: bool,
) -> State:
    """The end of a training path: blend the batch into the running statistics with
    :func:`update_factor` (times ``took_part``, ``min(global count, 1)``, where a step may have
    no values at all), into ``state``'s own tensors when ``in_place`` (returning ``state``'s
    entries), else into new ones."""
    factor = update_factor(state, momentum, batch_mean.dtype)
    if took_part is not None:
        factor = factor * took_part
    if in_place:
        update_state_in_place(state, batch_mean, batch_var_unbiased, factor)
        return dict(state)
    return next_state(state, batch_mean, batch_var_unbiased, factor)
