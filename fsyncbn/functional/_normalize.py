"""Normalisation with given global statistics, and its synchronised backward.

Forward is torch's own batch-norm kernel in inference form, fed the global mean and
variance, so the elementwise pass is native speed and keeps channels_last. Backward is
written by hand: one native pass gives the local per-channel sums (sum dy, sum dy * xhat),
one call of the reducer turns them into global sums (O(C) numbers), and two elementwise
passes give dx. Only the input and O(C) statistics are saved, as nn.BatchNorm does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import values_per_channel
from ._moments import channels_innermost, stats_dtype

_native_inference = torch.ops.aten._native_batch_norm_legit_no_training
_native_backward = torch.ops.aten.native_batch_norm_backward


def normalization_terms(var: Tensor, eps: float, eps_mode: str) -> tuple[Tensor, float]:
    """(variance, eps) such that ``1 / sqrt(variance + eps)`` is the wanted inverse std.

    ``"plus"``: sqrt(var + eps), as torch. ``"clamp"``: sqrt(max(var, eps)), as the original
    Synchronized-BatchNorm-PyTorch.
    """
    if eps_mode == "clamp":
        return var.clamp(min=eps), 0.0
    return var, eps


def normalize(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
    eps: float, *, statistics_in_graph: bool = False,
) -> Tensor:
    """``(input - mean) / sqrt(var + eps) * weight + bias`` per channel, with torch's kernel.

    ``statistics_in_graph``: ``mean`` and ``var`` are computed in the same compiled graph
    (not buffers). Then, on CPU with the channels varying fastest in memory, the kernel is
    called as an opaque op, because Inductor would recompute the statistics (in float64)
    for every element of the output: measured 2-3x slower than torch's kernel.
    """
    dtype = stats_dtype(input)
    if input.numel() == 0:
        # The native backward crashes (SIGFPE) on empty input; plain ops give the same
        # empty output and zero parameter gradients.
        scale = torch.rsqrt(var.to(dtype) + eps)
        if weight is not None:
            scale = scale * weight.to(dtype)
        shift = -mean.to(dtype) * scale
        if bias is not None:
            shift = shift + bias.to(dtype)
        out = input.to(dtype) * _per_channel(scale, input) + _per_channel(shift, input)
        return out.to(input.dtype)
    # Reduced-precision input runs in the kernel's mixed mode: float32 parameters.
    weight = None if weight is None else weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    mean, var = mean.to(dtype), var.to(dtype)
    if (
        statistics_in_graph and torch.compiler.is_compiling() and input.device.type == "cpu"
        and channels_innermost(input)
    ):
        return _opaque_inference(input, weight, bias, mean, var, eps)
    return _native_inference(input, weight, bias, mean, var, 0.0, eps)[0]


@torch.library.custom_op("fsyncbn::batch_norm_inference", mutates_args=())
def _opaque_inference(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
    eps: float,
) -> Tensor:
    """torch's inference batch-norm kernel, opaque to torch.compile."""
    return _native_inference(input, weight, bias, mean, var, 0.0, eps)[0]


@_opaque_inference.register_fake
def _(input, weight, bias, mean, var, eps):  # noqa: ANN001, ANN202 - mirrors the op
    return torch.empty_like(input)


def _normalized_affine(
    input: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, invstd: Tensor,
    eps: float,
) -> Tensor:
    """``(input - mean) * invstd * weight + bias`` per channel, in ``weight``'s dtype, in one
    pass: torch's inference batch-norm kernel (``invstd = 1 / sqrt(var + eps)``).

    Plain ops under torch.compile (Inductor fuses them) and for float16/bfloat16 input,
    whose native result would be rounded to the input dtype.
    """
    if torch.compiler.is_compiling() or input.dtype != weight.dtype:
        slope = invstd * weight
        offset = bias - mean * slope
        return torch.addcmul(_per_channel(offset, input), input, _per_channel(slope, input))
    return _native_inference(input, weight, bias, mean, var, 0.0, eps)[0]


def _per_channel(t: Tensor, input: Tensor) -> Tensor:
    """View a (C,) tensor so it broadcasts against ``input`` of shape (N, C, *)."""
    return t.view(1, -1, *([1] * (input.dim() - 2)))


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
        count: Tensor | float,
        reducer: Callable[[Tensor], Tensor],
    ) -> Tensor:
        return normalize(input, weight, bias, mean, var, eps, statistics_in_graph=True)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        input, weight, bias, mean, var, eps, count, reducer = inputs
        ctx.eps = eps
        ctx.reducer = reducer
        ctx.bias_dtype = None if bias is None else bias.dtype
        # The global count is a tensor, or a Python number where it was read on the host.
        if isinstance(count, Tensor):
            ctx.save_for_backward(input, weight, mean, var, count)
        else:
            ctx.host_count = count
            ctx.save_for_backward(input, weight, mean, var)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        input, weight, mean, var, *saved_count = ctx.saved_tensors
        count = saved_count[0] if saved_count else ctx.host_count
        dtype = stats_dtype(input)
        channels = input.shape[1]
        invstd = torch.rsqrt(var + ctx.eps)
        if values_per_channel(input) == 0:
            local_sums = torch.zeros(2 * channels, dtype=dtype, device=input.device)
        else:
            # The native backward, fed the global mean and inverse std as the saved batch
            # statistics and asked for no input gradient, yields exactly the two local sums
            # (grad_weight = sum dy * xhat, grad_bias = sum dy) in one pass. The weight does
            # not enter these sums, but CUDA's kernel requires one.
            native_weight = (
                torch.ones(channels, dtype=dtype, device=input.device)
                if weight is None
                else weight.to(dtype)
            )
            _, sum_dy_xhat, sum_dy = _native_backward(
                grad_output, input, native_weight, None, None, mean, invstd, True, ctx.eps,
                [False, True, True],
            )
            local_sums = torch.cat([sum_dy.to(dtype), sum_dy_xhat.to(dtype)])
        # Every participant calls the reducer here, also with an empty batch: skipping it
        # would leave the others waiting.
        global_sums = ctx.reducer(local_sums)
        local_sum_dy, local_sum_dy_xhat = local_sums.chunk(2)

        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            scale = invstd if weight is None else invstd * weight.to(dtype)
            # dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)), with the global means,
            #    = dy * scale + (xhat * w + b),  w = -scale * mean(dy * xhat), b = -scale * mean(dy):
            # two passes over the batch, the second one torch's inference batch-norm kernel.
            if isinstance(count, Tensor):
                minus_scale_over_n = -scale / count.to(dtype).clamp(min=1)
            else:
                minus_scale_over_n = scale * (-1.0 / max(count, 1.0))
            b, w = (global_sums.reshape(2, channels) * minus_scale_over_n).unbind()
            grad_input = _normalized_affine(input, w, b, mean, var, invstd, ctx.eps)
            grad_input = grad_input.addcmul_(grad_output, _per_channel(scale, input))
            grad_input = grad_input.to(input.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = local_sum_dy_xhat.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = local_sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


# torch's Function.apply binds the arguments to forward's signature on every call; a
# signature stored on the function (PEP 362) spares it rebuilding one each time.
SyncNormalize.forward.__signature__ = inspect.signature(SyncNormalize.forward)
