"""Normalisation with given global statistics, and its synchronised backward.

Forward normalises with the global mean and variance in one elementwise pass. Backward is
written by hand: one pass gives the local per-channel sums (sum dy, sum dy * xhat), one call
of the reducer turns them into global sums (O(C) numbers), and two elementwise passes give
dx. Only the input and O(C) statistics are saved, as nn.BatchNorm does.

This room also chooses the kernel of each of those passes (eager, compiled, layout, dtype),
so that a path enters it once with the batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .host import (
    as_dtype,
    at_least,
    channels_innermost,
    empty_batch_sums,
    in_dtype,
    stats_dtype,
    values_per_channel,
)

# torch.ops are untyped (their calls return Any): typed here with the results of their schemas.
_native_inference: Callable[..., tuple[Tensor, Tensor, Tensor]] = (
    torch.ops.aten._native_batch_norm_legit_no_training
)
_native_backward: Callable[..., tuple[Tensor, Tensor, Tensor]] = torch.ops.aten.native_batch_norm_backward


class NormalizationTerms(NamedTuple):
    """``1 / sqrt(var + eps)`` is the inverse std a channel is normalised with."""

    var: Tensor  # (C,)
    eps: float
    # (C,) 1 where the normalising variance is the batch's, 0 where eps_mode "clamp" replaced
    # it by the constant eps (its gradient is then zero); None: the batch's everywhere.
    var_follows_batch: Tensor | None


def normalization_terms(var: Tensor, eps: float, eps_mode: str) -> NormalizationTerms:
    """The variance and eps to normalise with.

    ``"plus"``: sqrt(var + eps), as torch. ``"clamp"``: sqrt(max(var, eps)), as the original
    Synchronized-BatchNorm-PyTorch; a channel whose variance is below eps is then divided by
    the constant sqrt(eps).
    """
    if eps_mode == "clamp":
        return NormalizationTerms(var.clamp(min=eps), 0.0, (var >= eps).to(var.dtype))
    return NormalizationTerms(var, eps, None)


def normalize(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
    eps: float, *, statistics_in_graph: bool = False,
) -> Tensor:
    """``(input - mean) / sqrt(var + eps) * weight + bias`` per channel, in the input's dtype
    and memory format (see :func:`normalize_inference` for ``statistics_in_graph``).
    """
    dtype = stats_dtype(input.dtype)
    weight, bias = (in_dtype(t, dtype) for t in (weight, bias))
    mean, var = in_dtype(mean, dtype), in_dtype(var, dtype)
    if input.numel() == 0:
        # The native backward crashes (SIGFPE) on empty input; plain ops give the same
        # empty output and zero parameter gradients.
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias
        return scale_shift(input.to(dtype), scale, shift).to(input.dtype)
    # Reduced-precision input runs in the kernel's mixed mode: float32 parameters.
    return normalize_inference(
        input, weight, bias, mean, var, eps, statistics_in_graph=statistics_in_graph
    )


class SyncNormalize(torch.autograd.Function):
    """y = normalize(x) with global statistics; backward sums the per-channel terms globally.

    The statistics are constants to autograd here: their dependence on every participant's
    input is accounted for in backward by the global sums, which is what makes one reducer
    call enough.
    """

    @staticmethod
    def forward(
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        var: Tensor,
        eps: float,
        var_follows_batch: Tensor | None,
        count: Tensor | float,
        reducer: Callable[[Tensor], Tensor],
    ) -> Tensor:
        return normalize(input, weight, bias, mean, var, eps, statistics_in_graph=True)

    # setup_context (not forward(ctx, ...)): torch.func transforms need it.
    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        input, weight, bias, mean, var, eps, var_follows_batch, count, reducer = inputs
        ctx.eps = eps
        ctx.reducer = reducer
        ctx.bias_dtype = None if bias is None else bias.dtype
        # The global count is a tensor, or a Python number where it was read on the host.
        ctx.host_count = None if isinstance(count, Tensor) else count
        saved = [input, weight, mean, var, var_follows_batch]
        if ctx.host_count is None:
            saved.append(count)
        ctx.save_for_backward(*saved)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, weight, mean, var, var_follows_batch, *saved_count = ctx.saved_tensors
        count = ctx.host_count if ctx.host_count is not None else saved_count[0]
        dtype = stats_dtype(input.dtype)
        invstd = torch.rsqrt(var + ctx.eps)
        if values_per_channel(input.shape) == 0:
            # Zeros computed from grad_output, so that a compiled backward keeps this collective
            # in the backward (a constant would be hoisted into the forward graph).
            zeros = empty_batch_sums(grad_output, dtype)
            local_sum_dy = local_sum_dy_xhat = zeros
            local_sums = torch.cat([zeros, zeros])
        else:
            local_sum_dy, local_sum_dy_xhat = backward_sums(
                grad_output, input, None if weight is None else weight.to(dtype), mean, invstd,
                ctx.eps,
            )
            local_sums = backward_message(local_sum_dy.to(dtype), local_sum_dy_xhat.to(dtype), invstd)
        # Every participant calls the reducer here, also with an empty batch: skipping it
        # would leave the others waiting.
        global_sums = ctx.reducer(local_sums)

        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            scale = invstd if weight is None else invstd * weight.to(dtype)
            # Two passes over the batch, the first one torch's inference batch-norm kernel.
            w, b = input_gradient_terms(global_sums, scale, invstd, var_follows_batch, count)
            grad_input = normalized_affine(input, w, b, mean, var, invstd, ctx.eps)
            grad_input = grad_input.addcmul_(grad_output, per_channel(scale, input))
            grad_input = grad_input.to(input.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = local_sum_dy_xhat.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = local_sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def backward_message(sum_dy: Tensor, sum_dy_xhat: Tensor, invstd: Tensor) -> Tensor:
    """The wire format's backward message (see :mod:`.message`) from the local sums:
    ``[sum dy, sum dy * (x - mean)]``."""
    return torch.cat([sum_dy, sum_dy_xhat / invstd])


def input_gradient_terms(
    global_sums: Tensor, scale: Tensor, invstd: Tensor, var_follows_batch: Tensor | None,
    count: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """``(w, b)`` per channel with ``dx = dy * scale + xhat * w + b``, from the summed backward
    message (``scale``: d output / d input at fixed statistics, ``count``: the global count).

    dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)) with the global means, so
    ``w = -scale * mean(dy * xhat)`` and ``b = -scale * mean(dy)``, where
    ``mean(dy * xhat) = invstd * mean(dy * (x - mean))``. Where eps_mode "clamp" normalised by
    the constant sqrt(eps), the variance does not depend on x and the xhat term drops out.
    """
    minus_scale_over_n = scale / -at_least(as_dtype(count, scale.dtype), 1.0)
    coefficients = global_sums.reshape(2, -1) * minus_scale_over_n
    coefficients[1].mul_(invstd if var_follows_batch is None else invstd * var_follows_batch)
    b, w = coefficients.unbind()
    return w, b


# torch's Function.apply binds the arguments to forward's signature on every call; a
# signature stored on the function (PEP 362) spares it rebuilding one each time.
SyncNormalize.forward.__signature__ = inspect.signature(  # type: ignore[attr-defined]  # not in typeshed
    SyncNormalize.forward
)


# --- the kernel of each pass ------------------------------------------------------------


def normalize_inference(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
    eps: float, *, statistics_in_graph: bool = False,
) -> Tensor:
    """``(input - mean) / sqrt(var + eps) * weight + bias`` per channel: torch's inference
    kernel, which keeps channels_last. Parameters and statistics in the statistics dtype.

    ``statistics_in_graph``: ``mean`` and ``var`` are computed in the same compiled graph (not
    buffers). Then, on CPU with channels innermost, the kernel runs as an opaque op, because
    Inductor would recompute the statistics (in float64) for every output element: measured
    2-3x slower than torch's kernel.
    """
    if (
        statistics_in_graph and torch.compiler.is_compiling() and input.device.type == "cpu"
        and channels_innermost(input.shape, input.stride())
    ):
        output: Tensor = _opaque_inference(input, weight, bias, mean, var, eps)
        return output
    return _native_inference(input, weight, bias, mean, var, 0.0, eps)[0]


@torch.library.custom_op("fsyncbn::batch_norm_inference", mutates_args=())
def _opaque_inference(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
    eps: float,
) -> Tensor:
    """torch's inference batch-norm kernel, opaque to torch.compile."""
    return _native_inference(input, weight, bias, mean, var, 0.0, eps)[0]


