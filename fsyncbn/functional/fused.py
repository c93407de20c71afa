"""The fused synchronised path: the math of :mod:`.moments` and :mod:`.normalize` in five
Triton kernels around the two reducer calls, for eager training on CUDA.

Forward: one kernel writes this participant's message (statistics and header in one pass over
the batch), the reducer sums it, one kernel normalises with the global statistics read straight
from the summed message, and a one-program kernel blends the running statistics and checks the
header (an asynchronous device assert: no host read). Backward: one kernel for the local sums
(sum dy, sum dy * xhat), the reducer, one kernel for dx. With a process-group reducer that is
about ten kernel launches per layer step, where the composed path launches several dozen.

Only :mod:`.kernels` decides when this path runs (:func:`.kernels.runs_fused`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from . import kernels
from . import triton_kernels as tk
from .checks import values_per_channel
from .moments import check_header, reduce_message
from .state import State

_BLOCK_C_INNER = 64  # channels per tile where channels vary fastest in memory
_BLOCK_R_INNER = 32
_BLOCK_R_OUTER = 1024  # values per tile of one channel otherwise


class _Geometry:
    """``(N, C, *)`` seen as ``(rows, C)`` with strides: ``row = n * S + s``."""

    def __init__(self, t: Tensor) -> None:
        n, c = t.shape[0], t.shape[1]
        self.rows_per_sample = t.numel() // (n * c) if n * c else 0
        self.rows = n * self.rows_per_sample
        if t.dim() == 2:
            self.strides = (t.stride(0), t.stride(1), 1)
        elif t.is_contiguous():
            self.strides = (c * self.rows_per_sample, self.rows_per_sample, 1)
        else:  # channels_last (the caller made anything else contiguous)
            self.strides = (c * self.rows_per_sample, 1, c)
        self.channels_inner = self.strides[1] == 1
        self.block_c = _BLOCK_C_INNER if self.channels_inner else 1
        self.block_r = _BLOCK_R_INNER if self.channels_inner else _BLOCK_R_OUTER

    def reduction_grid(self, channels: int) -> tuple[int]:
        return (triton_cdiv(channels, self.block_c),)

    def elementwise_grid(self, channels: int) -> tuple[int, int]:
        return (triton_cdiv(channels, self.block_c), triton_cdiv(self.rows, self.block_r))

    def args(self) -> tuple[int, ...]:
        return (self.rows, self.rows_per_sample)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dense(t: Tensor) -> Tensor:
    """``t`` if its spatial dims flatten to one stride (contiguous or channels_last), else a
    contiguous copy."""
    if t.dim() == 2 or t.is_contiguous():
        return t
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if layout is not None and t.is_contiguous(memory_format=layout):
        return t
    return t.contiguous()


def train_synchronized(
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
    """Synchronised training of a non-empty float16/bfloat16/float32 batch; as
    :func:`.ops.run_batch_norm` (same arguments, same results up to rounding)."""
    x = dense(input)
    geometry = _Geometry(x)
    channels = x.shape[1]
    message = torch.empty(tk.HEADER + 2 * channels, dtype=torch.float64, device=x.device)
    tk.moments_message_kernel[geometry.reduction_grid(channels)](
        x, message, *geometry.args(), channels, *geometry.strides, values_per_channel(x),
        BLOCK_R=geometry.block_r, BLOCK_C=geometry.block_c, C_INNER=geometry.channels_inner,
    )
    total = reduce_message(fn, message, reducer)
    if kernels.reads_on_host(total):
        check_header(fn, total, input, True)  # a clear error where the host may read
    output = FusedSyncNormalize.apply(x, weight, bias, total, eps, eps_mode == "clamp", reducer)
    return output, _finalize(fn, total, state, momentum, channels, in_place)


def _finalize(
    fn: str, total: Tensor, state: Mapping[str, Tensor] | None, momentum: float | None,
    channels: int, in_place: bool,
) -> State | None:
    ok = torch.empty((), dtype=torch.bool, device=total.device)
    if state is None:
        old = new = (total, total, total)
    else:
        old = (state["running_mean"], state["running_var"], state["num_batches_tracked"])
        new = old if in_place else tuple(torch.empty_like(t) for t in old)
    tk.finalize_kernel[(1,)](
        total, *old, *new, ok, channels, 0.0 if momentum is None else float(momentum),
        USE_MOMENTUM=momentum is not None, HAS_STATE=state is not None, BLOCK_C=256,
    )
    if not kernels.reads_on_host(total):
        kernels.assert_on_device(
            ok, f"{fn}: participants disagree on the number of channels, or training sees 1 "
            "value per channel over all participants"
        )
    if state is None:
        return None
    if in_place:
        return dict(state)
    return dict(zip(("running_mean", "running_var", "num_batches_tracked"), new, strict=True))


class FusedSyncNormalize(torch.autograd.Function):
    """``normalize(x)`` with the statistics of the summed message; backward sums the
    per-channel terms over the participants (see :class:`.normalize.SyncNormalize`)."""

    @staticmethod
    def forward(
        input: Tensor, weight: Tensor | None, bias: Tensor | None, total: Tensor, eps: float,
        clamp: bool, reducer: Callable[[Tensor], Tensor],
    ) -> Tensor:
        geometry = _Geometry(input)
        output = torch.empty_like(input)
        tk.normalize_kernel[geometry.elementwise_grid(input.shape[1])](
            input, output, total, input if weight is None else weight,
            input if bias is None else bias, *geometry.args(), input.shape[1], *geometry.strides,
            eps, HAS_W=weight is not None, HAS_B=bias is not None, CLAMP=clamp,
            BLOCK_R=geometry.block_r, BLOCK_C=geometry.block_c, C_INNER=geometry.channels_inner,
        )
        return output

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        input, weight, bias, total, eps, clamp, reducer = inputs
        ctx.eps, ctx.clamp, ctx.reducer = eps, clamp, reducer
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, weight, total)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        input, weight, total = ctx.saved_tensors
        channels = input.shape[1]
        geometry = _Geometry(input)
        dy = dense(grad_output)
        dy_strides = _Geometry(dy).strides
        local_sums = torch.empty(2 * channels, dtype=torch.float32, device=input.device)
        tk.backward_reduce_kernel[geometry.reduction_grid(channels)](
            dy, input, total, local_sums, *geometry.args(), channels, *geometry.strides,
            *dy_strides, ctx.eps, CLAMP=ctx.clamp, BLOCK_R=geometry.block_r,
            BLOCK_C=geometry.block_c, C_INNER=geometry.channels_inner,
        )
        # Every participant calls the reducer here: skipping it would leave the others waiting.
        global_sums = ctx.reducer(local_sums)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.empty_like(input)
            tk.backward_elementwise_kernel[geometry.elementwise_grid(channels)](
                dy, input, total, global_sums, input if weight is None else weight, grad_input,
                *geometry.args(), channels, *geometry.strides, *dy_strides, ctx.eps,
                HAS_W=weight is not None, CLAMP=ctx.clamp, BLOCK_R=geometry.block_r,
                BLOCK_C=geometry.block_c, C_INNER=geometry.channels_inner,
            )
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = local_sums[channels:].to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = local_sums[:channels].to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


FusedSyncNormalize.forward.__signature__ = inspect.signature(FusedSyncNormalize.forward)
