"""torch's CUDA-only sync-batch-norm kernels, as reference CPU implementations for tests.

Written from their semantics in torch (aten/src/ATen/native/cuda/Normalization.cu/.cuh and
native_functions.yaml), not from their code: statistics and sums in the accumulation dtype
(float32 for float16/bfloat16/float32 input, float64 for float64), outputs in the input's
dtype and layout. Registered for the CPU dispatch key while :func:`cuda_kernels_on_cpu` is
active, so that the CUDA sync path's exact op sequence runs on CPU tensors; each call counts
as one kernel launch (see :class:`LaunchCounter`).

``batch_norm_update_stats`` has a native CPU kernel whose statistics stay in the input's dtype;
CUDA's are in the accumulation dtype, so the reference replaces it too, while active.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _dims(t: Tensor) -> list[int]:
    return [0, *range(2, t.dim())]


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (like.dim() - 2)))


def _layout(t: Tensor) -> torch.memory_format:
    """What ``suggest_memory_format`` answers: channels_last for a 4-D/5-D tensor laid out so
    (and not also contiguous), else contiguous."""
    for dim, layout in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if t.dim() == dim and t.is_contiguous(memory_format=layout) and not t.is_contiguous():
            return layout
    return torch.contiguous_format


def update_stats(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                 momentum: float) -> tuple[Tensor, Tensor]:
    """Mean and biased variance per channel, in the accumulation dtype (running stats unused
    here: fsyncbn passes None)."""
    if running_mean is not None or running_var is not None:
        raise NotImplementedError("reference batch_norm_update_stats: running stats not supported")
    x = input.to(torch.float64)
    var, mean = torch.var_mean(x, _dims(input), correction=0)
    return mean.to(_acc(input)), var.to(_acc(input))


def elemt(input: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
          invstd: Tensor, eps: float) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` (eps unused: invstd holds it)."""
    acc = _acc(input)
    if mean.dtype != acc or invstd.dtype != acc:
        raise RuntimeError("reference batch_norm_elemt: mean and invstd must be in the accumulation dtype")
    y = (input.to(acc) - _per_channel(mean, input)) * _per_channel(invstd, input)
    if weight is not None:
        y = y * _per_channel(weight.to(acc), input)
    if bias is not None:
        y = y + _per_channel(bias.to(acc), input)
    return y.to(input.dtype).contiguous(memory_format=_layout(input))


def backward_reduce(grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor,
                    weight: Tensor | None, input_g: bool, weight_g: bool, bias_g: bool,
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(sum dy, sum dy * (x - mean), grad_weight = sum dy * xhat, grad_bias = sum dy)``; the
    last two in the weight's dtype, and empty where not asked for (or without a weight)."""
    if mean.dtype != invstd.dtype:
        raise RuntimeError("mean and invstd need to have the same data types")
    acc = _acc(input)
    dy = grad_output.to(acc)
    xmu = input.to(acc) - _per_channel(mean.to(acc), input)
    sum_dy = dy.sum(_dims(input))
    sum_dy_xmu = (dy * xmu).sum(_dims(input))
    empty = mean.new_empty(0)
    wdtype = weight.dtype if weight is not None else mean.dtype
    grad_weight = (sum_dy_xmu * invstd.to(acc)).to(wdtype) if weight_g and weight is not None else empty
    grad_bias = sum_dy.to(wdtype) if bias_g and weight is not None else empty
    return (sum_dy.to(mean.dtype) if input_g else empty, sum_dy_xmu.to(mean.dtype) if input_g else empty,
            grad_weight, grad_bias)


def backward_elemt(grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor,
                   weight: Tensor | None, sum_dy: Tensor, sum_dy_xmu: Tensor, count: Tensor) -> Tensor:
    """``dx = (dy - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n) * invstd * weight``,
    ``n`` the sum of ``count`` (int32, one entry per participant in torch's use)."""
    if count.dtype != torch.int32:
        raise RuntimeError(f"reference batch_norm_backward_elemt: expected an int32 count, got {count.dtype}")
    acc = _acc(input)
    norm = 1.0 / count.to(torch.float64).sum()
    invstd_acc = invstd.to(acc)
    dy_mean = _per_channel(sum_dy.to(acc) * norm, input)
    factor = _per_channel(invstd_acc * invstd_acc * sum_dy_xmu.to(acc) * norm, input)
    scale = invstd_acc if weight is None else invstd_acc * weight.to(acc)
    dx = (grad_output.to(acc) - dy_mean - (input.to(acc) - _per_channel(mean.to(acc), input)) * factor)
    dx = dx * _per_channel(scale, input)
    return dx.to(input.dtype).contiguous(memory_format=_layout(grad_output))


REFERENCES = {
    "batch_norm_update_stats": update_stats,
    "batch_norm_elemt": elemt,
    "batch_norm_backward_reduce": backward_reduce,
    "batch_norm_backward_elemt": backward_elemt,
}


@contextlib.contextmanager
def cuda_kernels_on_cpu() -> Iterator[None]:
    """While active, torch's CUDA sync-batch-norm ops run the references on CPU tensors."""
    import warnings

    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name, fn in REFERENCES.items():
            library.impl(name, fn, "CPU")
    try:
        yield
    finally:
        library._destroy()


# Ops that never launch a kernel: views and metadata.
_NO_KERNEL = {
    "view", "_unsafe_view", "alias", "detach", "slice", "select", "unbind", "split", "chunk",
    "split_with_sizes", "as_strided", "expand", "t", "transpose", "permute", "squeeze",
    "unsqueeze", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "lift_fresh", "_local_scalar_dense", "is_same_size", "sym_size", "sym_stride", "size",
    "stride", "sym_numel", "reshape",
}


class LaunchCounter(TorchDispatchMode):
    """Counts the ops dispatched below autograd that would launch a kernel on a GPU (one each;
    views and allocations launch none), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.__name__.split(".")[0]
        if name not in _NO_KERNEL:
            self.launches.append(name)
        return func(*args, **(kwargs or {}))
