"""In-place activated batch norm (InPlace-ABN): ``act(BN(x))`` that keeps one tensor for backward.

Batch norm followed by an activation normally keeps two full-size tensors for backward: the
norm's input and the activation's output. In training with ``in_place=True``,
:func:`batch_norm_act` writes ``z = act(BN(x))`` into ``x``'s own storage and keeps only
``z`` (plus O(C) statistics). Backward recovers the pre-activation ``y = act^-1(z)`` and the
normalised input ``xhat = (y - beta) / gamma`` from ``z``, then runs the same synchronised
backward as :func:`.ops.sync_batch_norm`: the same 2C sums through the same reducer (after
Rota Bulò et al., arXiv 1712.02616, and mapillary/inplace_abn).

Backward allocates one full-size tensor for float32/float64 input, the input gradient (for
float16/bfloat16 input it is computed in float32 and cast: two): ``dy`` is written into it, and
``y`` is recovered slice by slice of the batch into a small reused buffer (for the sums, then
again for dx), so that the layer's backward is not the peak of a training step. ``z`` and the
incoming gradient are never written: the caller may still hold them, and a second backward
(``retain_graph=True``) reads ``z`` again.

How the in-place op differs from ``act(batch_norm(x))``, exactly:

- **The weight is kept away from zero** (the affine must be invertible): the op computes with
  ``gamma_eff = gamma`` where ``|gamma| >= eps``, and ``sign(gamma) * eps`` where ``|gamma| <
  eps`` (``+eps`` for ``gamma == 0``), ``eps`` being the op's ``eps``. Outputs and input
  gradients are those of ``act(batch_norm(x, weight=gamma_eff))``; ``gamma``'s gradient is
  batch norm's ``sum(dy * xhat)`` everywhere (straight through the clamp, so that a channel
  can leave the dead zone). Weights with ``|gamma| >= eps`` therefore give batch norm + the
  activation up to rounding. (mapillary/inplace_abn uses ``|gamma| + eps`` instead, which
  flips negative weights: load its checkpoints with ``weight.abs_().add_(eps)``.)
- **Precision**: ``xhat`` is recovered by a division, so its absolute error is about
  ``ulp(|y| + |beta|) / |gamma_eff|`` (float32: ~1e-7 relative for ``|gamma| ~ 1``, more for
  small weights). ELU saturates: below ``y ~ log(eps_dtype)`` (about -16 in float32, -36 in
  float64, in units of the pre-activation) ``exp(y) - 1`` rounds to -1 and ``y`` is recovered
  as that floor; the activation's gradient there is ~0 anyway.
- **ReLU is not invertible**; ``activation="relu"`` needs ``in_place=False``. LeakyReLU's
  slope and ELU's alpha must be > 0 in place.
- **The input is overwritten** (training, ``in_place=True``): autograd knows (the input is
  marked dirty), so a later use of the old value in backward raises autograd's "modified by
  an inplace operation" error instead of computing garbage. The input may not be a leaf that
  requires grad (pass ``x.clone()``), nor a view from torch.split/chunk.

Eval mode never writes in place: it returns a new tensor, ``act(BN(x))`` with the running
statistics and ``gamma_eff``, so that inference code that reuses its input (test-time
augmentation, feature extraction) sees no surprise. In inference nothing is saved for
backward, so writing in place would save no activation memory.

``in_place=False`` is ``act(batch_norm(x))`` with the exact ``gamma`` through the ordinary op
(:func:`.ops.batch_norm`: the native, fused and compiled paths), the activation applied in
place to the norm's fresh output: the baseline and the fallback, with ReLU allowed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_arguments
from .host import empty_batch_sums, participation, stats_dtype, values_per_channel
from .moments import global_moments
from .normalize import (
    backward_message,
    backward_sums,
    input_gradient_terms,
    normalization_terms,
    normalized_affine,
    per_channel,
)
from .ops import EpsMode, run_batch_norm
from .reducer import LOCAL_REDUCER, Reducer
from .state import State, commit

Activation = Literal["leaky_relu", "elu", "identity", "relu"]
ACTIVATIONS = ("leaky_relu", "elu", "identity", "relu")


def check_activation(fn: str, activation: object, activation_param: object, in_place: object) -> None:
    """Raise unless the activation can run in this mode (ReLU and slope 0 cannot invert).

    Raises:
        TypeError: ``in_place`` not a bool, ``activation_param`` not a real number.
        ValueError: unknown activation; ``"relu"`` with ``in_place=True``; a LeakyReLU slope
            or ELU alpha that is not > 0 with ``in_place=True``.
    """
    if not isinstance(in_place, bool):
        raise TypeError(f"{fn}: expected in_place to be a bool, got {in_place!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{fn}: expected activation 'leaky_relu', 'elu', 'identity' or 'relu', got {activation!r}"
        )
    if isinstance(activation_param, bool) or not isinstance(activation_param, Real):
        raise TypeError(f"{fn}: expected activation_param to be a float, got {activation_param!r}")
    if not in_place:
        return
    if activation == "relu":
        raise ValueError(
            f"{fn}: activation='relu' cannot run with in_place=True, since ReLU is not invertible "
            "(backward recovers the normalised input from the output); use activation='leaky_relu' "
            "with a small slope (activation_param=0.01), or in_place=False"
        )
    if activation in ("leaky_relu", "elu") and not float(activation_param) > 0.0:
        name = "slope" if activation == "leaky_relu" else "alpha"
        raise ValueError(
            f"{fn}: expected activation_param (the {activation} {name}) > 0 with in_place=True, "
            f"got {activation_param!r}: the activation must be invertible; use a small positive "
            "value (0.01), or in_place=False"
        )


def effective_weight(weight: Tensor, eps: float) -> Tensor:
    """``weight`` where ``|weight| >= eps``, else ``sign(weight) * eps`` (``+eps`` at 0): the
    invertible weight the in-place op computes with. Its gradient passes straight through."""
    with torch.no_grad():
        clamped = _clamp_magnitude(weight, eps)
    # weight - weight is exactly 0 and carries weight's gradient: clamped's value, bit for bit.
    return clamped + (weight - weight.detach())


def _clamp_magnitude(weight: Tensor, eps: float) -> Tensor:
    # sign * eps computed in weight's dtype (a torch.where of Python floats would round eps to
    # the default dtype).
    floor = (weight < 0).to(weight.dtype).mul(-2.0).add(1.0).mul(eps)
    return torch.where(weight.abs() >= eps, weight, floor)


def activate(t: Tensor, activation: str, param: float, *, in_place: bool) -> Tensor:
    """``act(t)``; ``in_place``: written into ``t`` (which must be fresh, or saved by nobody)."""
    if activation == "identity":
        return t
    if activation == "relu":
        return F.relu(t, inplace=in_place)
    if activation == "leaky_relu":
        # In place only with slope >= 0: autograd's in-place backward reads the output's sign.
        return F.leaky_relu(t, float(param), inplace=in_place and param >= 0)
    return F.elu(t, float(param), inplace=in_place and param >= 0)


def _unit_statistics(like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean 0 and variance 1 per channel (and the empty outputs the kernel asks for): torch's
    inference kernel with these computes ``x * weight + bias``."""
    zeros = torch.zeros_like(like)
    return zeros, torch.ones_like(like), zeros.new_empty(0), zeros.new_empty(0)


