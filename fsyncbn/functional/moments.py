"""Per-channel statistics: local moments, the packed message, and the merge after the sum.

Numerics. Each participant computes its own mean m_i and biased variance v_i = M2_i / n_i
(M2_i: the sum of squared deviations) in the statistics dtype, in two passes (a mean, then a
mean of squared deviations; see :func:`local_moments` for the kernel), which stays
stable on offset data. They travel as float64 sums ``n_i * m_i`` and ``M2_i + n_i * m_i**2``
so that ONE element-wise sum over the participants merges them; the global
``M2 = S2 - S1 * mean`` then equals ``sum M2_i + sum n_i (m_i - mean)**2`` up to float64
rounding. Float32 data with |mean| / std ~ 1e4 keeps ~8 significant digits of the variance
this way, where the float32 formula E[x^2] - E[x]^2 keeps none.

The message layout is :mod:`.message`'s: the agreement header of C and the count, summed like
the rest, tell every participant whether they all had the same channel count and the global
count, at no extra round trip.

This room also chooses the statistics kernel (eager, compiled, layout), so that a path
enters it once with the batch and leaves with the global moments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import message
from .agreement import SynchronizationError, disagreement
from .checks import shape_str
from .host import (
    assert_on_device,
    at_least,
    channels_innermost,
    empty_batch_sums,
    reads_on_host,
    stats_dtype,
    values_per_channel,
)


class GlobalMoments(NamedTuple):
    """Statistics over all participants, in the statistics dtype."""

    mean: Tensor  # (C,)
    var: Tensor  # (C,) biased, normalises the batch
    var_unbiased: Tensor  # (C,) for the running variance
    # Values per channel over all participants: a Python number where the header was read
    # on the host (eager CPU), else a 0-dim float64 tensor.
    # Shadows tuple.count, as intended: the field is what callers read.
    count: Tensor | float  # type: ignore[assignment]


def local_moments(input: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance per channel of a non-empty ``(N, C, *)`` batch, two passes."""
    if not torch.compiler.is_compiling():
        # torch's batch-norm statistics kernel: in eager mode far faster than a generic
        # var_mean over (N, *).
        return torch.batch_norm_update_stats(input, None, None, 0.0)
    if input.device.type == "cpu" and channels_innermost(input.shape, input.stride()):
        # Inductor's CPU reductions over every dimension but the innermost are slow (about 3x
        # torch's kernel for channels_last): torch's kernel as one opaque op.
        # A custom op's call is untyped (Any): typed as the function it wraps.
        moments: tuple[Tensor, Tensor] = _opaque_local_moments(input)
        return moments
    # Plain ops, which Inductor fuses: on CPU faster than its var_mean (Welford), and for
    # contiguous (N, C, H, W) input faster than torch's kernel.
    dims = [0, *range(2, input.dim())]
    mean = input.mean(dims, keepdim=True)
    var = (input - mean).square().mean(dims)
    return mean.flatten(), var


