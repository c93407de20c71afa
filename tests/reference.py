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
