"""Stateful batch-norm layers: SynchronizedBatchNorm1d/2d/3d and SyncBatchNorm.

Each forward is three steps: read the state from the buffers, call
:func:`fsyncbn.functional.batch_norm` with the reducer the context calls for, copy the
returned state into the buffers. Behaviour (numerics, checks, empty batches) is documented
once, in :mod:`fsyncbn.functional`.

Which participants a layer synchronises with, in training:

(a) inside :class:`fsyncbn.DataParallelWithCallback` (or a patched nn.DataParallel): the
    other replicas of the same forward;
(b) with torch.distributed initialised and ``process_group`` (default WORLD) of size > 1:
    the ranks of that group (DDP, torchrun, multi-node);
(c) otherwise nobody: the layer is nn.BatchNormXd, bit for bit.

In eval mode the running statistics are used and nothing is synchronised.

The buffers are written only after the synchronisation succeeded: on path (a) once every
replica's forward has; on path (b) right away, with the values from before the step kept
by a journal that restores every layer of the step if any of them fails.
"""

# No `from __future__ import annotations`: TorchScript reads these annotations at runtime.
import inspect
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from ._step_journal import StepJournal
from .functional import batch_norm
from .functional._checks import (
    EPS_MODES,
    check_arguments,
    check_hyperparameters,
    check_local_batch_size,
)
from .reducers import ProcessGroupReducer, ReplicaGroup

__all__ = [
    "SyncBatchNorm",
    "SynchronizedBatchNorm1d",
    "SynchronizedBatchNorm2d",
    "SynchronizedBatchNorm3d",
    "get_sbn_eps_mode",
    "roll_back_step",
    "set_sbn_eps_mode",
]

# Older torch has no ``bias`` keyword on batch norm; offer it where the installed one does.
_TORCH_HAS_BIAS = "bias" in inspect.signature(_NormBase.__init__).parameters

_default_eps_mode = "plus"

# Running-statistics writes of the current training step on the torch.distributed path.
_journal = StepJournal()


def set_sbn_eps_mode(mode: str) -> None:
    """Set the eps mode of every layer built without an explicit ``eps_mode``.

    As in the original Synchronized-BatchNorm-PyTorch, it takes effect at forward time.

    Args:
        mode: ``"plus"`` (``sqrt(var + eps)``, torch's, the default) or ``"clamp"``
            (``sqrt(max(var, eps))``, the original package's).

    Raises:
        ValueError: unknown mode.

    Example:
        >>> set_sbn_eps_mode("clamp"); get_sbn_eps_mode()
        'clamp'
        >>> set_sbn_eps_mode("plus")
    """
    global _default_eps_mode
    if mode not in EPS_MODES:
        raise ValueError(f"set_sbn_eps_mode: expected 'plus' or 'clamp', got {mode!r}")
    _default_eps_mode = mode


def get_sbn_eps_mode() -> str:
    """The eps mode used by layers built without an explicit ``eps_mode``."""
    return _default_eps_mode


def roll_back_step() -> None:
    """Undo the running-statistics writes of the current training step (torch.distributed path).

    fsyncbn does this by itself when a synchronized layer fails, on every rank that sees the
    failure. Call it when your own code raises in the middle of a step, so that this rank too
    keeps nothing of it. The replica path (DataParallel) never writes a failed step, and the
    local path has nothing to undo.

    Example:
        >>> roll_back_step()  # nothing to undo outside a step
    """
    _journal.roll_back()


