"""convert_model / revert_model: swap torch's batch-norm layers for fsyncbn's and back.

The swapped layer holds the very same parameter and buffer tensors (so values, dtype,
device, requires_grad and num_batches_tracked are kept), the same hyper-parameters and the
same training flag. An nn.DataParallel anywhere becomes a DataParallelWithCallback.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .deployment import revert_to_plain
from .modules import (
    SyncBatchNorm,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
    SynchronizedBatchNormBase,
    transfer_batch_norm,
)
from .parallel import DEFAULT_SYNC_TIMEOUT_S, DataParallelWithCallback

__all__ = [
    "ConversionWarning", "convert_model", "patch_sync_batchnorm", "register_conversion", "revert_model",
]

# What a registered conversion does: the layer of one class becomes its synchronized
# counterpart and back, keeping every tensor.
ToSync = Callable[[nn.Module, "dist.ProcessGroup | None"], nn.Module]
ToPlain = Callable[[nn.Module], nn.Module]


class ConversionWarning(UserWarning):
    """convert_model left batch-norm layers unsynchronized (unknown subclasses, lazy layers)."""


class _Conversion(NamedTuple):
    plain: type[nn.Module]
    sync: type[nn.Module]
    to_sync: ToSync
    to_plain: ToPlain


# Exact classes both ways: a subclass is never matched by its base's entry, since it may
# compute something else (timm's BatchNormAct2d adds an activation after the norm).
_BY_PLAIN: dict[type[nn.Module], _Conversion] = {}
_BY_SYNC: dict[type[nn.Module], _Conversion] = {}


def register_conversion(
    plain_cls: type[nn.Module],
    sync_cls: type[nn.Module],
    *,
    to_sync: ToSync | None = None,
    to_plain: ToPlain | None = None,
) -> None:
    """Teach :func:`convert_model` and :func:`revert_model` a library's batch-norm class.

    ``convert_model`` turns every layer whose class is exactly ``plain_cls`` into a
    ``sync_cls`` layer, and ``revert_model`` turns every exact ``sync_cls`` back. Register
    again to replace a conversion (the latest one wins, for both classes).

    Args:
        plain_cls: the class to convert, for example timm's ``BatchNormAct2d``.
        sync_cls: its synchronized counterpart, usually a subclass of an fsyncbn layer whose
            forward adds what ``plain_cls`` adds (see :mod:`fsyncbn.integrations.timm`).
        to_sync: ``to_sync(layer, process_group) -> synchronized layer``; by default
            ``sync_cls.from_batchnorm(layer, process_group)``, which shares the parameters
            and buffers. Sub-modules (an activation) are carried over by convert_model.
        to_plain: ``to_plain(layer) -> plain layer``; by default a ``plain_cls`` built with
            the same hyper-parameters and sharing the same tensors.

    Raises:
        TypeError: a class that is not an nn.Module subclass.

    Example:
        >>> from torch import nn
        >>> class MyBatchNorm2d(nn.BatchNorm2d): ...
        >>> class MySynchronizedBatchNorm2d(SynchronizedBatchNorm2d): ...
        >>> register_conversion(MyBatchNorm2d, MySynchronizedBatchNorm2d)
        >>> type(convert_model(nn.Sequential(MyBatchNorm2d(3)))[0]).__name__
        'MySynchronizedBatchNorm2d'
    """
    for name, cls in (("plain_cls", plain_cls), ("sync_cls", sync_cls)):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(
                f"register_conversion: expected {name} to be an nn.Module subclass, got {cls!r}"
            )
    if to_sync is None:
        if not hasattr(sync_cls, "from_batchnorm"):
            raise TypeError(
                f"register_conversion: {sync_cls.__name__} has no from_batchnorm(layer, process_group); "
                "subclass an fsyncbn layer or pass to_sync="
            )
        to_sync = sync_cls.from_batchnorm  # type: ignore[attr-defined]
    if to_plain is None:
        to_plain = functools.partial(transfer_batch_norm, cls=plain_cls)
    conversion = _Conversion(plain_cls, sync_cls, to_sync, to_plain)
    for table, key in ((_BY_PLAIN, plain_cls), (_BY_SYNC, sync_cls)):
        stale = table.pop(key, None)
        if stale is not None:  # the other direction of a replaced conversion goes too
            _BY_PLAIN.pop(stale.plain, None)
            _BY_SYNC.pop(stale.sync, None)
    _BY_PLAIN[plain_cls] = _BY_SYNC[sync_cls] = conversion


def _sync_batch_norm_to_torch(layer: nn.Module) -> nn.Module:
    return transfer_batch_norm(layer, nn.SyncBatchNorm, process_group=layer.process_group)  # type: ignore[arg-type]


register_conversion(nn.BatchNorm1d, SynchronizedBatchNorm1d)
register_conversion(nn.BatchNorm2d, SynchronizedBatchNorm2d)
register_conversion(nn.BatchNorm3d, SynchronizedBatchNorm3d)
register_conversion(nn.SyncBatchNorm, SyncBatchNorm, to_plain=_sync_batch_norm_to_torch)


def _require_module(function: str, module: object) -> None:
    """Raise a TypeError naming ``function`` unless ``module`` is an nn.Module."""
    if not isinstance(module, nn.Module):
        if isinstance(module, type):
            got = f"the class {module.__name__}"
        elif isinstance(module, str | int | float):
            got = f"{type(module).__name__} {module!r}"
        else:
            got = type(module).__name__
        raise TypeError(
            f"{function}: expected module to be a torch.nn.Module, got {got}; pass the model object "
            "itself (for example torchvision.models.resnet50()), not its name or class"
        )


def _rewrap_data_parallel(dp: nn.DataParallel, inner: nn.Module, cls: type[nn.Module]) -> Any:
    """A ``cls`` DataParallel around ``inner`` with ``dp``'s device_ids, output_device, dim.

    On a machine without GPUs nn.DataParallel keeps no device_ids, output_device or dim.
    """
    kwargs: dict[str, Any] = {}
    if dp.device_ids:
        kwargs["device_ids"] = list(dp.device_ids)
    for name in ("output_device", "dim"):
        if hasattr(dp, name):
            kwargs[name] = getattr(dp, name)
    if cls is DataParallelWithCallback:
        kwargs["sync_timeout"] = getattr(dp, "sync_timeout", DEFAULT_SYNC_TIMEOUT_S)
    wrapped = cls(inner, **kwargs)
    wrapped.train(dp.training)
    return wrapped


def convert_model(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Make ``module`` synchronise its batch norm, without changing what any layer computes.

    Layers of exactly nn.BatchNorm1d/2d/3d become SynchronizedBatchNorm1d/2d/3d,
    nn.SyncBatchNorm becomes fsyncbn.SyncBatchNorm, and classes taught with
    :func:`register_conversion` (timm's ``BatchNormAct2d`` once :mod:`fsyncbn.integrations.timm`
    is imported) become their synchronized counterparts. Any other batch-norm subclass may
    compute something else than its base, so it is left as it is, and one
    :class:`ConversionWarning` names each such class with its module path. Lazy layers not
    yet initialised are left too, with a warning: run one forward first, they then become
    nn.BatchNormXd and convert. An nn.DataParallel anywhere becomes a
    DataParallelWithCallback with the same device_ids, output_device and dim. Children are
    replaced in place; the returned module is ``module`` unless ``module`` itself was replaced.

    Args:
        module: any module.
        process_group: torch.distributed group for the converted layers (None: WORLD).

    Returns:
        The converted module.

    Raises:
        TypeError: ``module`` is not an nn.Module (a model's name or class, for example).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> type(convert_model(net)[1]).__name__
        'SynchronizedBatchNorm2d'
    """
    _require_module("convert_model", module)
    _register_loaded_libraries()
    skipped: dict[type[nn.Module], list[str]] = {}
    lazy: list[str] = []
    converted = _convert(module, process_group, "", skipped, lazy)
    if skipped:
        names = "; ".join(
            f"{cls.__module__}.{cls.__qualname__} at {_where(paths)}" for cls, paths in skipped.items()
        )
        warnings.warn(
            f"convert_model: left these batch-norm subclasses unsynchronized, since they may compute "
            f"something else than their base class: {names}. Teach fsyncbn their conversion with "
            "fsyncbn.register_conversion(cls, synchronized_cls), or import fsyncbn.integrations.timm "
            "for timm's layers", ConversionWarning, stacklevel=2,
        )
    if lazy:
        warnings.warn(
            f"convert_model: left {len(lazy)} lazy batch-norm layer(s) unsynchronized, since they are not "
            f"initialised yet ({_where(lazy)}): run one forward pass before convert_model (they then become "
            "nn.BatchNorm1d/2d/3d, which convert_model converts)", ConversionWarning, stacklevel=2,
        )
    return converted


