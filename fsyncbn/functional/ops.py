"""The public batch-norm ops (pure functions with explicit state) and the one router behind
them: eval, torch's native local kernel, or synchronised training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

from torch import Tensor

from . import kernels
from .checks import check_arguments, check_local_batch_size
from .moments import global_moments, stats_dtype
from .normalize import SyncNormalize, normalization_terms, normalize
from .reducer import LOCAL_REDUCER, Reducer
from .state import State, next_state, update_factor, update_state_in_place

EpsMode = Literal["plus", "clamp"]


class BatchStatistics(NamedTuple):
    """What a training batch contributes to the running statistics."""

    mean: Tensor  # (C,)
    var_unbiased: Tensor  # (C,)
    # min(global count, 1): 0 when every participant was empty, so that the running stats stay
    # as they were without a branch on data; None when the batch cannot be empty.
    took_part: Tensor | float | None


def batch_norm(
    input: Tensor,
    state: Mapping[str, Tensor] | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    reducer: Reducer | None = None,
    eps_mode: EpsMode = "plus",
) -> tuple[Tensor, State | None]:
    """Batch normalisation as a pure function: ``(output, new_state) = batch_norm(x, state)``.

    In training (or when ``state`` is None) each channel is normalised with the mean and
    biased variance of the batch; otherwise with ``state``'s running statistics. With a
    ``reducer`` the batch is the union of every participant's ``input``: the statistics are
    summed over the participants through ``reducer`` (see :func:`sync_batch_norm`). Without
    one the result equals :func:`torch.nn.functional.batch_norm` in outputs, gradients and
    running statistics, using the same native kernels.

    Nothing passed in is modified; the next state is returned. The running variance is the
    unbiased variance over the global count. ``momentum=None`` is the cumulative average
    ``1 / (num_batches_tracked + 1)``, computed as a tensor (no host read). In eval mode the
    state is returned unchanged.

    Statistics are float32 for float16/bfloat16/float32 input and float64 for float64
    input; the output keeps the input's dtype and memory format (channels_last stays).

    Args:
        input: ``(N, C, *)``, at least 2 dims, any N >= 0.
        state: ``{"running_mean": (C,), "running_var": (C,), "num_batches_tracked": ()}``
            (see :func:`init_state`; the keys are nn.BatchNorm's buffer names), or None for
            no running statistics (as ``track_running_stats=False``).
        weight: ``(C,)`` scale, or None.
        bias: ``(C,)`` shift, or None.
        training: normalise with batch statistics and update the state.
        momentum: weight of the batch in the running statistics, in [0, 1], or None.
        eps: added to the variance, >= 0.
        reducer: ``reducer(t) -> element-wise sum of t over all participants``, or None.
        eps_mode: ``"plus"``: ``sqrt(var + eps)`` as torch; ``"clamp"``: ``sqrt(max(var, eps))``
            as the original Synchronized-BatchNorm-PyTorch.

    Returns:
        ``(output, new_state)``: output ``(N, C, *)`` in the input's dtype; new_state a new
        dict with the same keys and dtypes as ``state`` (None when ``state`` is None).

    Raises:
        TypeError: input not a floating tensor, reducer not a callable instance, wrong
            argument types.
        ValueError: fewer than 2 dims; channel count differing from the state, weight or
            bias; state missing a key; momentum outside [0, 1]; eps < 0; unknown eps_mode;
            training with one value per channel over all participants (detected after the
            sum; see :func:`sync_batch_norm`).
        SynchronizationError: participants that disagree on the channel count, or whatever
            the reducer raises when participants fail to meet.

    Example:
        >>> import torch
        >>> from fsyncbn.functional import batch_norm, init_state
        >>> x = torch.randn(8, 3, 4, 4)
        >>> y, state = batch_norm(x, init_state(3), training=True)
        >>> y.shape, int(state["num_batches_tracked"])
        (torch.Size([8, 3, 4, 4]), 1)
        >>> ref = torch.nn.functional.batch_norm(x, None, None, training=True)
        >>> torch.allclose(y, ref, atol=1e-6)
        True
    """
    return run_batch_norm(
        "batch_norm", input, state, weight, bias, training=training, momentum=momentum, eps=eps,
        reducer=reducer, eps_mode=eps_mode,
    )


def sync_batch_norm(
    input: Tensor,
    state: Mapping[str, Tensor] | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    reducer: Reducer,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    eps_mode: EpsMode = "plus",
) -> tuple[Tensor, State | None]:
    """Batch norm whose statistics are summed over all participants through ``reducer``.

    The same op as :func:`batch_norm` with the reducer required; every participant calls
    it with its own slice of the batch and gets its slice of the output, as if batch norm
    had run once on the concatenated batch.

    Communication: exactly one ``reducer`` call in forward, on ``2C + 4`` float64 numbers
    (a header of participant count, C, C*C and count, then the sums n*mean and
    M2 + n*mean^2), and one in backward, on ``2C`` numbers (sum dy, sum dy * xhat). Both
    are independent of the number of participants. Every participant takes part in both,
    also with an empty batch (N = 0): counts travel with the moments, so uneven and empty
    slices weigh in correctly without masks or host reads. If every participant is empty
    the outputs are empty and the running statistics stay as they were
    (``num_batches_tracked`` still counts the step, as nn.BatchNorm does).

    Global checks ride in the header: participants that disagree on C raise
    :class:`~fsyncbn.SynchronizationError`, and training with a single value per channel in
    total raises ValueError, in every participant. On eager CPU tensors the header is read on
    the host; under torch.compile or on an accelerator the check is ``torch._assert_async``
    (no host sync, no graph break), which fails later and less legibly.

    Numerics: see :mod:`fsyncbn.functional.moments` (two-pass local moments merged as
    float64 sums; stable for |mean| >> std). In ``eps_mode="clamp"`` a channel whose
    variance is below eps is divided by the constant sqrt(eps), so its input gradient is
    ``weight * (dy - mean(dy)) / sqrt(eps)``.

    Args:
        input: ``(N, C, *)``, this participant's slice; N may be 0.
        state: as :func:`batch_norm`; every participant ends with the same new state.
        weight: ``(C,)`` or None. Its gradient is this participant's share (sum it over
            participants, as DDP does, for the gradient of the whole batch).
        bias: ``(C,)`` or None, likewise.
        reducer: ``reducer(t) -> element-wise sum of t over all participants``,
            differentiable. See :mod:`fsyncbn.reducers`.
        training: as :func:`batch_norm`; in eval mode no sum is performed.
        momentum: as :func:`batch_norm`.
        eps: as :func:`batch_norm`.
        eps_mode: as :func:`batch_norm`.

    Returns:
        ``(output, new_state)`` as :func:`batch_norm`.

    Raises:
        TypeError: ``reducer`` missing or not callable, and as :func:`batch_norm`.
        ValueError: as :func:`batch_norm`.
        SynchronizationError: as :func:`batch_norm`.

    Example:
        >>> import torch
        >>> from fsyncbn.functional import init_state, sync_batch_norm
        >>> from fsyncbn.reducers import LocalReducer
        >>> x = torch.randn(4, 2, 3)
        >>> y, state = sync_batch_norm(x, init_state(2), reducer=LocalReducer())
        >>> y.shape
        torch.Size([4, 2, 3])
    """
    if reducer is None:
        raise TypeError(
            "sync_batch_norm: expected a reducer (a callable reducer(t) -> sum of t over all "
            "participants, e.g. fsyncbn.reducers.ProcessGroupReducer()), got None"
        )
    return run_batch_norm(
        "sync_batch_norm", input, state, weight, bias, training=training, momentum=momentum,
        eps=eps, reducer=reducer, eps_mode=eps_mode,
    )


def serves_natively(
    input: Tensor, training: bool, reducer: Reducer | None, eps_mode: str
) -> bool:
    """Whether torch's native local training kernel computes exactly what the op asks: the one
    place this is decided. Clamp mode and empty batches take the synchronised path with the
    local reducer instead."""
    return training and reducer is None and eps_mode == "plus" and input.numel() > 0


def run_batch_norm(
    fn: str,
    input: Tensor,
    state: Mapping[str, Tensor] | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    momentum: float | None,
    eps: float,
    reducer: Reducer | None,
    eps_mode: str,
    in_place: bool = False,
    checked: bool = False,
) -> tuple[Tensor, State | None]:
    """Check the arguments, then route to inference, native local training or synchronised
    training.

    ``in_place`` (for a layer whose buffers are ``state``): write the new statistics into
    ``state``'s tensors and return ``state`` itself, where the public ops return a new dict
    and leave their arguments alone. The native kernel then updates them in the same pass,
    as nn.BatchNorm does.

    ``checked``: the caller has already passed these very arguments through
    :func:`~.checks.check_arguments` (a layer remembers the configuration it validated); the
    checks that depend on the batch's size still run.
    """
    if not checked:
        check_arguments(
            fn, input, state, weight, bias, training=training, momentum=momentum, eps=eps,
            eps_mode=eps_mode, reducer=reducer,
        )
    if state is not None and not training:
        terms = normalization_terms(state["running_var"], eps, eps_mode)
        output = normalize(input, weight, bias, state["running_mean"], terms.var, terms.eps)
        return output, state if in_place else dict(state)
    if reducer is None:
        check_local_batch_size(fn, input)
    if serves_natively(input, training, reducer, eps_mode):
        if state is not None and momentum is not None:
            return _train_natively_with_momentum(input, state, weight, bias, momentum, eps, in_place)
        output, batch = _train_natively(input, state is not None, weight, bias, eps)
    elif kernels.runs_fused(input):
        from . import fused  # needs Triton

        return fused.train_synchronized(
            fn, input, state, weight, bias, momentum, eps, reducer or LOCAL_REDUCER, eps_mode,
            in_place,
        )
    else:
        output, batch = _train_synchronized(
            fn, input, weight, bias, eps, reducer or LOCAL_REDUCER, eps_mode
        )
    if state is None:
        return output, None
    factor = update_factor(state, momentum, batch.mean.dtype)
    if batch.took_part is not None:
        factor = factor * batch.took_part
    if in_place:
        update_state_in_place(state, batch.mean, batch.var_unbiased, factor)
        return output, state
    return output, next_state(state, batch.mean, batch.var_unbiased, factor)


def _train_natively_with_momentum(
    input: Tensor,
    state: Mapping[str, Tensor],
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    in_place: bool,
) -> tuple[Tensor, State]:
    """torch's native kernel applies the momentum to the running stats itself, bit for bit
    nn.BatchNorm; in place it writes them in the same pass."""
    output, mean, var = kernels.train_locally(
        input, weight, bias, state["running_mean"], state["running_var"], momentum, eps,
        in_place=in_place,
    )
    if in_place:
        state["num_batches_tracked"].add_(1)
        return output, state
    return output, {"running_mean": mean, "running_var": var,
                    "num_batches_tracked": state["num_batches_tracked"] + 1}


def _train_natively(
    input: Tensor, tracks: bool, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, BatchStatistics | None]:
    """torch's native kernel; with running stats (``tracks``) the batch's mean and unbiased
    variance come back (the kernel with momentum 1 on fresh tensors) for the cumulative
    average to blend in."""
    if not tracks:
        return kernels.train_locally(input, weight, bias, None, None, 0.0, eps, in_place=False)[0], None
    channels, dtype = input.shape[1], stats_dtype(input)
    fresh_mean = input.new_zeros(channels, dtype=dtype)
    fresh_var = input.new_ones(channels, dtype=dtype)
    output, mean, var = kernels.train_locally(
        input, weight, bias, fresh_mean, fresh_var, 1.0, eps, in_place=True
    )
    return output, BatchStatistics(mean, var, None)


def _train_synchronized(
    fn: str,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    reducer: Reducer,
    eps_mode: str,
) -> tuple[Tensor, BatchStatistics]:
    """Training with statistics summed over all participants (one sum forward, one backward)."""
    moments = global_moments(fn, input, reducer, training=True)
    terms = normalization_terms(moments.var, eps, eps_mode)
    output = SyncNormalize.apply(
        input, weight, bias, moments.mean, terms.var, terms.eps, terms.var_follows_batch,
        moments.count, reducer,
    )
    took_part = kernels.participation(moments.count, moments.mean.dtype)
    return output, BatchStatistics(moments.mean, moments.var_unbiased, took_part)