class _SynchronizedBatchNorm(_BatchNorm):
    """Shared body of the synchronized layers; see the module docstring."""

    # TorchScript: the scripted forward is torch's local batch norm (see _torch_forward);
    # what only Python needs stays out of the script.
    eps_mode: Optional[str]  # noqa: UP045 - TorchScript reads this annotation
    __jit_unused_properties__ = ["process_group"]
    __jit_ignored_attributes__ = ["_process_group_reducer", "_replica", "_staged_state"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        process_group: dist.ProcessGroup | None = None,
        eps_mode: str | None = None,
    ) -> None:
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"{name}: expected num_features > 0, got {num_features!r}")
        check_hyperparameters(name, momentum, eps, eps_mode or "plus")
        extra = {"bias": bias} if _TORCH_HAS_BIAS else {}
        if not bias and not _TORCH_HAS_BIAS:
            raise TypeError(f"{name}: bias=False needs a torch whose BatchNorm has `bias`")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra
        )
        self.eps_mode = eps_mode
        self._process_group_reducer = ProcessGroupReducer(process_group, name=self._describe())
        self._replica: tuple[ReplicaGroup, int] | None = None
        self._staged_state: dict[str, Tensor] | None = None

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The torch.distributed group this layer synchronises over (None: WORLD)."""
        return self._process_group_reducer.group

    @process_group.setter
    def process_group(self, group: dist.ProcessGroup | None) -> None:
        self._process_group_reducer = ProcessGroupReducer(group, name=self._describe())

    def _describe(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def attach_replica(self, group: ReplicaGroup | None, replica: int = 0) -> None:
        """Make this layer replica ``replica`` of ``group`` (None detaches it).

        Called by the DataParallel replication callback; not needed otherwise. While
        attached, new running statistics are staged, not written: the callback commits
        them (:meth:`commit_staged_state`) once every replica's forward has succeeded.
        """
        self._replica = None if group is None else (group, replica)

    def commit_staged_state(self, keep: bool) -> None:
        """Write the staged running statistics into the buffers (``keep``), or drop them."""
        staged, self._staged_state = self._staged_state, None
        if keep and staged is not None:
            self._write_state(staged)

    def _write_state(self, new_state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for key, value in new_state.items():
                getattr(self, key).copy_(value)

    def _reducer(self):
        if not self.training:
            return None
        if self._replica is not None:
            group, replica = self._replica
            return group.reducer(replica)
        if dist.is_available() and dist.is_initialized():
            if dist.get_world_size(self.process_group) > 1:
                return self._process_group_reducer
        return None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if torch.jit.is_scripting():
            return self._torch_forward(input)
        return self._synchronized_forward(input)

    def _torch_forward(self, input: Tensor) -> Tensor:
        """nn.BatchNorm's own computation, without synchronisation, updating the buffers in
        place: the forward under TorchScript, and local eager training.

        TorchScript cannot compile the functional op (keyword-only defaults, Literal,
        torch.distributed), so a scripted layer is local, serves eps_mode "plus" only, and
        does not see set_sbn_eps_mode.
        """
        eps_mode = self.eps_mode
        if eps_mode is not None and eps_mode == "clamp":
            raise RuntimeError("a scripted synchronized batch norm supports eps_mode 'plus' only")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            num_batches_tracked = self.num_batches_tracked
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            input, self.running_mean if track else None, self.running_var if track else None,
            self.weight, self.bias, use_batch_stats, factor, self.eps,
        )

    @torch.jit.unused
    def _synchronized_forward(self, input: Tensor) -> Tensor:
        reducer = self._reducer()
        if reducer is None and self._trains_with_torch_kernel(input):
            return self._torch_kernel_forward(input)
        if reducer is self._process_group_reducer and not torch.compiler.is_compiling():
            return self._journaled_forward(input)
        output, new_state = self._batch_norm(input, reducer)
        if new_state is not None:
            # A DataParallel replica writes only once every replica's forward has succeeded.
            if self._replica is not None:
                self._staged_state = new_state
            else:
                self._write_state(new_state)
        return output

    @torch.jit.unused
    def _buffers_as_state(self) -> dict[str, Tensor]:
        return {
            "running_mean": self.running_mean,
            "running_var": self.running_var,
            "num_batches_tracked": self.num_batches_tracked,
        }

    @torch.jit.unused
    def _trains_with_torch_kernel(self, input: Tensor) -> bool:
        """Local eager training that torch's kernel serves exactly as the functional op would."""
        return (
            self.training and self.track_running_stats and self.running_mean is not None
            and self.momentum is not None and input.numel() > 0
            and (self.eps_mode or _default_eps_mode) == "plus"
            and not torch.compiler.is_compiling()
        )

    @torch.jit.unused
    def _torch_kernel_forward(self, input: Tensor) -> Tensor:
        """The functional op's checks, then torch's kernel updating the buffers in place, as
        nn.BatchNorm does: the same numbers as the functional local path (torch's native
        kernel too) without copying the running stats in and out."""
        check_arguments(
            "batch_norm", input, self._buffers_as_state(), self.weight, self.bias, training=True,
            momentum=self.momentum, eps=self.eps, eps_mode="plus", reducer=None,
        )
        check_local_batch_size("batch_norm", input)
        return self._torch_forward(input)

    @torch.jit.unused
    def _journaled_forward(self, input: Tensor) -> Tensor:
        """The torch.distributed path in eager mode: if this layer fails, in forward or in
        backward, every layer's writes of the current step are undone (see _step_journal)."""
        _journal.layer_starts(self)
        try:
            output, new_state = self._batch_norm(input, self._rolling_back_reducer)
            if new_state is not None:
                _journal.layer_writes(self)
                self._write_state(new_state)
        except BaseException:
            _journal.roll_back()
            raise
        _journal.layer_returns(self, output)
        return output

    @torch.jit.unused
    def _rolling_back_reducer(self, t: Tensor) -> Tensor:
        try:
            return self._process_group_reducer(t)
        except BaseException:
            _journal.roll_back()  # in backward nobody else sees the failure first
            raise

    @torch.jit.unused
    def _batch_norm(self, input: Tensor, reducer: Any) -> tuple[Tensor, dict[str, Tensor] | None]:
        """The functional op on this layer's state; the new state is returned in training."""
        use_running_stats = self.running_mean is not None and (
            not self.training or self.track_running_stats
        )
        state = None
        if use_running_stats:
            # A replica calling the layer again in the same forward continues from its
            # staged (not yet written) state.
            state = self._staged_state or self._buffers_as_state()
        output, new_state = batch_norm(
            input, state, self.weight, self.bias, training=self.training,
            momentum=self.momentum, eps=self.eps, reducer=reducer,
            eps_mode=self.eps_mode or _default_eps_mode,
        )
        return output, new_state if self.training else None

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.eps_mode is not None:
            text += f", eps_mode={self.eps_mode!r}"
        return text

    @classmethod
    def from_batchnorm(
        cls, module: _BatchNorm, process_group: dist.ProcessGroup | None = None
    ) -> "_SynchronizedBatchNorm":
        """A layer of this class holding ``module``'s very parameters, buffers and flags."""
        eps_mode = module.eps_mode if isinstance(module, _SynchronizedBatchNorm) else None
        return _transfer(module, cls, process_group=process_group, eps_mode=eps_mode)


