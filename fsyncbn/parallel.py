"""DataParallel with synchronized batch norm: after replicate, wire the replicas together.

``DataParallelWithCallback`` (an nn.DataParallel) and ``patch_replication_callback`` (for an
existing or custom DataParallel) do the same two things each forward:

1. after ``replicate``, :func:`execute_replication_callbacks` gives the k-th synchronized
   batch-norm layer of every replica one fresh :class:`~fsyncbn.replicas.ReplicaGroup`;
2. around ``parallel_apply``, each replica's forward reports when it returns or raises, so
   a replica waiting for one that will never come fails at once instead of at the timeout.

Groups live for one forward (and its backward), so an error, an eval forward or a short
last batch (fewer inputs than devices) leaves nothing behind for the next forward.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .layer_errors import layer_label, name_layers
from .modules import SynchronizedBatchNormBase
from .replicas import ReplicaGroup, ReplicaMonitor

__all__ = [
    "DEFAULT_SYNC_TIMEOUT_S",
    "DataParallelWithCallback",
    "ReplicaRun",
    "check_device_ids",
    "execute_replication_callbacks",
    "patch_replication_callback",
]

DEFAULT_SYNC_TIMEOUT_S = 60.0


class ReplicaRun:
    """The replica groups of one forward, and the wrapper that reports each replica's end."""

    def __init__(self, replicas: Sequence[nn.Module], timeout: float) -> None:
        self.replicas = list(replicas)
        for replica in self.replicas:
            name_layers(replica)  # attached: errors name each layer by its place in the model
        named = [
            [(name, m) for name, m in r.named_modules() if isinstance(m, SynchronizedBatchNormBase)]
            for r in self.replicas
        ]
        self.monitor = ReplicaMonitor(len(self.replicas))
        self.groups = [
            ReplicaGroup(len(self.replicas), layer_label(m), timeout, self.monitor)
            for _, m in named[0]
        ]
        self._layers = [[m for _, m in layers] for layers in named]
        for index, layers in enumerate(self._layers):
            for group, layer in zip(self.groups, layers, strict=True):
                layer.attach_replica(group, index)
        self._lock = threading.Lock()
        self._running = len(self.replicas)
        self._failed = False

    def run(self, index: int, *args: Any, **kwargs: Any) -> Any:
        """Run replica ``index`` on the inputs, then tell every group it has ended."""
        return self.run_with(index, self.replicas[index], *args, **kwargs)

    def run_with(self, index: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` (replica ``index`` itself, or a compiled wrapper of it) as that replica."""
        error: BaseException | None = None
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            for layer in self._layers[index]:
                layer.attach_replica(None)
            self.monitor.forward_ended(index, error)
            self._ended(error)

    def _ended(self, error: BaseException | None) -> None:
        """When the last replica's forward ends: keep the staged running statistics only if
        every forward succeeded, so a failed step leaves every buffer as it was."""
        with self._lock:
            self._running -= 1
            self._failed = self._failed or error is not None
            if self._running:
                return
        keep = not self._failed and self.monitor.failure is None
        for layers in self._layers:
            for layer in layers:
                layer.commit_staged_state(keep)

    def bind(self, index: int) -> Callable[..., Any]:
        """``run`` for one replica, in the shape parallel_apply calls: ``fn(*input, **kw)``."""
        return lambda *args, **kwargs: self.run(index, *args, **kwargs)


def execute_replication_callbacks(
    replicas: Sequence[nn.Module], timeout: float = DEFAULT_SYNC_TIMEOUT_S
) -> ReplicaRun:
    """Wire the synchronized batch-norm layers of ``replicas`` (copies of one module).

    The k-th synchronized layer of every replica (in ``named_modules`` order) joins the
    same group. Run each replica through the returned :meth:`ReplicaRun.run` (or
    :meth:`ReplicaRun.bind`) so the groups learn when a replica ends.

    Args:
        replicas: the copies, first one on the device where the sums are computed.
        timeout: seconds a replica waits for the others before raising.

    Raises:
        ValueError: the replicas do not hold the same synchronized layers.
    """
    counts = {
        sum(isinstance(m, SynchronizedBatchNormBase) for m in r.modules()) for r in replicas
    }
    if len(counts) > 1:
        raise ValueError(
            "execute_replication_callbacks: expected copies of one module, got replicas with "
            f"{sorted(counts)} synchronized batch-norm layers"
        )
    return ReplicaRun(replicas, timeout)


def check_device_ids(caller: str, device_ids: Sequence[Any] | None) -> None:
    """Refuse device lists on which synchronized replicas would run wrongly.

    nn.DataParallel accepts both of these and then misbehaves: on a machine that does not see
    the named GPUs it silently runs one copy of the module, and with a repeated device the
    replicas' backward passes share that device's one autograd thread, so they run one after
    the other and can never meet at a synchronized layer.

    Raises:
        ValueError: a device is repeated, or names a GPU this machine does not see.
    """
    if not device_ids:  # None or []: every visible device (the module itself without GPUs)
        return
    named = list(device_ids)
    indices = [_device_index(device) for device in named]
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise ValueError(
            f"{caller}: expected distinct device_ids, got {named!r} (device {repeated[0]} repeated); "
            "replicas on one device share that device's autograd thread in backward, so they would "
            "run one after the other and never meet at a synchronized batch-norm layer. Give each "
            "replica its own device, or train on one device with the whole batch"
        )
    device_type, visible = _visible_accelerators()
    if not visible:
        raise ValueError(
            f"{caller}: device_ids={named!r} names {len(named)} GPU(s), but this machine sees none "
            "(torch.cuda.is_available() is False), and DataParallel would silently run a single "
            "copy of the module on the CPU; pass device_ids=None to run on the CPU, or run where "
            "those GPUs are visible"
        )
    missing = [i for i in indices if not 0 <= i < visible]
    if missing:
        raise ValueError(
            f"{caller}: device_ids={named!r} names {device_type} device(s) {missing}, but this "
            f"machine sees {visible} (indices 0 to {visible - 1}); pass device_ids=None to use all "
            "of them, or indices below " + str(visible)
        )


def _device_index(device: Any) -> int:
    """The index a DataParallel device id names: an int, ``"cuda:1"``, a torch.device (no
    index: the current device, 0)."""
    if isinstance(device, int):
        return device
    index = torch.device(device).index
    return 0 if index is None else index


def _visible_accelerators() -> tuple[str | None, int]:
    """The accelerator type DataParallel would use, and how many of its devices are visible."""
    accelerator = getattr(torch, "accelerator", None)  # public since torch 2.6
    if accelerator is not None:
        if not accelerator.is_available():
            return None, 0
        return accelerator.current_accelerator().type, accelerator.device_count()
    return ("cuda", torch.cuda.device_count()) if torch.cuda.is_available() else (None, 0)


class _CallbackState(threading.local):
    run: ReplicaRun | None = None


# DataParallel's replicate and parallel_apply, as this module wraps them.
_Replicate = Callable[[nn.Module, Sequence[Any]], list[nn.Module]]
_ParallelApply = Callable[[Sequence[Any], Sequence[Any], Any], list[Any]]


def _replicate_then_wire(replicate: _Replicate, state: _CallbackState, timeout: float) -> _Replicate:
    def wrapped(module: nn.Module, device_ids: Sequence[Any]) -> list[nn.Module]:
        replicas = replicate(module, device_ids)
        state.run = execute_replication_callbacks(replicas, timeout)
        return replicas

    return wrapped


def _apply_with_reporting(parallel_apply: _ParallelApply, state: _CallbackState) -> _ParallelApply:
    def wrapped(replicas: Sequence[Any], inputs: Sequence[Any], kwargs: Any) -> list[Any]:
        run, state.run = state.run, None
        if run is None or list(replicas) != run.replicas:
            return parallel_apply(replicas, inputs, kwargs)
        return parallel_apply([run.bind(i) for i in range(len(replicas))], inputs, kwargs)

    return wrapped


class DataParallelWithCallback(nn.DataParallel[nn.Module]):
    """nn.DataParallel whose replicas synchronise their batch-norm statistics.

    Same arguments as nn.DataParallel, plus ``sync_timeout``: seconds a replica waits for
    the others at a batch-norm layer before every waiting replica raises
    :class:`fsyncbn.reducers.SynchronizationError` naming the layer. On a machine without
    GPUs (or with one device) DataParallel runs the module itself: nothing to synchronise.

    Raises:
        ValueError: ``device_ids`` repeats a device, or names GPUs this machine does not see
            (see :func:`check_device_ids`).

    Example:
        >>> from fsyncbn import SynchronizedBatchNorm1d
        >>> sync_bn = DataParallelWithCallback(SynchronizedBatchNorm1d(10, affine=False))
    """

    def __init__(
        self,
        module: nn.Module,
        device_ids: Sequence[Any] | None = None,
        output_device: Any = None,
        dim: int = 0,
        *,
        sync_timeout: float = DEFAULT_SYNC_TIMEOUT_S,
    ) -> None:
        check_device_ids(type(self).__name__, device_ids)
        super().__init__(module, device_ids, output_device, dim)
        self.sync_timeout = sync_timeout
        self._callback_state = _CallbackState()

    def replicate(self, module: nn.Module, device_ids: Sequence[Any]) -> list[nn.Module]:
        original = super().replicate
        return _replicate_then_wire(original, self._callback_state, self.sync_timeout)(
            module, device_ids
        )

    def parallel_apply(self, replicas: Sequence[Any], inputs: Sequence[Any], kwargs: Any) -> list[Any]:
        return _apply_with_reporting(super().parallel_apply, self._callback_state)(
            replicas, inputs, kwargs
        )


def patch_replication_callback(
    data_parallel: nn.DataParallel[nn.Module], timeout: float = DEFAULT_SYNC_TIMEOUT_S
) -> nn.DataParallel[nn.Module]:
    """Monkey-patch an nn.DataParallel (or a custom subclass) to behave as
    :class:`DataParallelWithCallback`. Returns the same object.

    Raises:
        TypeError: ``data_parallel`` is not an nn.DataParallel.
        ValueError: its ``device_ids`` repeat a device (see :func:`check_device_ids`).

    Example:
        >>> from torch import nn
        >>> from fsyncbn import SynchronizedBatchNorm1d
        >>> dp = nn.DataParallel(SynchronizedBatchNorm1d(10))
        >>> patch_replication_callback(dp) is dp
        True
    """
    if not isinstance(data_parallel, nn.DataParallel):
        raise TypeError(
            "patch_replication_callback: expected an nn.DataParallel, "
            f"got {type(data_parallel).__name__}"
        )
    check_device_ids("patch_replication_callback", data_parallel.device_ids)
    if isinstance(data_parallel, DataParallelWithCallback) or getattr(
        data_parallel, "_fsyncbn_patched", False
    ):
        return data_parallel
    state = _CallbackState()
    # The patch this function exists for: nn.Module's __setattr__ is typed for tensors and
    # modules only, and mypy forbids assigning to methods.
    data_parallel._fsyncbn_patched = True  # type: ignore[assignment]
    data_parallel.replicate = _replicate_then_wire(  # type: ignore[method-assign,assignment]
        data_parallel.replicate, state, timeout
    )
    data_parallel.parallel_apply = _apply_with_reporting(  # type: ignore[method-assign,assignment]
        data_parallel.parallel_apply, state
    )
    data_parallel.sync_timeout = timeout  # type: ignore[assignment]
    return data_parallel