def _scale_shift_(
    input: Tensor, scale: Tensor, shift: Tensor,
    unit: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """``input = input * scale + shift`` per channel, in ``input``'s storage (``unit``: the
    :func:`_unit_statistics` of ``scale``, made once by a caller that loops)."""
    if (
        not torch.compiler.is_compiling() and input.numel() > 0
        and scale.dtype in (input.dtype, stats_dtype(input.dtype))
    ):
        # torch's inference kernel, written over its input (an element-wise map, alias-safe):
        # one vectorised pass, measured 3x faster on CPU than addcmul with two per-channel
        # operands, and 1.5x faster than mul_ then add_. float16/bfloat16 input runs in its
        # mixed mode (float32 parameters): computed in float32, rounded once.
        zeros, ones, save_mean, save_invstd = unit or _unit_statistics(scale)
        torch.ops.aten.native_batch_norm.out(
            input, scale, shift, zeros, ones, False, 0.0, 0.0,
            out=input, save_mean=save_mean, save_invstd=save_invstd,
        )
        return input
    scale, shift = per_channel(scale, input), per_channel(shift, input)
    return input.mul_(scale).add_(shift)


# Backward works on slices of the batch (dim 0) of about this many bytes, so that its
# temporaries (the pre-activation) stay small: one full-size buffer, the input gradient, is
# all it allocates. Chosen from the shape alone.
_CHUNK_BYTES = 1 << 20


def _batch_slices(t: Tensor) -> list[slice]:
    """Slices of dim 0 of about _CHUNK_BYTES each (one slice under torch.compile, which
    fuses the element-wise work itself)."""
    n = t.shape[0]
    if torch.compiler.is_compiling() or n <= 1:
        return [slice(0, n)]
    # The temporaries are in the statistics dtype (float32 for float16/bfloat16 input).
    per_row = max(1, (t.numel() // n) * stats_dtype(t.dtype).itemsize)
    rows = max(1, _CHUNK_BYTES // per_row)
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def _pre_activation(z: Tensor, activation: str, param: float, out: Tensor | None) -> Tensor:
    """``act^-1(z)`` (LeakyReLU or ELU), into ``out`` where given (LeakyReLU)."""
    if activation == "leaky_relu":
        # act^-1 is the LeakyReLU of slope 1 / slope.
        if out is None:
            return F.leaky_relu(z, 1.0 / param)
        return cast(Tensor, torch.ops.aten.leaky_relu.out(z, 1.0 / param, out=out))
    # ELU: z = alpha * (exp(y) - 1) for y <= 0, so y = log1p(z / alpha); clamped where
    # exp(y) - 1 rounded to -1 (saturation), to stay finite.
    floor = -1.0 + torch.finfo(z.dtype).eps
    return torch.where(z > 0, z, torch.log1p((z / param).clamp(min=floor)))


def _activation_grad(dz: Tensor, z: Tensor, activation: str, param: float, out: Tensor | None) -> Tensor:
    """``dL/dy`` from ``dL/dz`` and the output ``z`` (LeakyReLU or ELU), into ``out`` if given."""
    if activation == "leaky_relu":
        # act' reads the (sign-preserving) output.
        if out is None:
            return cast(Tensor, torch.ops.aten.leaky_relu_backward(dz, z, param, True))
        return cast(Tensor, torch.ops.aten.leaky_relu_backward.grad_input(dz, z, param, True, grad_input=out))
    if out is None:
        return cast(Tensor, torch.ops.aten.elu_backward(dz, param, 1, 1, True, z))
    return cast(Tensor, torch.ops.aten.elu_backward.grad_input(dz, param, 1, 1, True, z, grad_input=out))


class InPlaceABN(torch.autograd.Function):
    """``z = act(normalize(x))`` written into ``x``; backward from ``z`` and O(C) statistics.

    As :class:`.normalize.SyncNormalize`, the statistics are constants to autograd: their
    dependence on every participant's input is accounted for by the global sums in backward.
    ``reducer`` None: one participant.
    """

    @staticmethod
    def forward(
        ctx: Any, input: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
        eps: float, var_follows_batch: Tensor | None, count: Tensor | float,
        reducer: Callable[[Tensor], Tensor] | None, activation: str, param: float,
        weight_floor: float,
    ) -> Tensor:
        dtype = stats_dtype(input.dtype)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * _clamp_magnitude(weight.to(dtype), weight_floor)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(dtype)
        _scale_shift_(input, scale, shift)
        activate(input, activation, param, in_place=True)
        ctx.mark_dirty(input)
        ctx.eps, ctx.reducer, ctx.activation, ctx.param = eps, reducer, activation, param
        ctx.weight_floor = weight_floor
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.host_count = None if isinstance(count, Tensor) else count
        saved = [input, weight, bias, mean, var, var_follows_batch]
        if ctx.host_count is None:
            saved.append(cast(Tensor, count))  # not a host count: a tensor
        ctx.save_for_backward(*saved)
        return input

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        output, weight, bias, mean, var, var_follows_batch, *saved_count = ctx.saved_tensors
        count = ctx.host_count if ctx.host_count is not None else saved_count[0]
        dtype = stats_dtype(output.dtype)
        gamma = (torch.ones_like(mean) if weight is None
                 else _clamp_magnitude(weight.to(dtype), ctx.weight_floor))
        beta = torch.zeros_like(mean) if bias is None else bias.to(dtype)
        invstd = torch.rsqrt(var + ctx.eps)
        grad_input, sum_dy, sum_dy_xhat = _synchronized_backward(
            ctx, grad_output, output, gamma, beta, invstd, var_follows_batch, count, dtype,
        )
        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None


def _synchronized_backward(
    ctx: Any, grad_output: Tensor, output: Tensor, gamma: Tensor, beta: Tensor, invstd: Tensor,
    var_follows_batch: Tensor | None, count: Tensor | float, dtype: torch.dtype,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """The synchronised backward of :class:`.normalize.SyncNormalize`, from the output ``z``:
    local ``(sum dy, sum dy * xhat)``, one reducer call (the local reducer for one
    participant), then dx.

    With ``y = act^-1(z)``, ``xhat = (y - beta) / gamma`` and ``dy = act'(y) * dz``, dx is
    ``scale * dy + w * xhat + b`` per channel. For LeakyReLU and ELU, ``dy`` is written
    straight into the input gradient's buffer, and ``y`` is recomputed slice by slice of the
    batch (once for the sums, once for dx): the only full-size allocation is dx itself, where
    recovering ``y`` and ``dy`` whole would hold two more (the peak of a training step).
    """
    scale = invstd * gamma  # d y / d x at fixed statistics
    needs_input = ctx.needs_input_grad[0]
    empty = values_per_channel(output.shape) == 0
    same_dtype = output.dtype == dtype and grad_output.dtype == dtype
    identity = ctx.activation == "identity"
    dy_buffer = None
    if empty:
        # Zeros computed from grad_output, so that a compiled backward keeps the collective
        # in the backward graph (as SyncNormalize).
        zeros = empty_batch_sums(grad_output, dtype)
        local_sum_dy = local_sum_dy_xhat = zeros
    else:
        # torch's backward kernel with "mean" beta and "invstd" 1 / gamma: its sum of
        # dy * (y - beta) / gamma is sum dy * xhat (its weight, given gamma, does not enter it).
        inverse_gamma = gamma.reciprocal()
        if identity:
            z = output if output.dtype == dtype else output.to(dtype)
            dz = grad_output if grad_output.dtype == dtype else grad_output.to(dtype)
            sums = [backward_sums(dz, z, gamma, beta, inverse_gamma, 0.0)]
        else:
            if needs_input:
                dy_buffer = torch.empty_like(output, dtype=dtype)
            slices = _batch_slices(output)
            scratch = _scratch(output, slices[0], dtype, ctx.activation)
            sums = []
            for rows in slices:
                z, dz = output[rows], grad_output[rows]
                if not same_dtype:
                    z, dz = z.to(dtype), dz.to(dtype)
                out = None if dy_buffer is None else dy_buffer[rows]
                dy = _activation_grad(dz, z, ctx.activation, ctx.param, out)
                y = _pre_activation(z, ctx.activation, ctx.param, _rows_of(scratch, z))
                sums.append(backward_sums(dy, y, gamma, beta, inverse_gamma, 0.0))
                # Freed before the next slice's are made: at most one slice's temporaries.
                del z, dz, dy, y
        local_sum_dy = _total([s[0] for s in sums], dtype)
        local_sum_dy_xhat = _total([s[1] for s in sums], dtype)
    local_sums = backward_message(local_sum_dy, local_sum_dy_xhat, invstd)
    # Every participant calls the reducer, also with an empty batch.
    global_sums = (ctx.reducer or LOCAL_REDUCER)(local_sums)
    if not needs_input:
        return None, local_sum_dy, local_sum_dy_xhat
    if empty:
        return torch.zeros_like(grad_output), local_sum_dy, local_sum_dy_xhat
    # As SyncNormalize: dx = dy * scale + xhat * w + b, with xhat = (y - beta) / gamma.
    w, b = input_gradient_terms(global_sums, scale, invstd, var_follows_batch, count)
    slope = w / gamma
    if identity:
        ones = torch.ones_like(gamma)
        grad_input = normalized_affine(z, slope, b, beta, ones, ones, 0.0)
        grad_input = grad_input.addcmul_(dz, per_channel(scale, grad_input))
    else:
        grad_input = cast(Tensor, dy_buffer)
        shift = b - beta * slope
        unit = _unit_statistics(slope)
        for rows in slices:
            z = output[rows] if same_dtype else output[rows].to(dtype)
            part = grad_input[rows]
            # w * xhat + b, in the pre-activation's own (temporary) storage, then + scale * dy.
            y = _pre_activation(z, ctx.activation, ctx.param, _rows_of(scratch, z))
            affine = _scale_shift_(y, slope, shift, unit)
            if torch.compiler.is_compiling():
                part.mul_(per_channel(scale, part)).add_(affine)
            else:
                # One pass: TensorIterator allows an output that is exactly one of the inputs.
                torch.addcmul(affine, part, per_channel(scale, part), out=part)
            del z, part, y, affine
    return grad_input.to(grad_output.dtype), local_sum_dy, local_sum_dy_xhat


def _scratch(output: Tensor, rows: slice, dtype: torch.dtype, activation: str) -> Tensor | None:
    """One slice's buffer for the pre-activation, reused by every slice (LeakyReLU in eager
    mode: no allocation, and no fresh pages to fault in, per slice)."""
    if activation != "leaky_relu" or torch.compiler.is_compiling():
        return None
    return torch.empty_like(output[rows], dtype=dtype)


def _rows_of(scratch: Tensor | None, like: Tensor) -> Tensor | None:
    """The first rows of ``scratch`` shaped as ``like`` (a shorter last slice)."""
    return None if scratch is None else scratch[: like.shape[0]]


def _total(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
    """The sum of per-slice (C,) sums, in ``dtype``."""
    total = parts[0].to(dtype)
    for part in parts[1:]:
        total = total + part.to(dtype)
    return total


# See normalize.py; __signature__ is not in typeshed.
InPlaceABN.forward.__signature__ = inspect.signature(InPlaceABN.forward)  # type: ignore[attr-defined]


def batch_norm_act(
    input: Tensor,
    state: Mapping[str, Tensor] | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool,
    reducer: Reducer | None = None,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    eps_mode: EpsMode = "plus",
    activation: Activation = "leaky_relu",
    activation_param: float = 0.01,
    in_place: bool = True,
) -> tuple[Tensor, State | None]:
    """In-place activated batch norm: ``(act(batch_norm(x)), new_state)``, keeping one tensor.

    The batch norm is :func:`.ops.batch_norm`'s (statistics over every participant of
    ``reducer``, running statistics, eps modes, empty batches, checks); the activation follows.
    In training with ``in_place=True`` the output is written into ``input``'s storage and
    returned (the same tensor), and only it and O(C) statistics are kept for backward, which
    recovers the normalised input from it: see :mod:`fsyncbn.functional.activated` for exactly
    how this differs from batch norm + activation (the weight's magnitude is floored at
    ``eps``; ReLU cannot run in place). Communication is that of :func:`.ops.sync_batch_norm`:
    one reducer call forward (2C + 4 numbers), one backward (2C). Eval mode, and any call with
    ``in_place=False``, return a new tensor.

    Args:
        input: ``(N, C, *)``. Overwritten in training with ``in_place=True``: it must not be a
            leaf that requires grad, and its old value must not be needed later.
        state: as :func:`.ops.batch_norm`.
        weight: ``(C,)`` or None.
        bias: ``(C,)`` or None.
        training: normalise with batch statistics and update the state.
        reducer: ``reducer(t) -> element-wise sum of t over all participants``, or None.
        momentum: as :func:`.ops.batch_norm`.
        eps: added to the variance, > 0; also the floor of ``|weight|`` in place.
        eps_mode: as :func:`.ops.batch_norm`.
        activation: ``"leaky_relu"``, ``"elu"``, ``"identity"``, or ``"relu"`` (``in_place=False``
            only).
        activation_param: the LeakyReLU slope or the ELU alpha (> 0 in place).
        in_place: write the output into ``input`` in training (the memory saving).

    Returns:
        ``(output, new_state)`` as :func:`.ops.batch_norm`; ``output is input`` in training
        with ``in_place=True``.

    Raises:
        TypeError: as :func:`.ops.batch_norm`; ``in_place`` or ``activation_param`` of the
            wrong type.
        ValueError: as :func:`.ops.batch_norm`; an unknown activation; ``"relu"`` or a slope
            or alpha <= 0 with ``in_place=True``; with ``in_place=True`` in training, an input
            that is a leaf requiring grad.
        SynchronizationError: as :func:`.ops.batch_norm`.

    Example:
        >>> import torch
        >>> from fsyncbn.functional import batch_norm_act, init_state
        >>> x = torch.randn(8, 3, 4, 4)
        >>> expected = torch.nn.functional.leaky_relu(
        ...     torch.nn.functional.batch_norm(x, None, None, training=True), 0.01)
        >>> y, state = batch_norm_act(x, init_state(3), training=True)
        >>> y is x, torch.allclose(y, expected, atol=1e-5)
        (True, True)
    """
    return run_batch_norm_act(
        "batch_norm_act", input, state, weight, bias, training=training, momentum=momentum, eps=eps,
        reducer=reducer, eps_mode=eps_mode, activation=activation, activation_param=activation_param,
        in_place=in_place,
    )


def run_batch_norm_act(
    fn: str,
    input: Tensor,
    state: Mapping[str, Tensor] | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    momentum: float | None,
    eps: float,
    reducer: Reducer | None,
    eps_mode: str,
    activation: str,
    activation_param: float,
    in_place: bool,
    state_in_place: bool = False,
    checked: bool = False,
) -> tuple[Tensor, State | None]:
    """:func:`batch_norm_act` for a layer: ``state_in_place`` and ``checked`` as
    :func:`.ops.run_batch_norm`'s ``in_place`` and ``checked`` (the layer's buffers are
    written; its configuration was checked before)."""
    check_arguments(
        fn, input, state, weight, bias, training=training, momentum=momentum, eps=eps,
        eps_mode=eps_mode, reducer=reducer, configuration_checked=checked,
    )
    check_activation(fn, activation, activation_param, in_place)
    param = float(activation_param)
    if not (in_place and training):
        if in_place and weight is not None:
            weight = effective_weight(weight, float(eps))  # the same function as in training
        output, new_state = run_batch_norm(
            fn, input, state, weight, bias, training=training, momentum=momentum, eps=eps,
            reducer=reducer, eps_mode=eps_mode, in_place=state_in_place, checked=True,
            batch_checked=True,
        )
        # The norm's output is fresh and its backward does not read it: activate in place.
        return activate(output, activation, param, in_place=True), new_state
    if input.is_leaf and input.requires_grad:
        raise ValueError(
            f"{fn}: in_place=True overwrites the input, which is a leaf tensor that requires grad "
            "(autograd cannot modify it in place); pass input.clone(), or use in_place=False"
        )
    moments = global_moments(fn, input, reducer or LOCAL_REDUCER, training=True)
    terms = normalization_terms(moments.var, float(eps), eps_mode)
    output = InPlaceABN.apply(  # type: ignore[no-untyped-call]  # torch's apply
        input, weight, bias, moments.mean, terms.var, terms.eps, terms.var_follows_batch,
        moments.count, reducer, activation, param, float(eps),
    )
    if state is None:
        return output, None
    took_part = participation(moments.count, moments.mean.dtype)
    return output, commit(state, moments.mean, moments.var_unbiased, momentum, took_part, state_in_place)
