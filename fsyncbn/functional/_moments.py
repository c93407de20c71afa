"""Per-channel statistics: local moments, the packed message, and the merge after the sum.

Numerics. Each participant computes its own mean m_i and biased variance v_i = M2_i / n_i
(M2_i: the sum of squared deviations) in the statistics dtype, in two passes (torch's
batch-norm statistics kernel; under torch.compile, a mean and then a mean of squared
deviations), which stays stable on offset data. They travel as float64
sums ``n_i * m_i`` and ``M2_i + n_i * m_i**2`` so that ONE element-wise sum over the
participants merges them; the global ``M2 = S2 - S1 * mean`` then equals
``sum M2_i + sum n_i (m_i - mean)**2`` up to float64 rounding. Float32 data with
|mean| / std ~ 1e4 keeps ~8 significant digits of the variance this way, where the
float32 formula E[x^2] - E[x]^2 keeps none.

The message is ``[1, C, C*C, n, n*m (C values), M2 + n*m^2 (C values)]``: a header of four
numbers, summed like the rest, tells every participant how many took part, whether they
all had the same channel count (sum C == W*C and sum C^2 == W*C^2 only if every C is equal)
and the global count, at no extra round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import shape_str, values_per_channel

HEADER_SIZE = 4


class GlobalMoments(NamedTuple):
    """Statistics over all participants, in the statistics dtype."""

    mean: Tensor  # (C,)
    var: Tensor  # (C,) biased, normalises the batch
    var_unbiased: Tensor  # (C,) for the running variance
    # Values per channel over all participants: a Python number where the header was read
    # on the host (eager CPU), else a 0-dim float64 tensor.
    count: Tensor | float


def stats_dtype(input: Tensor) -> torch.dtype:
    """float64 statistics for float64 input, float32 for everything else (fp16/bf16 too)."""
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def reduce_dims(input: Tensor) -> list[int]:
    return [0, *range(2, input.dim())]


def local_moments(input: Tensor) -> tuple[Tensor, Tensor, int]:
    """Mean and biased variance per channel of one participant's batch, and its count.

    An empty batch gives zeros (decided from the shape, never from data).
    """
    channels = input.shape[1]
    count = values_per_channel(input)
    dtype = stats_dtype(input)
    if count == 0:
        zeros = torch.zeros(channels, dtype=dtype, device=input.device)
        return zeros, zeros, 0
    # float16/bfloat16: statistics in float32, never accumulated in the input dtype.
    input = input.to(dtype)
    if not torch.compiler.is_compiling():
        # torch's own batch-norm statistics kernel (two passes, per channel): in eager mode
        # far faster on CPU than a generic var_mean over (N, *).
        mean, var = torch.batch_norm_update_stats(input, None, None, 0.0)
    elif input.device.type == "cpu" and channels_innermost(input):
        # Inductor's CPU reductions over every dimension but the innermost are slow (about
        # 3x torch's kernel for channels_last): call torch's kernel as one opaque op.
        mean, var = _native_channel_moments(input)
    else:
        # Two passes in plain ops, which Inductor fuses: on CPU faster than its var_mean
        # (Welford), and for contiguous (N, C, H, W) input faster than torch's kernel.
        dims = reduce_dims(input)
        mean = input.mean(dims, keepdim=True)
        var = (input - mean).square().mean(dims)
        mean = mean.flatten()
    return mean, var, count


def channels_innermost(input: Tensor) -> bool:
    """(N, C) input, or (N, C, *) laid out channels_last: C varies fastest in memory."""
    if input.dim() == 2:
        return True
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim())
    return layout is not None and input.is_contiguous(memory_format=layout)


@torch.library.custom_op("fsyncbn::channel_moments", mutates_args=())
def _native_channel_moments(input: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance per channel from torch's kernel, opaque to torch.compile."""
    return torch.batch_norm_update_stats(input, None, None, 0.0)


@_native_channel_moments.register_fake
def _(input: Tensor) -> tuple[Tensor, Tensor]:
    return input.new_empty(input.shape[1]), input.new_empty(input.shape[1])


