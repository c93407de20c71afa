"""InPlaceABN: synchronized batch norm + activation that keeps one tensor for backward.

The layer is :class:`fsyncbn.modules.SynchronizedBatchNormBase` (every route: local,
DataParallel replicas, torch.distributed, Join, checkpoint replay) whose op is
:func:`fsyncbn.functional.batch_norm_act`. Numerics, and exactly how it differs from batch
norm + activation, are documented once in :mod:`fsyncbn.functional.activated`.
"""

# No `from __future__ import annotations`: TorchScript reads these annotations at runtime.
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .functional.activated import check_activation, run_batch_norm_act
from .functional.state import State
from .modules import SynchronizedBatchNormBase

__all__ = ["InPlaceABN"]


class InPlaceABN(SynchronizedBatchNormBase):
    """In-place activated synchronized batch norm: ``act(BN(x))`` written into ``x`` in training.

    Batch norm + activation usually keep two full-size tensors for backward (the norm's input,
    the activation's output); this layer keeps one, the output, and recovers the rest in
    backward (see :func:`fsyncbn.functional.batch_norm_act`). Statistics are synchronised as
    in :class:`fsyncbn.SyncBatchNorm`; any input rank from 2 on.

    In training with ``in_place=True`` the input is overwritten (autograd knows: a later use
    of it in backward raises instead of computing garbage); give it a fresh tensor, such as a
    convolution's output. Eval mode returns a new tensor. ``in_place=False`` is batch norm
    followed by the activation, the exact baseline (ReLU allowed).

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group: as
            :class:`fsyncbn.SyncBatchNorm`. ``eps`` is also the floor of ``|weight|`` in place.
        activation: ``"leaky_relu"`` (default), ``"elu"``, ``"identity"``; ``"relu"`` only with
            ``in_place=False``.
        activation_param: the LeakyReLU slope (default 0.01) or the ELU alpha, > 0 in place.
        in_place: write the output into the input in training.
        device, dtype, bias, eps_mode: as :class:`fsyncbn.SyncBatchNorm`.

    Raises:
        ValueError: ``activation="relu"`` with ``in_place=True`` (use leaky_relu with a small
            slope, or in_place=False), an unknown activation, a slope or alpha <= 0 in place.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> block = nn.Sequential(nn.Conv2d(3, 8, 3), InPlaceABN(8, activation="leaky_relu"))
        >>> block(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 8, 6, 6])
    """

    __jit_ignored_attributes__ = [*SynchronizedBatchNormBase.__jit_ignored_attributes__, "_fold_origin"]

    _dims = (2, 99, "at least 2D", "InPlaceABN")  # any rank from 2, as SyncBatchNorm

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,  # noqa: UP045 - TorchScript reads annotations
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[dist.ProcessGroup] = None,  # noqa: UP045
        *,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        in_place: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,  # noqa: UP045
        bias: bool = True,
        eps_mode: Optional[str] = None,  # noqa: UP045
    ) -> None:
        check_activation(type(self).__name__, activation, activation_param, in_place)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, process_group=process_group, eps_mode=eps_mode,
        )
        self.activation = activation
        self.activation_param = float(activation_param)
        self.in_place = in_place
        # Set by convert_model(fuse_activations=True): what revert_model restores.
        # A fsyncbn.convert.FoldOrigin (not imported: convert imports this module).
        self._fold_origin: Optional[Any] = None  # noqa: UP045

    @torch.jit.unused
    def _batch_norm_op(
        self, input: Tensor, state: Optional[State], *,  # noqa: UP045
        reducer: Optional[Callable[[Tensor], Tensor]], eps_mode: str, in_place: bool,  # noqa: UP045
        checked: bool,
    ) -> tuple[Tensor, Optional[State]]:  # noqa: UP045
        return run_batch_norm_act(
            "batch_norm_act", input, state, self.weight, self.bias, training=self.training,
            momentum=self.momentum, eps=self.eps, reducer=reducer, eps_mode=eps_mode,
            activation=self.activation, activation_param=self.activation_param,
            in_place=self.in_place, state_in_place=in_place, checked=checked,
        )

    def _torch_forward(self, input: Tensor) -> Tensor:
        raise RuntimeError(
            "InPlaceABN cannot be scripted with TorchScript; fsyncbn.revert_model gives back the "
            "batch norm and activation that convert_model(fuse_activations=True) folded"
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, activation={self.activation!r}, "
            f"activation_param={self.activation_param}, in_place={self.in_place}"
        )
