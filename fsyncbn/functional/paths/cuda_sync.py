"""The CUDA sync path: torch's sync-batch-norm CUDA kernels for every pass over the batch,
fsyncbn's O(C) glue in two small Triton kernels (:mod:`.cuda_glue`).

Per layer step, with a process-group reducer (each line one kernel launch)::

    forward   torch.batch_norm_update_stats    local mean, biased variance (Welford)
              pack_message_kernel              the forward message (see ..message)
              reducer: clone + all_reduce      the one forward sum
              merge_message_kernel             global mean, invstd, count, flag, running stats
              torch._assert_async              channel agreement, count > 1
              torch.batch_norm_elemt           y = (x - mean) * invstd * weight + bias
    backward  torch.batch_norm_backward_reduce local sum dy, sum dy * (x - mean), dweight, dbias
              torch.cat                        the backward message
              reducer: clone + all_reduce      the one backward sum
              (clamp mode) mul_                drop the xhat term where var < eps
              torch.batch_norm_backward_elemt  dx from the global sums and count

12 launches (13 in clamp mode), 2 more where autograd accumulates into existing ``.grad``;
torch's channels_last reductions add a zero fill for their cross-block semaphores on large
batches. torch.nn.SyncBatchNorm's own path takes about 30. No host synchronisation: the
checks are one device assert, so the step can be captured in a CUDA graph.

Chosen by the router (:func:`..ops.choose_path`) for eager, non-empty training on CUDA. If
the Triton kernels cannot be compiled or launched on a device, the first call there warns once
(naming the cause and ``FSYNCBN_FUSED``) and that device and configuration take the composed
path from then on; a user's training never stops for this path.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .. import message
from ..host import stats_dtype, values_per_channel
from ..moments import reduce_message
from ..state import STATE_KEYS, State

# Devices this path serves. The tests add "cpu", with reference CPU implementations of
# torch's CUDA-only kernels registered for the session and the Triton kernels interpreted.
DEVICE_TYPES = {"cuda"}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# What selects one compiled variant of the glue: device, statistics dtype, has state, uses a
# momentum, clamp mode.
_Configuration = tuple[str, torch.dtype, bool, bool, bool]

# Configurations whose glue failed to compile or launch: the composed path serves them.
_failed: dict[_Configuration, str] = {}


def _kernels() -> Any:
    """The Triton glue module (imported on first use: it needs Triton)."""
    from . import cuda_glue

    return cuda_glue


def accepts(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, state: Mapping[str, Tensor] | None
) -> bool:
    """Whether this path computes exactly what the op asks for these tensors: a non-empty batch
    on a served device, parameters in the input's or the statistics dtype (what torch's kernels
    take), running statistics in the statistics dtype (what the glue writes)."""
    if input.device.type not in DEVICE_TYPES or input.dtype not in DTYPES or input.numel() == 0:
        return False
    dtype = stats_dtype(input.dtype)
    for t in (weight, bias):
        if t is not None and t.dtype not in (input.dtype, dtype):
            return False
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        return False
    return state is None or all(state[k].dtype == dtype for k in ("running_mean", "running_var"))


def _configuration(
    input: Tensor, state: Mapping[str, Tensor] | None, momentum: float | None, eps_mode: str
) -> _Configuration:
    """What selects one compiled variant of the glue on one device."""
    return (
        str(input.device), stats_dtype(input.dtype), state is not None,
        state is not None and momentum is not None, eps_mode == "clamp",
    )


def ready(
    input: Tensor, state: Mapping[str, Tensor] | None, momentum: float | None, eps_mode: str
) -> bool:
    """Whether the glue runs for this configuration: compiled and launched once on scratch
    tensors the first time it is seen (before any collective, so that a failure can still
    take the composed path); False after a failure, with one warning."""
    key = _configuration(input, state, momentum, eps_mode)
    if key in _failed:
        return False
    if key in _compiled:
        return True
    try:
        _rehearse(input.device, key)
    except Exception as exc:  # noqa: BLE001 - any failure of an optimisation: fall back
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        _failed[key] = reason
        warnings.warn(
            f"fsyncbn: the CUDA sync path's Triton kernels failed on {input.device} for "
            f"{stats_dtype(input.dtype)} statistics ({reason}); synchronised batch norm there takes "
            "the composed path (correct, more kernel launches). Set FSYNCBN_FUSED=0 to choose "
            "the composed path without trying.", RuntimeWarning, stacklevel=4,
        )
        return False
    _compiled.add(key)
    return True


_compiled: set[_Configuration] = set()


def _rehearse(device: torch.device, key: _Configuration) -> None:
    """Launch both glue kernels once on scratch tensors with this configuration's dtypes and
    constants (the variants a real step launches), then wait for them."""
    _, dtype, has_state, use_momentum, clamp = key
    channels = 2
    mean = torch.zeros(channels, dtype=dtype, device=device)
    var = torch.ones(channels, dtype=dtype, device=device)
    packed = _pack(mean, var, 4, channels)
    state = {
        "running_mean": torch.zeros(channels, dtype=dtype, device=device),
        "running_var": torch.ones(channels, dtype=dtype, device=device),
        "num_batches_tracked": torch.zeros((), dtype=torch.long, device=device),
    } if has_state else None
    _merge(packed, state, 0.1 if use_momentum else None, 1e-5, clamp, dtype, in_place=False)
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        # Once per configuration: surface a launch failure here (never inside a graph capture,
        # where a synchronisation is illegal; the launches themselves still fail there).
        torch.cuda.synchronize(device)


def train(
    fn: str,
    input: Tensor,
    state: Mapping[str, Tensor] | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    reducer: Callable[[Tensor], Tensor],
    eps_mode: str,
    in_place: bool,
) -> tuple[Tensor, State | None]:
    """Synchronised training of a non-empty batch (see the module doc); the same results as
    the composed path up to rounding, and its state update: written into ``state``'s tensors
    when ``in_place``, else into new ones."""
    channels = input.shape[1]
    dtype = stats_dtype(input.dtype)
    mean, var = torch.batch_norm_update_stats(input, None, None, 0.0)
    total = reduce_message(fn, _pack(mean, var, values_per_channel(input.shape), channels), reducer)
    clamp = eps_mode == "clamp"
    stats, counts, new_state = _merge(total, state, momentum, eps, clamp, dtype, in_place)
    torch._assert_async(
        counts[2], f"{fn}: participants disagree on the number of channels, or training sees "
        "1 value per channel over all participants",
    )
    global_mean, invstd, follows = stats.view(3, channels).unbind()
    output: Tensor = CudaSyncNormalize.apply(  # type: ignore[no-untyped-call]  # torch's apply
        input, weight, bias, global_mean, invstd, follows if clamp else None, counts[:2], reducer,
    )
    return output, new_state


def _pack(mean: Tensor, var: Tensor, count: int, channels: int) -> Tensor:
    msg = torch.empty(message.forward_size(channels), dtype=torch.float64, device=mean.device)
    glue = _kernels()
    glue.pack_message_kernel[pack_grid(channels)](
        mean, var, msg, count, channels,
        PARTICIPANTS=message.PARTICIPANTS, CHANNELS=message.CHANNELS,
        CHANNELS_SQUARED=message.CHANNELS_SQUARED, COUNT=message.COUNT,
        HEADER_SIZE=message.HEADER_SIZE, BLOCK=glue.BLOCK_C,
    )
    return msg


def pack_grid(channels: int) -> tuple[int]:
    """The pack kernel's grid: one program per block of channels (never the batch size)."""
    return (-(-channels // _kernels().BLOCK_C),)


MERGE_GRID = (1,)  # one program, so that num_batches_tracked is read before it is written


def _merge(
    total: Tensor, state: Mapping[str, Tensor] | None, momentum: float | None, eps: float,
    clamp: bool, dtype: torch.dtype, in_place: bool,
) -> tuple[Tensor, Tensor, State | None]:
    channels = (total.numel() - message.HEADER_SIZE) // 2
    stats = torch.empty(3 * channels, dtype=dtype, device=total.device)
    counts = torch.empty(3, dtype=torch.int32, device=total.device)
    old: tuple[Tensor, ...]
    new: tuple[Tensor, ...]
    if state is None:
        old = new = (total, total, total)
        new_state = None
    else:
        old = tuple(state[k] for k in STATE_KEYS)
        new = old if in_place else tuple(torch.empty_like(t) for t in old)
        new_state = dict(state) if in_place else dict(zip(STATE_KEYS, new, strict=True))
    glue = _kernels()
    glue.merge_message_kernel[MERGE_GRID](
        total, stats, counts, *old, *new, channels, *_halves(eps),
        *_halves(0.0 if momentum is None else float(momentum)),
        CHANNELS=message.CHANNELS, CHANNELS_SQUARED=message.CHANNELS_SQUARED,
        COUNT=message.COUNT, HEADER_SIZE=message.HEADER_SIZE, HAS_STATE=state is not None,
        USE_MOMENTUM=state is not None and momentum is not None, CLAMP=clamp, BLOCK=glue.BLOCK_C,
    )
    return stats, counts, new_state


@functools.cache
def _halves(value: float) -> tuple[float, float]:
    """``value`` as two float32 numbers whose float64 sum is ``value`` to ~48 bits (Triton
    passes Python floats as float32)."""
    high = float(torch.tensor(value, dtype=torch.float32))
    return high, float(torch.tensor(value - high, dtype=torch.float32))


class CudaSyncNormalize(torch.autograd.Function):
    """``y = (x - mean) * invstd * weight + bias`` with global statistics (torch's
    batch_norm_elemt); backward sums ``[sum dy, sum dy * (x - mean)]`` over the participants
    and forms dx with torch's batch_norm_backward_elemt. The statistics are constants here:
    the global sums account for their dependence on every participant's input."""

    @staticmethod
    def forward(
        input: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor,
        follows: Tensor | None, counts: Tensor, reducer: Callable[[Tensor], Tensor],
    ) -> Tensor:
        # eps is unused by the kernel: invstd already holds it (and clamp mode's max).
        return torch.batch_norm_elemt(input, weight, bias, mean, invstd, 0.0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        input, weight, bias, mean, invstd, follows, counts, reducer = inputs
        ctx.reducer = reducer
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, weight, mean, invstd, follows, counts)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, weight, mean, invstd, follows, counts = ctx.saved_tensors
        channels = input.shape[1]
        # torch's kernels pick their layout from one tensor: give dy the input's.
        grad_output = _like_layout(grad_output, input)
        weight_g = weight is not None and ctx.needs_input_grad[1]
        bias_g = ctx.has_bias and ctx.needs_input_grad[2]
        # torch's kernel leaves grad_bias out when there is no weight; it is sum dy anyway.
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
            grad_output, input, mean, invstd, weight, True, weight_g, bias_g and weight is not None,
        )
        if bias_g and weight is None:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        # Every participant calls the reducer here, also when no input gradient is needed:
        # skipping it would leave the others waiting.
        total = ctx.reducer(torch.cat([sum_dy, sum_dy_xmu]))
        total_dy, total_dy_xmu = total.view(2, channels).unbind()
        grad_input = None
        if ctx.needs_input_grad[0]:
            if follows is not None:
                # Where clamp mode divided by the constant sqrt(eps), the variance does not
                # depend on x: the xhat term drops out.
                total_dy_xmu = total_dy_xmu * follows
            grad_input = torch.batch_norm_backward_elemt(
                grad_output, input, mean, invstd, weight, total_dy, total_dy_xmu, counts,
            )
        return (
            grad_input, grad_weight if weight_g else None, grad_bias if bias_g else None,
            None, None, None, None, None,
        )


CudaSyncNormalize.forward.__signature__ = inspect.signature(  # type: ignore[attr-defined]  # not in typeshed
    CudaSyncNormalize.forward
)


def _like_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in ``like``'s memory format (channels_last or contiguous) where it differs."""
    layout = _layout(like)
    return t if t.is_contiguous(memory_format=layout) else t.contiguous(memory_format=layout)


def _layout(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format
