"""The forward of a scripted synchronized layer (``torch.jit.script``): nn.BatchNorm's own
computation, local.

TorchScript cannot compile the functional op (keyword-only defaults, Literal,
torch.distributed), so a scripted layer synchronises with nobody, serves eps_mode "plus"
only, and does not see set_sbn_eps_mode.
"""

# No `from __future__ import annotations`: TorchScript reads these annotations at runtime.
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

__all__ = ["local_batch_norm"]


def local_batch_norm(
    input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],  # noqa: UP045
    num_batches_tracked: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],  # noqa: UP045
    training: bool, track_running_stats: bool, momentum: Optional[float], eps: float,  # noqa: UP045
    eps_mode: Optional[str],  # noqa: UP045
) -> Tensor:
    """nn.BatchNorm's forward, updating the running statistics in place."""
    if eps_mode is not None and eps_mode == "clamp":
        raise RuntimeError("a scripted synchronized batch norm supports eps_mode 'plus' only; "
                           "set layer.eps_mode = None before torch.jit.script")
    factor = 0.0 if momentum is None else momentum
    if training and track_running_stats and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    use_batch_stats = training or (running_mean is None and running_var is None)
    track = not training or track_running_stats
    return F.batch_norm(
        input, running_mean if track else None, running_var if track else None, weight, bias,
        use_batch_stats, factor, eps,
    )