@torch.library.custom_op("fsyncbn::channel_moments", mutates_args=())
def _opaque_local_moments(input: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance per channel from torch's kernel, opaque to torch.compile."""
    return torch.batch_norm_update_stats(input, None, None, 0.0)


@_opaque_local_moments.register_fake
def _(input: Tensor) -> tuple[Tensor, Tensor]:
    return input.new_empty(input.shape[1]), input.new_empty(input.shape[1])


def _pack(header: tuple[float, ...], parts: list[Tensor]) -> Tensor:
    """The float64 message ``[*header, *parts]`` on the parts' device."""
    if reads_on_host(parts[0]):
        head = [_host_header(header)]  # cat copies it: the cached tensor is never written
    else:
        # Filled on the device, not copied from host memory: a host-to-device copy would
        # synchronise and cannot be captured in a CUDA graph.
        device = parts[0].device
        head = [torch.full((1,), value, dtype=torch.float64, device=device) for value in header]
    return torch.cat([*head, *parts])


@functools.lru_cache(maxsize=256)
def _host_header(header: tuple[float, ...]) -> Tensor:
    """A CPU tensor of ``header``, made once per header (a layer sends the same one each step)."""
    return torch.tensor(header, dtype=torch.float64)


def pack_moments(input: Tensor) -> Tensor:
    """This participant's float64 message ``[1, C, C*C, n, n*m, M2 + n*m^2]``.

    An empty batch sends zeros for its sums (decided from the shape, never from data).
    """
    channels = input.shape[1]
    count = values_per_channel(input.shape)
    header = message.forward_header(channels, count)
    if count == 0:
        zeros = empty_batch_sums(input, torch.float64)
        return _pack(header, [zeros, zeros])
    dtype = stats_dtype(input.dtype)
    # float16/bfloat16: statistics in float32, never accumulated in the input dtype.
    mean, var = local_moments(input if input.dtype == dtype else input.to(dtype))
    mean = mean.to(torch.float64)
    # M2 + n*m^2 = n * (var + m^2), all in float64 (var is promoted).
    packed = _pack(header, [mean, torch.addcmul(var, mean, mean)])
    packed[message.HEADER_SIZE:].mul_(count)
    return packed


def check_header(fn: str, total: Tensor, input: Tensor, training: bool) -> Tensor | float:
    """Raise if the participants disagree on C, or if training sees one value per channel.

    Read on the host where :func:`.host.reads_on_host` allows (a clear error in every
    participant); elsewhere an asynchronous device assert.

    Returns:
        The global count of values per channel: a Python number where the header was read
        on the host, else a 0-dim tensor.

    Raises:
        SynchronizationError: the participants disagree on the number of channels.
        ValueError: training with one value per channel over all participants.
    """
    channels = input.shape[1]
    if reads_on_host(total):
        *channel_header, count = total[:message.HEADER_SIZE].tolist()
        average = disagreement(channel_header, channels)
        if average is not None:
            raise SynchronizationError(
                f"{fn}: participants disagree on the number of channels: this one has "
                f"{channels} (input shape {shape_str(input.shape)}), the {channel_header[0]:g} "
                f"participants average {average:g}; every participant must give this layer "
                "the same number of channels"
            )
        if training and count == 1:
            raise ValueError(
                f"{fn}: expected more than 1 value per channel when training, got 1 over all "
                f"{channel_header[0]:g} participants (input shape here "
                f"{shape_str(input.shape)}); use a larger batch"
            )
        host_count: float = count  # tolist() of float64: a Python float (typed Any)
        return host_count
    participants, sum_c, sum_c2, count = total[:message.HEADER_SIZE].unbind()
    same_channels = (sum_c == participants * channels) & (
        sum_c2 == participants * channels * channels
    )
    assert_on_device(
        same_channels, f"{fn}: participants disagree on the number of channels"
    )
    if training:
        assert_on_device(
            count != 1, f"{fn}: expected more than 1 value per channel when training"
        )
    return count


def merge_moments(total: Tensor, count: Tensor | float, dtype: torch.dtype) -> GlobalMoments:
    """Global mean and variances from the summed message (float64 math, ``dtype`` results).

    ``count`` is the global count :func:`check_header` returned. With the sums
    ``S1 = sum n_i m_i`` and ``S2 = sum (M2_i + n_i m_i^2)``: ``mean = S1 / n`` and the biased
    variance ``S2 / n - mean^2`` (float64, clamped at 0 against rounding).
    """
    channels = (total.shape[0] - message.HEADER_SIZE) // 2
    sums = total[message.HEADER_SIZE:].view(2, channels)
    mean, mean_square = (sums / at_least(count, 1.0)).unbind()
    var = torch.addcmul(mean_square, mean, mean, value=-1).clamp_(min=0)
    var_unbiased = var * (count / at_least(count - 1, 1.0))
    if dtype == torch.float64:
        return GlobalMoments(mean, var, var_unbiased, count)
    # One cast for the three (each op is a dispatch on small tensors).
    mean, var, var_unbiased = torch.stack([mean, var, var_unbiased]).to(dtype).unbind()
    return GlobalMoments(mean, var, var_unbiased, count)


def global_moments(
    fn: str, input: Tensor, reducer: Callable[[Tensor], Tensor], training: bool
) -> GlobalMoments:
    """Moments of the batch spread over all participants: one call of ``reducer``, O(C)."""
    total = reduce_message(fn, pack_moments(input.detach()), reducer)
    global_count = check_header(fn, total, input, training)
    return merge_moments(total, global_count, stats_dtype(input.dtype))


def reduce_message(fn: str, message: Tensor, reducer: Callable[[Tensor], Tensor]) -> Tensor:
    """``reducer(message)``, checked to be a tensor of the message's shape."""
    total = reducer(message)
    if not isinstance(total, torch.Tensor) or total.shape != message.shape:
        got = shape_str(total.shape) if isinstance(total, torch.Tensor) else type(total).__name__
        raise ValueError(
            f"{fn}: the reducer must return a tensor shaped like its argument "
            f"{shape_str(message.shape)}, got {got}"
        )
    return total
