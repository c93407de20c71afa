"""The native local path: training without synchronisation on torch's own kernel, bit for bit
nn.BatchNorm (outputs, gradients, running statistics with a momentum)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import cast

import torch
from torch import Tensor

from ..host import stats_dtype
from ..state import State, commit

# torch.ops are untyped (their calls return Any): typed here with the results of their schemas.
_native_training: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = (
    torch.ops.aten._native_batch_norm_legit_functional
)
_native_training_no_stats: Callable[..., tuple[Tensor, Tensor, Tensor]] = (
    torch.ops.aten._native_batch_norm_legit.no_stats
)


def train(
    input: Tensor, state: Mapping[str, Tensor] | None, weight: Tensor | None,
    bias: Tensor | None, momentum: float | None, eps: float, in_place: bool,
) -> tuple[Tensor, State | None]:
    """torch's kernel. With a momentum it blends the running statistics itself (in place:
    in the same pass, as nn.BatchNorm); for the cumulative average (``momentum=None``) the
    kernel runs with momentum 1 on fresh tensors, which yields the batch's mean and unbiased
    variance, and :func:`..state.commit` blends them."""
    if state is None:
        return train_locally(input, weight, bias, None, None, 0.0, eps, in_place=False)[0], None
    if momentum is not None:
        # Given running statistics, the kernel returns them (or new ones): never None.
        output, mean, var = cast(tuple[Tensor, Tensor, Tensor], train_locally(
            input, weight, bias, state["running_mean"], state["running_var"], momentum, eps,
            in_place=in_place,
        ))
        if in_place:
            state["num_batches_tracked"].add_(1)
            return output, dict(state)
        return output, {"running_mean": mean, "running_var": var,
                        "num_batches_tracked": state["num_batches_tracked"] + 1}
    channels, dtype = input.shape[1], stats_dtype(input.dtype)
    output, mean, var = cast(tuple[Tensor, Tensor, Tensor], train_locally(
        input, weight, bias, input.new_zeros(channels, dtype=dtype),
        input.new_ones(channels, dtype=dtype), 1.0, eps, in_place=True,
    ))
    return output, commit(state, mean, var, None, None, in_place)


def train_locally(
    input: Tensor, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float,
    *, in_place: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Training without synchronisation: torch's kernel, bit for bit nn.BatchNorm.

    Returns ``(output, new running_mean, new running_var)``. ``in_place``: the kernel updates
    ``running_mean``/``running_var`` themselves, as nn.BatchNorm does, and returns them;
    otherwise they are left untouched and new tensors come back.
    """
    if running_mean is None or running_var is None:
        return _native_training_no_stats(input, weight, bias, True, 0.0, eps)[0], None, None
    if in_place:
        output = torch.batch_norm(
            input, weight, bias, running_mean, running_var, True, momentum, eps,
            torch.backends.cudnn.enabled,
        )
        return output, running_mean, running_var
    # Autograd saves the running-stat arguments: clones keep the caller free to overwrite
    # its own tensors (as a module does with its buffers) before backward.
    output, _, _, mean, var = _native_training(
        input, weight, bias, running_mean.clone(), running_var.clone(), True, momentum, eps
    )
    return output, mean, var