@_opaque_inference.register_fake
def _(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
    eps: float,
) -> Tensor:
    return torch.empty_like(input)


def per_channel(t: Tensor, input: Tensor) -> Tensor:
    """View a (C,) tensor so it broadcasts against ``input`` of shape (N, C, *)."""
    return t.view(1, -1, *([1] * (input.dim() - 2)))


def scale_shift(input: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``input * scale + shift`` per channel in plain ops (any size, empty included)."""
    return torch.addcmul(per_channel(shift, input), input, per_channel(scale, input))


def backward_sums(
    grad_output: Tensor, input: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``(sum dy, sum dy * xhat)`` per channel of a non-empty batch, in one pass.

    torch's backward kernel, fed the global mean and inverse std as the saved batch statistics
    and asked for no input gradient, yields exactly these sums (grad_bias, grad_weight). The
    weight does not enter them, but CUDA's kernel requires one.
    """
    if weight is None:
        weight = torch.ones_like(mean)
    _, sum_dy_xhat, sum_dy = _native_backward(
        grad_output, input, weight, None, None, mean, invstd, True, eps, [False, True, True]
    )
    return sum_dy, sum_dy_xhat


def normalized_affine(
    input: Tensor, slope_weight: Tensor, offset: Tensor, mean: Tensor, var: Tensor,
    invstd: Tensor, eps: float,
) -> Tensor:
    """``(input - mean) * invstd * slope_weight + offset`` per channel, in ``slope_weight``'s
    dtype, in one pass: torch's inference kernel (``invstd = 1 / sqrt(var + eps)``).

    Plain ops under torch.compile (Inductor fuses them) and for float16/bfloat16 input, whose
    native result would be rounded to the input dtype.
    """
    if torch.compiler.is_compiling() or input.dtype != slope_weight.dtype:
        slope = invstd * slope_weight
        return scale_shift(input, slope, offset - mean * slope)
    return _native_inference(input, slope_weight, offset, mean, var, 0.0, eps)[0]