def pack_moments(mean: Tensor, var: Tensor, count: int) -> Tensor:
    """The float64 message ``[1, C, C*C, n, n*m, M2 + n*m^2]`` of one participant."""
    channels = mean.shape[0]
    mean64 = mean.to(torch.float64)
    header_values = (1.0, channels, channels * channels, count)
    if mean.device.type == "cpu" and not torch.compiler.is_compiling():
        header = [torch.tensor(header_values, dtype=torch.float64)]
    else:
        # Filled on the device, not copied from host memory: a host-to-device copy would
        # synchronise and cannot be captured in a CUDA graph.
        header = [
            torch.full((1,), value, dtype=torch.float64, device=mean.device)
            for value in header_values
        ]
    # M2 + n*m^2 = n * (var + m^2), all in float64.
    second = torch.addcmul(var.to(torch.float64), mean64, mean64).mul_(count)
    return torch.cat([*header, mean64 * count, second])


def check_header(fn: str, total: Tensor, input: Tensor, training: bool) -> Tensor | float:
    """Raise if the participants disagree on C, or if training sees one value per channel.

    Eager CPU tensors are read on the host (a clear ValueError in every participant). Under
    torch.compile or on an accelerator a host read would break the graph or stall the
    stream, so the check becomes an asynchronous device assert instead.

    Returns:
        The global count of values per channel: a Python number where the header was read
        on the host, else a 0-dim tensor.
    """
    channels = input.shape[1]
    if total.device.type == "cpu" and not torch.compiler.is_compiling():
        w, c1, c2, n = total[:HEADER_SIZE].tolist()
        if c1 != w * channels or c2 != w * channels * channels:
            raise ValueError(
                f"{fn}: participants disagree on the number of channels: this one has "
                f"{channels} (input shape {shape_str(input.shape)}), the {w:g} participants "
                f"average {c1 / w:g}"
            )
        if training and n == 1:
            raise ValueError(
                f"{fn}: expected more than 1 value per channel when training, got 1 over all "
                f"{w:g} participants (input shape here {shape_str(input.shape)})"
            )
        return n
    participants, sum_c, sum_c2, count = total[0], total[1], total[2], total[3]
    same_channels = (sum_c == participants * channels) & (
        sum_c2 == participants * channels * channels
    )
    torch._assert_async(same_channels, f"{fn}: participants disagree on the number of channels")
    if training:
        torch._assert_async(
            count != 1, f"{fn}: expected more than 1 value per channel when training"
        )
    return count


def merge_moments(total: Tensor, count: Tensor | float, dtype: torch.dtype) -> GlobalMoments:
    """Global mean and variances from the summed message (float64 math, ``dtype`` results).

    ``count`` is the global count :func:`check_header` returned.
    """
    sum_weighted_mean, sum_second = total[HEADER_SIZE:].chunk(2)
    if isinstance(count, Tensor):
        divisor, divisor_unbiased = count.clamp(min=1), (count - 1).clamp(min=1)
    else:
        divisor, divisor_unbiased = max(count, 1.0), max(count - 1.0, 1.0)
    mean = sum_weighted_mean / divisor
    m2 = (sum_second - sum_weighted_mean * mean).clamp_(min=0)
    var = m2 / divisor
    var_unbiased = m2 / divisor_unbiased
    return GlobalMoments(mean.to(dtype), var.to(dtype), var_unbiased.to(dtype), count)


def global_moments(
    fn: str, input: Tensor, reducer: Callable[[Tensor], Tensor], training: bool
) -> GlobalMoments:
    """Moments of the batch spread over all participants: one call of ``reducer``, O(C)."""
    mean, var, count = local_moments(input.detach())
    message = pack_moments(mean, var, count)
    total = reducer(message)
    if not isinstance(total, torch.Tensor) or total.shape != message.shape:
        got = shape_str(total.shape) if isinstance(total, torch.Tensor) else type(total).__name__
        raise ValueError(
            f"{fn}: the reducer must return a tensor shaped like its argument "
            f"{shape_str(message.shape)}, got {got}"
        )
    global_count = check_header(fn, total, input, training)
    return merge_moments(total, global_count, stats_dtype(input))
