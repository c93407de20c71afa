"""Normalisation with given global statistics, and its synchronised backward.

Forward normalises with the global mean and variance in one elementwise pass. Backward is
written by hand: one pass gives the local per-channel sums (sum dy, sum dy * xhat), one call
of the reducer turns them into global sums (O(C) numbers), and two elementwise passes give
dx. Only the input and O(C) statistics are saved, as nn.BatchNorm does. The kernels for each
pass are chosen in :mod:`.kernels`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import kernels
from .checks import values_per_channel
from .host import as_dtype, at_least, in_dtype
from .moments import stats_dtype


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
    and memory format (see :func:`.kernels.normalize_inference` for ``statistics_in_graph``).
    """
    dtype = stats_dtype(input)
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
        return kernels.scale_shift(input.to(dtype), scale, shift).to(input.dtype)
    # Reduced-precision input runs in the kernel's mixed mode: float32 parameters.
    return kernels.normalize_inference(
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
        dtype = stats_dtype(input)
        channels = input.shape[1]
        invstd = torch.rsqrt(var + ctx.eps)
        if values_per_channel(input) == 0:
            # Zeros computed from grad_output, so that a compiled backward keeps this collective
            # in the backward (a constant would be hoisted into the forward graph).
            zeros = kernels.empty_batch_sums(grad_output, dtype)
            local_sum_dy = local_sum_dy_xhat = zeros
            local_sums = torch.cat([zeros, zeros])
        else:
            local_sum_dy, local_sum_dy_xhat = kernels.backward_sums(
                grad_output, input, None if weight is None else weight.to(dtype), mean, invstd,
                ctx.eps,
            )
            # The wire format's backward message (see ..message): sum dy * (x - mean).
            local_sums = torch.cat([local_sum_dy.to(dtype), local_sum_dy_xhat.to(dtype) / invstd])
        # Every participant calls the reducer here, also with an empty batch: skipping it
        # would leave the others waiting.
        global_sums = ctx.reducer(local_sums)

        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            scale = invstd if weight is None else invstd * weight.to(dtype)
            # dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)), with the global means,
            #    = dy * scale + (xhat * w + b),  w = -scale * mean(dy * xhat), b = -scale * mean(dy),
            # and mean(dy * xhat) = invstd * mean(dy * (x - mean)): two passes over the batch,
            # the second one torch's inference batch-norm kernel. Where eps_mode "clamp"
            # normalised by the constant sqrt(eps), the variance does not depend on x and the
            # xhat term drops out.
            minus_scale_over_n = scale / -at_least(as_dtype(count, dtype), 1.0)
            coefficients = global_sums.reshape(2, channels) * minus_scale_over_n
            coefficients[1].mul_(invstd if var_follows_batch is None else invstd * var_follows_batch)
            b, w = coefficients.unbind()
            grad_input = kernels.normalized_affine(input, w, b, mean, var, invstd, ctx.eps)
            grad_input = grad_input.addcmul_(grad_output, kernels.per_channel(scale, input))
            grad_input = grad_input.to(input.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = local_sum_dy_xhat.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = local_sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


# torch's Function.apply binds the arguments to forward's signature on every call; a
# signature stored on the function (PEP 362) spares it rebuilding one each time.
SyncNormalize.forward.__signature__ = inspect.signature(  # type: ignore[attr-defined]  # not in typeshed
    SyncNormalize.forward
)