def _register_loaded_libraries() -> None:
    """Register the conversions of the libraries already loaded (timm), so that their models
    convert without the user importing anything of fsyncbn's integrations."""
    if "timm" in sys.modules:
        from .integrations import timm  # noqa: F401 - registers on import


def _where(paths: list[str], shown: int = 3) -> str:
    names = ", ".join(repr(p or "<the model itself>") for p in paths[:shown])
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def _convert(
    module: nn.Module,
    process_group: dist.ProcessGroup | None,
    path: str,
    skipped: dict[type[nn.Module], list[str]],
    lazy: list[str],
) -> nn.Module:
    if isinstance(module, nn.DataParallel) and not isinstance(module, DataParallelWithCallback):
        inner = _convert(module.module, process_group, _join(path, "module"), skipped, lazy)
        return _rewrap_data_parallel(module, inner, DataParallelWithCallback)
    converted = module
    conversion = _BY_PLAIN.get(type(module))
    if conversion is not None:
        converted = conversion.to_sync(module, process_group)
    elif isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        lazy.append(path)
    elif isinstance(module, _BatchNorm) and type(module) not in _BY_SYNC:
        if not isinstance(module, SynchronizedBatchNormBase):
            skipped.setdefault(type(module), []).append(path)
    for name, child in module.named_children():
        converted.add_module(name, _convert(child, process_group, _join(path, name), skipped, lazy))
    return converted


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def revert_model(
    module: nn.Module,
    to_plain: bool = False,
    *,
    example_input: Any = None,
    input_dims: int | Mapping[str, int] | None = None,
) -> nn.Module:
    """Undo :func:`convert_model`: the torch classes it replaced come back (for export).

    SynchronizedBatchNorm1d/2d/3d become nn.BatchNorm1d/2d/3d, fsyncbn.SyncBatchNorm becomes
    nn.SyncBatchNorm (keeping its process_group), every class of :func:`register_conversion`
    goes back to its library's class, and DataParallelWithCallback becomes nn.DataParallel.
    Tensors are shared as in convert_model. A layer with
    ``eps_mode="clamp"`` has no torch equivalent; it is reverted with a warning.

    With ``to_plain=True`` every synchronized layer, torch's nn.SyncBatchNorm included,
    becomes nn.BatchNorm1d/2d/3d instead (for TorchScript, ONNX, inference); the dimension of
    a SyncBatchNorm comes from ``input_dims`` or a dry run on ``example_input``: see
    :func:`fsyncbn.deployment.revert_to_plain`.

    Example:
        >>> import torch, fsyncbn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.SyncBatchNorm(4))
        >>> plain = revert_model(net, to_plain=True, example_input=torch.randn(2, 3, 5, 5))
        >>> type(plain[1]).__name__
        'BatchNorm2d'
    """
    _require_module("revert_model", module)
    if to_plain:
        module = revert_to_plain(module, example_input=example_input, input_dims=input_dims)
    _register_loaded_libraries()
    if isinstance(module, DataParallelWithCallback):
        return _rewrap_data_parallel(module, revert_model(module.module), nn.DataParallel)
    reverted = module
    conversion = _BY_SYNC.get(type(module))
    if conversion is not None:
        if getattr(module, "eps_mode", None) == "clamp":
            warnings.warn(
                f"revert_model: {type(module).__name__} with eps_mode='clamp' becomes "
                f"{conversion.plain.__name__}, which normalises with sqrt(var + eps)", stacklevel=2,
            )
        reverted = conversion.to_plain(module)
    for name, child in module.named_children():
        reverted.add_module(name, revert_model(child))
    return reverted


@contextlib.contextmanager
def patch_sync_batchnorm() -> Iterator[None]:
    """Within the block, ``nn.BatchNorm1d/2d/3d`` build the synchronized layers.

    Only lookups through ``torch.nn`` at call time are affected (``nn.BatchNorm2d(...)``),
    not names imported before the block. The originals are restored even if the block
    raises.

    Example:
        >>> from torch import nn
        >>> with patch_sync_batchnorm():
        ...     layer = nn.BatchNorm2d(4)
        >>> type(layer).__name__, nn.BatchNorm2d.__name__
        ('SynchronizedBatchNorm2d', 'BatchNorm2d')
    """
    originals = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    nn.BatchNorm1d = SynchronizedBatchNorm1d  # type: ignore[misc]
    nn.BatchNorm2d = SynchronizedBatchNorm2d  # type: ignore[misc]
    nn.BatchNorm3d = SynchronizedBatchNorm3d  # type: ignore[misc]
    try:
        yield
    finally:
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d = originals  # type: ignore[misc]
