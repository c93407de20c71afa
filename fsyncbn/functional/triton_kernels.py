"""Triton kernels of the fused synchronised path (part of the kernels room; see :mod:`.fused`).

The batch is viewed as ``(N, C, S)`` with strides ``(s_n, s_c, s_s)``, which covers contiguous
``(N, C, *)`` input (``s_s = 1``) and channels-last input (``s_c = 1``). ``C_INNER`` picks the
tile orientation so that loads run along the contiguous axis.

Importing this module needs Triton. The kernels run on CUDA tensors, and on CPU tensors under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI checks them without a GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

HEADER = 4  # [participants, C, C*C, count]


@triton.jit
def _channel_shifted_sums(
    x_ptr, rows, S, C, s_n, s_c, s_s, c, c_mask, shift,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, C_INNER: tl.constexpr,
):
    """Per channel of the block ``c``: sum(x - shift) and sum((x - shift)^2), float32."""
    r_base = tl.arange(0, BLOCK_R)
    if C_INNER:
        acc1 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        acc2 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        for start in range(0, rows, BLOCK_R):
            r = (start + r_base).to(tl.int64)
            offs = ((r // S) * s_n + (r % S) * s_s)[:, None] + (c * s_c)[None, :]
            mask = (r < rows)[:, None] & c_mask[None, :]
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, v - shift[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        return tl.sum(acc1, axis=0), tl.sum(acc2, axis=0)
    else:
        acc1 = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        acc2 = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        for start in range(0, rows, BLOCK_R):
            r = (start + r_base).to(tl.int64)
            offs = (c * s_c)[:, None] + ((r // S) * s_n + (r % S) * s_s)[None, :]
            mask = c_mask[:, None] & (r < rows)[None, :]
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, v - shift[:, None], 0.0)
            acc1 += d
            acc2 += d * d
        return tl.sum(acc1, axis=1), tl.sum(acc2, axis=1)


@triton.jit(do_not_specialize=["rows", "S", "C", "count"])
def moments_message_kernel(
    x_ptr, msg_ptr, rows, S, C, s_n, s_c, s_s, count,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, C_INNER: tl.constexpr,
):
    """One participant's float64 message ``[1, C, C*C, n, n*m, M2 + n*m^2]`` in one pass.

    Each channel's sums are taken about its first value (a shift close to the mean keeps the
    float32 sums stable on offset data); mean and M2 are then formed in float64.
    """
    pid = tl.program_id(0)
    c = (pid * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_mask = c < C
    shift = tl.load(x_ptr + c * s_c, mask=c_mask, other=0.0).to(tl.float32)
    s1, s2 = _channel_shifted_sums(
        x_ptr, rows, S, C, s_n, s_c, s_s, c, c_mask, shift, BLOCK_R, BLOCK_C, C_INNER
    )
    n = tl.cast(count, tl.float64)
    s1 = s1.to(tl.float64)
    mean = shift.to(tl.float64) + s1 / n
    m2 = tl.maximum(s2.to(tl.float64) - s1 * (s1 / n), 0.0)
    tl.store(msg_ptr + HEADER + c, n * mean, mask=c_mask)
    tl.store(msg_ptr + HEADER + C + c, m2 + n * mean * mean, mask=c_mask)
    if pid == 0:
        channels = tl.cast(C, tl.float64)
        tl.store(msg_ptr, 1.0)
        tl.store(msg_ptr + 1, channels)
        tl.store(msg_ptr + 2, channels * channels)
        tl.store(msg_ptr + 3, n)


@triton.jit
def _global_statistics(total_ptr, C, c, c_mask, eps, CLAMP: tl.constexpr):
    """Global mean, inverse std and (clamp mode) whether the variance follows the batch."""
    n = tl.maximum(tl.load(total_ptr + 3), 1.0)
    mean = tl.load(total_ptr + HEADER + c, mask=c_mask, other=0.0) / n
    mean_square = tl.load(total_ptr + HEADER + C + c, mask=c_mask, other=0.0) / n
    var = tl.maximum(mean_square - mean * mean, 0.0)
    if CLAMP:
        follows = var >= eps
        invstd = 1.0 / tl.sqrt(tl.maximum(var, eps))
    else:
        follows = c >= 0  # every channel: the variance is the batch's
        invstd = 1.0 / tl.sqrt(var + eps)
    return mean.to(tl.float32), invstd.to(tl.float32), follows


@triton.jit(do_not_specialize=["rows", "S", "C"])
def normalize_kernel(
    x_ptr, y_ptr, total_ptr, w_ptr, b_ptr, rows, S, C, s_n, s_c, s_s, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, C_INNER: tl.constexpr,
):
    """``y = (x - mean) * invstd * w + b`` with the global statistics read from the summed
    message; ``y`` has ``x``'s strides."""
    c = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    r = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c_mask = c < C
    mean, invstd, _ = _global_statistics(total_ptr, C, c, c_mask, eps, CLAMP)
    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
    shift = -mean * scale
    if HAS_B:
        shift = shift + tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    row_offs = (r // S) * s_n + (r % S) * s_s
    if C_INNER:
        offs = row_offs[:, None] + (c * s_c)[None, :]
        mask = (r < rows)[:, None] & c_mask[None, :]
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = v * scale[None, :] + shift[None, :]
    else:
        offs = (c * s_c)[:, None] + row_offs[None, :]
        mask = c_mask[:, None] & (r < rows)[None, :]
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = v * scale[:, None] + shift[:, None]
    tl.store(y_ptr + offs, out, mask=mask)


@triton.jit(do_not_specialize=["C", "momentum"])
def finalize_kernel(
    total_ptr, mean_ptr, var_ptr, nbt_ptr, new_mean_ptr, new_var_ptr, new_nbt_ptr, ok_ptr, C,
    momentum, USE_MOMENTUM: tl.constexpr, HAS_STATE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The running statistics blended with the batch's (``new = (1 - f) * old + f * batch``, f
    the momentum or ``1 / (t + 1)``, times min(count, 1) so an all-empty batch changes
    nothing), ``num_batches_tracked + 1``, and the agreement check: every participant had C
    channels and the count is not 1. One program, so the counter is read before it is written
    (the new state may be the old one, in place)."""
    participants = tl.load(total_ptr)
    sum_c = tl.load(total_ptr + 1)
    sum_c2 = tl.load(total_ptr + 2)
    count = tl.load(total_ptr + 3)
    channels = tl.cast(C, tl.float64)
    ok = (sum_c == participants * channels) & (sum_c2 == participants * channels * channels)
    ok = ok & (count != 1.0)
    tl.store(ok_ptr, ok.to(tl.int8))
    if HAS_STATE:
        tracked = tl.load(nbt_ptr)
        if USE_MOMENTUM:
            factor = tl.cast(momentum, tl.float64)
        else:
            factor = 1.0 / (tracked + 1).to(tl.float64)
        factor = factor * tl.minimum(count, 1.0)
        n = tl.maximum(count, 1.0)
        for start in range(0, C, BLOCK_C):
            c = (start + tl.arange(0, BLOCK_C)).to(tl.int64)
            c_mask = c < C
            mean = tl.load(total_ptr + HEADER + c, mask=c_mask, other=0.0) / n
            mean_square = tl.load(total_ptr + HEADER + C + c, mask=c_mask, other=0.0) / n
            var = tl.maximum(mean_square - mean * mean, 0.0)
            var_unbiased = var * (count / tl.maximum(count - 1.0, 1.0))
            old_mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float64)
            old_var = tl.load(var_ptr + c, mask=c_mask, other=0.0).to(tl.float64)
            tl.store(new_mean_ptr + c, old_mean * (1.0 - factor) + mean * factor, mask=c_mask)
            tl.store(new_var_ptr + c, old_var * (1.0 - factor) + var_unbiased * factor, mask=c_mask)
        tl.store(new_nbt_ptr, tracked + 1)


@triton.jit(do_not_specialize=["rows", "S", "C"])
def backward_reduce_kernel(
    dy_ptr, x_ptr, total_ptr, sums_ptr, rows, S, C, s_n, s_c, s_s, d_n, d_c, d_s, eps,
    CLAMP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, C_INNER: tl.constexpr,
):
    """This participant's ``[sum dy, sum dy * xhat]`` per channel (float32, 2C numbers)."""
    c = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_mask = c < C
    mean, invstd, _ = _global_statistics(total_ptr, C, c, c_mask, eps, CLAMP)
    r_base = tl.arange(0, BLOCK_R)
    if C_INNER:
        acc_dy = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        acc_dyx = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        for start in range(0, rows, BLOCK_R):
            r = (start + r_base).to(tl.int64)
            mask = (r < rows)[:, None] & c_mask[None, :]
            x_offs = ((r // S) * s_n + (r % S) * s_s)[:, None] + (c * s_c)[None, :]
            d_offs = ((r // S) * d_n + (r % S) * d_s)[:, None] + (c * d_c)[None, :]
            x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + d_offs, mask=mask, other=0.0).to(tl.float32)
            acc_dy += dy
            acc_dyx += dy * tl.where(mask, (x - mean[None, :]) * invstd[None, :], 0.0)
        sum_dy, sum_dyx = tl.sum(acc_dy, axis=0), tl.sum(acc_dyx, axis=0)
    else:
        acc_dy = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        acc_dyx = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        for start in range(0, rows, BLOCK_R):
            r = (start + r_base).to(tl.int64)
            mask = c_mask[:, None] & (r < rows)[None, :]
            x_offs = (c * s_c)[:, None] + ((r // S) * s_n + (r % S) * s_s)[None, :]
            d_offs = (c * d_c)[:, None] + ((r // S) * d_n + (r % S) * d_s)[None, :]
            x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + d_offs, mask=mask, other=0.0).to(tl.float32)
            acc_dy += dy
            acc_dyx += dy * tl.where(mask, (x - mean[:, None]) * invstd[:, None], 0.0)
        sum_dy, sum_dyx = tl.sum(acc_dy, axis=1), tl.sum(acc_dyx, axis=1)
    tl.store(sums_ptr + c, sum_dy, mask=c_mask)
    tl.store(sums_ptr + C + c, sum_dyx, mask=c_mask)


@triton.jit(do_not_specialize=["rows", "S", "C"])
def backward_elementwise_kernel(
    dy_ptr, x_ptr, total_ptr, global_ptr, w_ptr, dx_ptr, rows, S, C, s_n, s_c, s_s,
    d_n, d_c, d_s, eps,
    HAS_W: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, C_INNER: tl.constexpr,
):
    """``dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat))`` with the global means; the xhat
    term drops where clamp mode divided by the constant sqrt(eps). ``dx`` has ``x``'s strides."""
    c = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    r = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c_mask = c < C
    mean, invstd, follows = _global_statistics(total_ptr, C, c, c_mask, eps, CLAMP)
    n = tl.maximum(tl.load(total_ptr + 3), 1.0).to(tl.float32)
    mean_dy = tl.load(global_ptr + c, mask=c_mask, other=0.0).to(tl.float32) / n
    mean_dyx = tl.load(global_ptr + C + c, mask=c_mask, other=0.0).to(tl.float32) / n
    mean_dyx = tl.where(follows, mean_dyx, 0.0)
    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
    if C_INNER:
        mask = (r < rows)[:, None] & c_mask[None, :]
        x_offs = ((r // S) * s_n + (r % S) * s_s)[:, None] + (c * s_c)[None, :]
        d_offs = ((r // S) * d_n + (r % S) * d_s)[:, None] + (c * d_c)[None, :]
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + d_offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * invstd[None, :]
        dx = scale[None, :] * (dy - mean_dy[None, :] - xhat * mean_dyx[None, :])
    else:
        mask = c_mask[:, None] & (r < rows)[None, :]
        x_offs = (c * s_c)[:, None] + ((r // S) * s_n + (r % S) * s_s)[None, :]
        d_offs = (c * d_c)[:, None] + ((r // S) * d_n + (r % S) * d_s)[None, :]
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + d_offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[:, None]) * invstd[:, None]
        dx = scale[:, None] * (dy - mean_dy[:, None] - xhat * mean_dyx[:, None])
    tl.store(dx_ptr + x_offs, dx, mask=mask)
