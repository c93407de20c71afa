"""The CUDA path's own kernels: the O(C) work around torch's kernels, two small Triton kernels.

- :func:`pack_message_kernel`: this participant's forward message (see :mod:`..message`) from
  its mean and biased variance, header included.
- :func:`merge_message_kernel`: from the summed message, the global mean and inverse std
  that torch's kernels take, the count they take, the agreement flag for one asynchronous
  assert, and the running statistics with ``num_batches_tracked``.

Every O(N*C*H*W) pass is torch's (see :mod:`.cuda_sync`): these only touch O(C) numbers.
Each is compiled ahead of time for sm_80 and sm_90 in the tests (Triton's interpreter accepts
code the GPU compiler rejects), with every combination of constants :mod:`.cuda_sync`
launches. Integer and float scalars are never specialised on their values, so a new shape
never compiles a new kernel. Floats that must be exact (eps, momentum) come as two float32
halves, since Triton passes Python floats as float32.

Importing this module needs Triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK_C = 256  # channels per block (the merge kernel, one program, loops over C in blocks)


@triton.jit(do_not_specialize=["count", "C"])
def pack_message_kernel(
    mean_ptr, var_ptr, msg_ptr, count, C,
    PARTICIPANTS: tl.constexpr, CHANNELS: tl.constexpr, CHANNELS_SQUARED: tl.constexpr,
    COUNT: tl.constexpr, HEADER_SIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    """``msg = [1, C, C*C, n, n*mean, n*(var + mean^2)]`` in float64 (M2 = n*var)."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    n = tl.cast(count, tl.float64)
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0).to(tl.float64)
    var = tl.load(var_ptr + c, mask=mask, other=0.0).to(tl.float64)
    tl.store(msg_ptr + HEADER_SIZE + c, n * mean, mask=mask)
    tl.store(msg_ptr + HEADER_SIZE + C + c, n * (var + mean * mean), mask=mask)
    if tl.program_id(0) == 0:
        channels = tl.cast(C, tl.float64)
        tl.store(msg_ptr + PARTICIPANTS, tl.full((), 1.0, tl.float64))
        tl.store(msg_ptr + CHANNELS, channels)
        tl.store(msg_ptr + CHANNELS_SQUARED, channels * channels)
        tl.store(msg_ptr + COUNT, n)


@triton.jit(do_not_specialize=["C", "eps_hi", "eps_lo", "momentum_hi", "momentum_lo"])
def merge_message_kernel(
    total_ptr, stats_ptr, counts_ptr,
    mean_ptr, var_ptr, tracked_ptr, new_mean_ptr, new_var_ptr, new_tracked_ptr,
    C, eps_hi, eps_lo, momentum_hi, momentum_lo,
    CHANNELS: tl.constexpr, CHANNELS_SQUARED: tl.constexpr, COUNT: tl.constexpr,
    HEADER_SIZE: tl.constexpr, HAS_STATE: tl.constexpr, USE_MOMENTUM: tl.constexpr,
    CLAMP: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: the summed message's statistics, count, agreement flag and state update.

    Writes ``stats = [mean (C), invstd (C), follows (C)]`` in the statistics dtype (``follows``:
    1 where the normalising variance is the batch's, 0 where clamp mode used eps; written in
    clamp mode only); ``counts = [low, high, ok]`` as int32, the global count split so that
    ``low + high`` reaches past 2**31 (torch's backward kernel sums them), and ``ok``: every
    participant had C channels and the count is not 1. With state: the running statistics
    blended with ``f = momentum`` (or ``1 / (t + 1)``) times ``min(count, 1)``, from the unbiased
    variance, in float64; ``t + 1`` into ``new_tracked``, which may be ``tracked`` itself: every
    thread reads ``t`` before the barrier, one writes after it.
    """
    participants = tl.load(total_ptr)
    sum_c = tl.load(total_ptr + CHANNELS)
    sum_c2 = tl.load(total_ptr + CHANNELS_SQUARED)
    count = tl.load(total_ptr + COUNT)
    channels = tl.cast(C, tl.float64)
    ok = (sum_c == participants * channels) & (sum_c2 == participants * channels * channels)
    ok = ok & (count != 1.0)
    low = tl.minimum(count, 1073741824.0)
    tl.store(counts_ptr, low.to(tl.int32))
    tl.store(counts_ptr + 1, (count - low).to(tl.int32))
    tl.store(counts_ptr + 2, ok.to(tl.int32))
    eps = tl.cast(eps_hi, tl.float64) + tl.cast(eps_lo, tl.float64)
    n = tl.maximum(count, 1.0)
    factor = 0.0
    tracked = 0
    if HAS_STATE:
        tracked = tl.load(tracked_ptr)
        if USE_MOMENTUM:
            factor = tl.cast(momentum_hi, tl.float64) + tl.cast(momentum_lo, tl.float64)
        else:
            factor = 1.0 / (tracked + 1).to(tl.float64)
        factor = factor * tl.minimum(count, 1.0)
    for start in range(0, C, BLOCK):
        c = start + tl.arange(0, BLOCK)
        mask = c < C
        mean = tl.load(total_ptr + HEADER_SIZE + c, mask=mask, other=0.0) / n
        mean_square = tl.load(total_ptr + HEADER_SIZE + C + c, mask=mask, other=0.0) / n
        var = tl.maximum(mean_square - mean * mean, 0.0)
        if CLAMP:
            invstd = 1.0 / tl.sqrt(tl.maximum(var, eps))
            follows = tl.where(var >= eps, 1.0, 0.0)
            tl.store(stats_ptr + 2 * C + c, follows.to(stats_ptr.dtype.element_ty), mask=mask)
        else:
            invstd = 1.0 / tl.sqrt(var + eps)
        tl.store(stats_ptr + c, mean.to(stats_ptr.dtype.element_ty), mask=mask)
        tl.store(stats_ptr + C + c, invstd.to(stats_ptr.dtype.element_ty), mask=mask)
        if HAS_STATE:
            var_unbiased = var * (count / tl.maximum(count - 1.0, 1.0))
            old_mean = tl.load(mean_ptr + c, mask=mask, other=0.0).to(tl.float64)
            old_var = tl.load(var_ptr + c, mask=mask, other=0.0).to(tl.float64)
            new_mean = old_mean * (1.0 - factor) + mean * factor
            new_var = old_var * (1.0 - factor) + var_unbiased * factor
            tl.store(new_mean_ptr + c, new_mean.to(new_mean_ptr.dtype.element_ty), mask=mask)
            tl.store(new_var_ptr + c, new_var.to(new_var_ptr.dtype.element_ty), mask=mask)
    if HAS_STATE:
        tl.debug_barrier()  # every thread has read t before it is overwritten in place
        tl.store(new_tracked_ptr, tracked + 1)
