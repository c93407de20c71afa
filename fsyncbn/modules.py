"""The synchronized batch-norm layers: SynchronizedBatchNorm1d/2d/3d and SyncBatchNorm.

Each training forward asks :func:`fsyncbn.routing.route` for its reducer and commit policy,
runs the functional op (:func:`fsyncbn.functional.ops.run_batch_norm`) on its buffers with
that reducer, and commits the new statistics as the route says. Behaviour (numerics, checks,
empty batches, which kernels) is documented once, in :mod:`fsyncbn.functional`; the routes in
:mod:`fsyncbn.routing`; how layers name themselves in errors in :mod:`fsyncbn.layer_errors`.
In eval mode the running statistics are used and nothing is synchronised or written.
"""

# No `from __future__ import annotations`: TorchScript reads these annotations at runtime.
from collections.abc import Callable
from typing import Any, Optional, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import conversions, routing
from . import eps_mode as eps_mode_module
from .functional.checks import check_hyperparameters
from .functional.ops import run_batch_norm
from .functional.state import STATE_KEYS, State, check_num_features
from .layer_errors import explained, labelled, rank_error
from .replicas import ReplicaGroup
from .scripting import local_batch_norm

__all__ = [
    "SyncBatchNorm",
    "SynchronizedBatchNorm1d",
    "SynchronizedBatchNorm2d",
    "SynchronizedBatchNorm3d",
    "SynchronizedBatchNormBase",
]


