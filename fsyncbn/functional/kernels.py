"""The kernels room: every native or private torch op fsyncbn calls, its custom ops, and the
choice between eager, compiled and device-specific code.

The math files (:mod:`.moments`, :mod:`.normalize`, :mod:`.ops`) say *what* is computed; this
file says *with which kernel*. A torch upgrade means auditing this one file.

The choices, in one place:

- Eager mode calls torch's fused batch-norm kernels (statistics, inference, backward), which
  keep channels_last and beat generic reductions.
- Under torch.compile, plain ops, which Inductor fuses; except on CPU where channels vary
  fastest in memory (channels_last, ``(N, C)``), where torch's kernels run as opaque custom
  ops because Inductor's code recomputed the float64 per-channel math for every element.
- Values are read on the host only for eager CPU tensors: elsewhere a read would stall the
  stream or break the graph, so checks become asynchronous device asserts.
- The CUDA sync path (:mod:`.paths.cuda_sync`) calls torch's public sync-batch-norm kernels
  (``torch.batch_norm_elemt`` and friends) itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from . import host

# torch.ops are untyped (their calls return Any): typed here with the results of their schemas.
_native_training: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = (
    torch.ops.aten._native_batch_norm_legit_functional
)
_native_training_no_stats: Callable[..., tuple[Tensor, Tensor, Tensor]] = (
    torch.ops.aten._native_batch_norm_legit.no_stats
)
_native_inference: Callable[..., tuple[Tensor, Tensor, Tensor]] = (
    torch.ops.aten._native_batch_norm_legit_no_training
)
_native_backward: Callable[..., tuple[Tensor, Tensor, Tensor]] = torch.ops.aten.native_batch_norm_backward


# --- local training: torch's own kernel ---------------------------------------------------


def train_locally(
    input: Tensor, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float,
    *, in_place: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Training without synchronisation: torch's kernel, bit for bit nn.BatchNorm.

    Returns ``(output, new running_mean, new running_var)``. ``in_place``: the kernel updates
    ``running_mean``/``running_var`` themselves, as nn.BatchNorm does, and returns them;
    otherwise they are left untouched and new tensors come back.
    """
    if running_mean is None or running_var is None:
        return _native_training_no_stats(input, weight, bias, True, 0.0, eps)[0], None, None
    if in_place:
        output = torch.batch_norm(
            input, weight, bias, running_mean, running_var, True, momentum, eps,
            torch.backends.cudnn.enabled,
        )
        return output, running_mean, running_var
    # Autograd saves the running-stat arguments: clones keep the caller free to overwrite
    # its own tensors (as a module does with its buffers) before backward.
    output, _, _, mean, var = _native_training(
        input, weight, bias, running_mean.clone(), running_var.clone(), True, momentum, eps
    )
    return output, mean, var


# --- statistics ---------------------------------------------------------------------------


def channels_innermost(input: Tensor) -> bool:
    """(N, C) input, or (N, C, *) laid out channels_last: C varies fastest in memory."""
    if input.dim() == 2:
        return True
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim())
    return layout is not None and input.is_contiguous(memory_format=layout)


def channel_moments(input: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance per channel of a non-empty ``(N, C, *)`` batch, two passes."""
    if not torch.compiler.is_compiling():
        # torch's batch-norm statistics kernel: in eager mode far faster than a generic
        # var_mean over (N, *).
        return torch.batch_norm_update_stats(input, None, None, 0.0)
    if input.device.type == "cpu" and channels_innermost(input):
        # Inductor's CPU reductions over every dimension but the innermost are slow (about 3x
        # torch's kernel for channels_last): torch's kernel as one opaque op.
        # A custom op's call is untyped (Any): typed as the function it wraps.
        moments: tuple[Tensor, Tensor] = _opaque_channel_moments(input)
        return moments
    # Plain ops, which Inductor fuses: on CPU faster than its var_mean (Welford), and for
    # contiguous (N, C, H, W) input faster than torch's kernel.
    dims = [0, *range(2, input.dim())]
    mean = input.mean(dims, keepdim=True)
    var = (input - mean).square().mean(dims)
    return mean.flatten(), var


@torch.library.custom_op("fsyncbn::channel_moments", mutates_args=())
def _opaque_channel_moments(input: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance per channel from torch's kernel, opaque to torch.compile."""
    return torch.batch_norm_update_stats(input, None, None, 0.0)


@_opaque_channel_moments.register_fake
def _(input: Tensor) -> tuple[Tensor, Tensor]:
    return input.new_empty(input.shape[1]), input.new_empty(input.shape[1])


def empty_batch_sums(batch: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-channel sums of an empty ``(0, C, *)`` batch: zeros ``(C,)`` computed from it."""
    return batch.sum([0, *range(2, batch.dim())], dtype=dtype)


def pack(header: tuple[float, ...], parts: list[Tensor]) -> Tensor:
    """The float64 message ``[*header, *parts]`` on the parts' device."""
    device = parts[0].device
    if host.reads_on_host(parts[0]):
        head = [_host_header(header)]  # cat copies it: the cached tensor is never written
    else:
        # Filled on the device, not copied from host memory: a host-to-device copy would
        # synchronise and cannot be captured in a CUDA graph.
        head = [torch.full((1,), value, dtype=torch.float64, device=device) for value in header]
    return torch.cat([*head, *parts])


@functools.lru_cache(maxsize=256)
def _host_header(header: tuple[float, ...]) -> Tensor:
    """A CPU tensor of ``header``, made once per header (a layer sends the same one each step)."""
    return torch.tensor(header, dtype=torch.float64)


# --- normalisation ------------------------------------------------------------------------


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
        and channels_innermost(input)
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


# --- backward -----------------------------------------------------------------------------


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
