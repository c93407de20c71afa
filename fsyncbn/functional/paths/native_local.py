"""The native local path: training without synchronisation on torch's own kernel, bit for bit
nn.BatchNorm (outputs, gradients, running statistics with a momentum)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from torch import Tensor

from .. import kernels
from ..moments import stats_dtype
from ..state import State, commit


def train(
    input: Tensor, state: Mapping[str, Tensor] | None, weight: Tensor | None,
    bias: Tensor | None, momentum: float | None, eps: float, in_place: bool,
) -> tuple[Tensor, State | None]:
    """torch's kernel. With a momentum it blends the running statistics itself (in place:
    in the same pass, as nn.BatchNorm); for the cumulative average (``momentum=None``) the
    kernel runs with momentum 1 on fresh tensors, which yields the batch's mean and unbiased
    variance, and :func:`..state.commit` blends them."""
    if state is None:
        return kernels.train_locally(input, weight, bias, None, None, 0.0, eps, in_place=False)[0], None
    if momentum is not None:
        # Given running statistics, the kernel returns them (or new ones): never None.
        output, mean, var = cast(tuple[Tensor, Tensor, Tensor], kernels.train_locally(
            input, weight, bias, state["running_mean"], state["running_var"], momentum, eps,
            in_place=in_place,
        ))
        if in_place:
            state["num_batches_tracked"].add_(1)
            return output, dict(state)
        return output, {"running_mean": mean, "running_var": var,
                        "num_batches_tracked": state["num_batches_tracked"] + 1}
    channels, dtype = input.shape[1], stats_dtype(input)
    output, mean, var = cast(tuple[Tensor, Tensor, Tensor], kernels.train_locally(
        input, weight, bias, input.new_zeros(channels, dtype=dtype),
        input.new_ones(channels, dtype=dtype), 1.0, eps, in_place=True,
    ))
    return output, commit(state, mean, var, None, None, in_place)