class SynchronizedBatchNormBase(_BatchNorm):
    """Shared body of the synchronized layers; see the module docstring."""

    # TorchScript: the scripted forward is torch's local batch norm (see _torch_forward);
    # what only Python needs stays out of the script.
    eps_mode: Optional[str]  # noqa: UP045 - TorchScript reads this annotation
    __jit_unused_properties__ = ["process_group"]
    __constants__ = [*_BatchNorm.__constants__, "_dims"]
    __jit_ignored_attributes__ = [
        "_process_group_reducer", "_replica", "_staged_state", "_validated", "_recompute",
        "qualified_name",
    ]
    # Where the layer sits in its model, for errors (see fsyncbn.layer_errors); None: unknown.
    qualified_name: Optional[str] = None  # noqa: UP045 - TorchScript reads this annotation

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = True, device: Any = None,
        dtype: torch.dtype | None = None, *, bias: bool = True,
        process_group: dist.ProcessGroup | None = None, eps_mode: str | None = None,
    ) -> None:
        name = type(self).__name__
        try:
            check_num_features(name, num_features)
            check_hyperparameters(name, momentum, eps, eps_mode or "plus")
        except (TypeError, ValueError) as exc:
            raise explained(exc) from None
        extra = {"bias": bias} if conversions.TORCH_HAS_BIAS else {}
        if not bias and not conversions.TORCH_HAS_BIAS:
            raise TypeError(f"{name}: bias=False needs a torch whose BatchNorm has `bias`; upgrade "
                            "torch, or keep bias=True and freeze it: layer.bias.requires_grad_(False)")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra
        )
        self.eps_mode = eps_mode
        self._process_group_reducer = routing.process_group_reducer(name, process_group)
        self._replica: tuple[ReplicaGroup, int] | None = None
        self._staged_state: State | None = None
        self._validated: tuple[object, ...] | None = None  # the configuration the last forward checked

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The torch.distributed group this layer synchronises over (None: WORLD)."""
        return self._process_group_reducer.group

    @process_group.setter
    def process_group(self, group: dist.ProcessGroup | None) -> None:
        self._process_group_reducer = routing.process_group_reducer(type(self).__name__, group)

    def attach_replica(self, group: ReplicaGroup | None, replica: int = 0) -> None:
        """Make this layer replica ``replica`` of ``group`` (None detaches it).

        Called by the DataParallel replication callback; not needed otherwise. While
        attached, new running statistics are staged, not written: the callback commits
        them (:meth:`commit_staged_state`) once every replica's forward has succeeded.
        """
        self._replica = None if group is None else (group, replica)
        if group is not None:  # a replica's checkpoint statistics are its own, not its origin's
            self.__dict__.pop("_recompute", None)

    def commit_staged_state(self, keep: bool) -> None:
        """Write the staged running statistics into the buffers (``keep``), or drop them."""
        staged, self._staged_state = self._staged_state, None
        if keep and staged is not None:
            with torch.no_grad():
                for key in STATE_KEYS:
                    getattr(self, key).copy_(staged[key])

    # Input ranks accepted, and how errors say it (TorchScript reads no class name).
    _dims = (2, 99, "at least 2D", "SyncBatchNorm")

    def _check_input_dim(self, input: Tensor) -> None:
        if not self._dims[0] <= input.dim() <= self._dims[1]:
            raise ValueError(rank_error(self._dims[3], self._dims[2], input.dim()))

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            self._check_input_dim(input)
            return self._torch_forward(input)
        return self._forward(input)

    @torch.jit.unused
    def _forward(self, input: Tensor) -> Tensor:
        """The one path: route, then buffers -> functional op -> commit."""
        try:
            if not isinstance(input, Tensor):
                raise TypeError(f"expected input to be a torch.Tensor, got {type(input).__name__}")
            self._check_input_dim(input)
        except (TypeError, ValueError) as exc:
            raise labelled(exc, self) from None
        route = routing.route(self)
        state = self._state()
        eps_mode = self.eps_mode or eps_mode_module.get_sbn_eps_mode()
        # The argument checks depend only on this configuration: validated once, not per call.
        configuration = (
            input.dim(), input.shape[1] if input.dim() > 1 else 0, input.dtype, self.training,
            self.momentum, self.eps, eps_mode, route.reducer is None, id(self.weight), id(self.bias),
            *(id(t) for t in (state or {}).values()),
        )
        compiling = torch.compiler.is_compiling()  # checked at trace time; a cache would fail a guard
        checked = not compiling and configuration == self._validated
        if route.journal is not None:
            route.journal.layer_starts(self)
            if state is not None:
                route.journal.layer_writes(self)
        try:
            output, new_state = self._batch_norm_op(
                input, state, reducer=route.reducer, eps_mode=eps_mode, in_place=route.in_place,
                checked=checked,
            )
            if not checked and not compiling:
                self._validated = configuration
        except BaseException as exc:
            if route.journal is not None:
                route.journal.roll_back()
            named = labelled(exc, self)
            if named is exc:
                raise
            raise named from exc
        if self.training and not route.in_place and route.commit:
            self._staged_state = new_state
        if route.journal is not None:
            route.journal.layer_returns(self, output)
        return output

    @torch.jit.unused
    def _batch_norm_op(
        self, input: Tensor, state: State | None, *, reducer: Callable[[Tensor], Tensor] | None,
        eps_mode: str, in_place: bool, checked: bool,
    ) -> tuple[Tensor, State | None]:
        """The functional op of this layer (a subclass may supply another, as InPlaceABN):
        ``in_place`` writes the new statistics into ``state``, ``checked`` skips the argument
        checks of a configuration validated before."""
        return run_batch_norm(
            "batch_norm", input, state, self.weight, self.bias, training=self.training,
            momentum=self.momentum, eps=self.eps, reducer=reducer, eps_mode=eps_mode,
            in_place=in_place, checked=checked,
        )

    @torch.jit.unused
    def _state(self) -> State | None:
        """The running statistics this forward starts from, or None when it uses none."""
        if self.running_mean is None or (self.training and not self.track_running_stats):
            return None
        # A replica calling the layer again in the same forward continues from its staged
        # (not yet written) state.
        if self._staged_state is not None:
            return self._staged_state
        buffers = cast(dict[str, Tensor], self._buffers)  # statistics tracked: none is None
        return {key: buffers[key] for key in STATE_KEYS}

    def _torch_forward(self, input: Tensor) -> Tensor:
        """The forward under TorchScript: see :func:`fsyncbn.scripting.local_batch_norm`."""
        return local_batch_norm(
            input, self.running_mean, self.running_var, self.num_batches_tracked, self.weight,
            self.bias, self.training, self.track_running_stats, self.momentum, self.eps, self.eps_mode,
        )

    def extra_repr(self) -> str:
        text: str = super().extra_repr()  # type: ignore[no-untyped-call]  # untyped in torch
        if self.eps_mode is not None:
            text += f", eps_mode={self.eps_mode!r}"
        return text

    @classmethod
    def from_batchnorm(
        cls, module: _BatchNorm, process_group: dist.ProcessGroup | None = None
    ) -> "SynchronizedBatchNormBase":
        """A layer of this class holding ``module``'s very parameters, buffers and flags."""
        eps_mode = module.eps_mode if isinstance(module, SynchronizedBatchNormBase) else None
        return conversions.transfer_batch_norm(module, cls, process_group=process_group, eps_mode=eps_mode)


