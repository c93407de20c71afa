"""The public batch-norm ops (pure functions with explicit state) and the one router behind
them: :func:`choose_path` names the path of a call, and :func:`run_batch_norm` runs it
(one file per path in :mod:`.paths`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from .checks import check_arguments
from .paths import composed, cuda_sync, inference, native_local
from .reducer import LOCAL_REDUCER, Reducer
from .state import State

EpsMode = Literal["plus", "clamp"]
Path = Literal["inference", "native_local", "composed", "cuda_sync"]


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


def choose_path(
    input: Tensor,
    state: Mapping[str, Tensor] | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    momentum: float | None,
    reducer: Reducer | None,
    eps_mode: str,
) -> Path:
    """The path that serves a (checked) call: the one place this is decided.

    - ``"inference"``: eval with running statistics.
    - ``"native_local"``: training without a reducer, in eps mode "plus", on a non-empty batch:
      torch's own kernel, bit for bit nn.BatchNorm.
    - ``"cuda_sync"``: every other eager training call on a non-empty CUDA batch, unless
      ``FSYNCBN_FUSED=0`` or the path's Triton glue failed on that device (then once warned):
      torch's sync-batch-norm CUDA kernels.
    - ``"composed"``: the rest (CPU, torch.compile, empty participants, clamp mode without a
      reducer, eval without running statistics).
    """
    if state is not None and not training:
        return "inference"
    if training and reducer is None and eps_mode == "plus" and input.numel() > 0:
        return "native_local"
    if (
        training and not torch.compiler.is_compiling()
        and os.environ.get("FSYNCBN_FUSED", "1") != "0"
        and cuda_sync.accepts(input, weight, bias, state)
        and cuda_sync.ready(input, state, momentum, eps_mode)
    ):
        return "cuda_sync"
    return "composed"


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
    batch_checked: bool = False,
) -> tuple[Tensor, State | None]:
    """Check the arguments, then run the path :func:`choose_path` names.

    ``in_place`` (for a layer whose buffers are ``state``): write the new statistics into
    ``state``'s tensors, where the public ops return new tensors and leave their arguments
    alone. The native kernel then updates them in the same pass, as nn.BatchNorm does.

    ``checked``: the caller has already passed these very arguments through
    :func:`~.checks.check_arguments` (a layer remembers the configuration it validated); the
    checks that depend on the batch's size still run, unless ``batch_checked``: the caller
    has just run them on this very input (an op built on this one, such as
    :func:`.activated.batch_norm_act`).
    """
    if not (checked and batch_checked):
        check_arguments(
            fn, input, state, weight, bias, training=training, momentum=momentum, eps=eps,
            eps_mode=eps_mode, reducer=reducer, configuration_checked=checked,
        )
    path = choose_path(
        input, state, weight, bias, training=training, momentum=momentum, reducer=reducer,
        eps_mode=eps_mode,
    )
    if path == "inference":
        assert state is not None
        return inference.infer(input, state, weight, bias, eps, eps_mode, in_place)
    if path == "native_local":
        return native_local.train(input, state, weight, bias, momentum, eps, in_place)
    train = cuda_sync.train if path == "cuda_sync" else composed.train
    return train(
        fn, input, state, weight, bias, momentum, eps, reducer or LOCAL_REDUCER, eps_mode, in_place,
    )