def _transfer(source: _BatchNorm, cls: type[nn.Module], **kwargs: Any) -> nn.Module:
    """Build ``cls`` from ``source``'s hyper-parameters and hand it the same tensors.

    Parameters and buffers are shared, not copied (as torch's convert_sync_batchnorm), so
    dtype, device, requires_grad and every value are kept; so are the training flag and a
    qconfig.
    """
    extra = {"bias": source.bias is not None} if _TORCH_HAS_BIAS and source.affine else {}
    target = cls(
        source.num_features, source.eps, source.momentum, source.affine,
        source.track_running_stats, device="meta", **extra, **kwargs,
    )
    for name in ("weight", "bias"):
        setattr(target, name, getattr(source, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(target, name, getattr(source, name))
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target


class SynchronizedBatchNorm1d(_SynchronizedBatchNorm):
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

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class SynchronizedBatchNorm2d(_SynchronizedBatchNorm):
    """nn.BatchNorm2d whose training statistics span all participants.

    Input ``(N, C, H, W)``. Arguments as :class:`SynchronizedBatchNorm1d`.

    Example:
        >>> import torch
        >>> bn = SynchronizedBatchNorm2d(3, eps_mode="clamp")
        >>> bn(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class SynchronizedBatchNorm3d(_SynchronizedBatchNorm):
    """nn.BatchNorm3d whose training statistics span all participants.

    Input ``(N, C, D, H, W)``. Arguments as :class:`SynchronizedBatchNorm1d`.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


class SyncBatchNorm(_SynchronizedBatchNorm):
    """Drop-in for torch.nn.SyncBatchNorm: same constructor, any input rank from 2 to 5.

    Unlike torch's, it also runs on CPU (gloo), syncs DataParallel replicas, sends O(C)
    numbers per layer whatever the world size, and compiles without graph breaks.

    Example:
        >>> import torch
        >>> bn = SyncBatchNorm(3)
        >>> bn(torch.randn(4, 3, 5)).shape
        torch.Size([4, 3, 5])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        eps_mode: str | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, process_group=process_group, eps_mode=eps_mode,
        )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    @classmethod
    def convert_sync_batchnorm(
        cls, module: nn.Module, process_group: dist.ProcessGroup | None = None
    ) -> nn.Module:
        """Replace every batch-norm layer in ``module`` by an fsyncbn.SyncBatchNorm.

        As torch.nn.SyncBatchNorm.convert_sync_batchnorm: parameters and buffers are
        shared with the originals; a batch-norm ``module`` itself is returned converted.
        """
        converted = module
        if isinstance(module, _BatchNorm) and type(module) is not cls:
            converted = cls.from_batchnorm(module, process_group)
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted
