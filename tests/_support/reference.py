"""Independent references: torch's own batch norm on the whole batch, and float64 formulas."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def informative_grad(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 1234) -> Tensor:
    """A random upstream gradient: ``(y * g).sum()`` has a non-trivial input gradient through
    batch norm, where ``y.sum()`` gives ~0."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def torch_batch_norm(
    x: Tensor,
    state: dict[str, Tensor] | None,
    weight: Tensor | None,
    bias: Tensor | None,
    grad_output: Tensor,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
):
    """F.batch_norm the way nn.BatchNorm calls it: output, (dx, dw, db), new state."""
    x = x.detach().clone().requires_grad_()
    w = None if weight is None else weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    new_state = None
    rm = rv = None
    factor = momentum
    if state is not None:
        new_state = {k: v.clone() for k, v in state.items()}
        rm, rv = new_state["running_mean"], new_state["running_var"]
        if training:
            new_state["num_batches_tracked"] += 1
            if momentum is None:
                factor = 1.0 / float(new_state["num_batches_tracked"])
    y = F.batch_norm(x, rm, rv, w, b, training or state is None, factor or 0.0, eps)
    return y.detach(), input_grads(y, grad_output, x, w, b), new_state


def input_grads(y: Tensor, grad_output: Tensor, x: Tensor, w: Tensor | None, b: Tensor | None):
    """(dx, dw, db) of ``(y * grad_output).sum()``; None for an absent weight or bias."""
    inputs = [t for t in (x, w, b) if t is not None]
    grads = list(torch.autograd.grad((y * grad_output).sum(), inputs))
    dx = grads.pop(0)
    dw = grads.pop(0) if w is not None else None
    db = grads.pop(0) if b is not None else None
    return dx, dw, db


def float64_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, biased and unbiased variance of ``x`` (N, C, *) in float64."""
    x64 = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
    mean = x64.mean(1)
    centered = x64 - mean[:, None]
    n = x64.shape[1]
    m2 = (centered * centered).sum(1)
    return mean, m2 / n, m2 / (n - 1)


def float64_training_batch_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, *, eps: float, eps_mode: str
) -> Tensor:
    """Training batch norm written out in differentiable float64 ops on the whole batch:
    ``(x - mean) / sqrt(var + eps)`` ("plus") or ``/ sqrt(max(var, eps))`` ("clamp", the original
    Synchronized-BatchNorm-PyTorch, whose gradient flows through the clamp)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    denom = torch.sqrt(var + eps) if eps_mode == "plus" else torch.sqrt(var.clamp(min=eps))
    y = (x - mean) / denom
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def nearly_constant_channel(shape: tuple[int, ...], channel: int = 1, seed: int = 3) -> Tensor:
    """float64 data in which ``channel`` is 1 + 1e-4 * noise: its variance (~1e-8) is far below
    a typical eps, so eps_mode "clamp" normalises it by the constant sqrt(eps)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x[:, channel] = 1 + 1e-4 * x[:, channel]
    return x