class SynchronizedBatchNorm1d(SynchronizedBatchNormBase):
    """nn.BatchNorm1d whose training statistics span all participants.

    Input ``(N, C)`` or ``(N, C, L)``. Arguments as nn.BatchNorm1d, plus keyword-only
    ``process_group`` (torch.distributed group, default WORLD) and ``eps_mode`` (see
    :func:`fsyncbn.functional.batch_norm`; None follows :func:`set_sbn_eps_mode`).

    Example:
        >>> import torch
        >>> bn = SynchronizedBatchNorm1d(4)
        >>> bn(torch.randn(8, 4)).shape
        torch.Size([8, 4])
    """

    _dims = (2, 3, '2D or 3D', 'SynchronizedBatchNorm1d')


class SynchronizedBatchNorm2d(SynchronizedBatchNormBase):
    """nn.BatchNorm2d whose training statistics span all participants.

    Input ``(N, C, H, W)``. Arguments as :class:`SynchronizedBatchNorm1d`.

    Example:
        >>> import torch
        >>> bn = SynchronizedBatchNorm2d(3, eps_mode="clamp")
        >>> bn(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
    """

    _dims = (4, 4, '4D', 'SynchronizedBatchNorm2d')


class SynchronizedBatchNorm3d(SynchronizedBatchNormBase):
    """nn.BatchNorm3d whose training statistics span all participants.

    Input ``(N, C, D, H, W)``. Arguments as :class:`SynchronizedBatchNorm1d`.
    """

    _dims = (5, 5, '5D', 'SynchronizedBatchNorm3d')


class SyncBatchNorm(SynchronizedBatchNormBase):
    """Drop-in for torch.nn.SyncBatchNorm: same constructor, any input rank from 2 to 5.

    Unlike torch's, it also runs on CPU (gloo), syncs DataParallel replicas, sends O(C)
    numbers per layer whatever the world size, and compiles without graph breaks.

    Example:
        >>> import torch
        >>> bn = SyncBatchNorm(3)
        >>> bn(torch.randn(4, 3, 5)).shape
        torch.Size([4, 3, 5])
    """

    def __init__(  # torch.nn.SyncBatchNorm's argument order
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None, device: Any = None,
        dtype: torch.dtype | None = None, *, bias: bool = True, eps_mode: str | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, process_group=process_group, eps_mode=eps_mode,
        )

    @classmethod
    def convert_sync_batchnorm(
        cls, module: nn.Module, process_group: dist.ProcessGroup | None = None
    ) -> nn.Module:
        """Replace every batch-norm layer in ``module`` by an fsyncbn.SyncBatchNorm.

        As torch.nn.SyncBatchNorm.convert_sync_batchnorm: parameters and buffers are
        shared with the originals; a batch-norm ``module`` itself is returned converted.
        Unlike torch's, a subclass (timm's BatchNormAct2d, which adds an activation) is left
        as it is, with a warning, since a SyncBatchNorm would not compute what it computes;
        :func:`fsyncbn.convert_model` knows timm's layers and registered ones.
        """
        return conversions.convert_sync_batchnorm(module, cls, SynchronizedBatchNormBase, process_group)


# The table of batch-norm classes (fsyncbn.conversions) learns torch's four classes here.
conversions.register_conversion(nn.BatchNorm1d, SynchronizedBatchNorm1d)
conversions.register_conversion(nn.BatchNorm2d, SynchronizedBatchNorm2d)
conversions.register_conversion(nn.BatchNorm3d, SynchronizedBatchNorm3d)
conversions.register_conversion(
    nn.SyncBatchNorm, SyncBatchNorm,
    to_plain=lambda layer: conversions.transfer_batch_norm(
        cast(SyncBatchNorm, layer), nn.SyncBatchNorm, process_group=layer.process_group),
)
conversions.register_any_rank(SyncBatchNorm)
