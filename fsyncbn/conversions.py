"""The one table of batch-norm classes, and how a layer becomes another class keeping its tensors.

- :func:`register_conversion` fills the table: each plain class (``nn.BatchNorm2d``, timm's
  ``BatchNormAct2d``...) with its synchronized counterpart, both ways. fsyncbn's layers
  register torch's four classes when :mod:`fsyncbn.modules` is imported, timm's when
  :mod:`fsyncbn.integrations.timm` is; a library registers its own.
- :func:`transfer_batch_norm` builds a layer of another class on the very same tensors.
- :func:`plain_batch_norm_class` answers which ``nn.BatchNormXd`` a synchronized layer
  becomes for deployment, and :func:`repeats_batch_norm` which classes compute exactly torch's
  batch norm (what ``convert_sync_batchnorm`` may replace).

:mod:`fsyncbn.convert`, :mod:`fsyncbn.deployment`, :mod:`fsyncbn.modules` and the
integrations read the table through these functions; nothing else keeps a list of classes.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .functional.state import STATE_KEYS

__all__ = [
    "Conversion", "TORCH_HAS_BIAS", "conversion_from_plain", "conversion_from_sync",
    "plain_batch_norm_class", "register_any_rank", "register_conversion", "repeats_batch_norm",
    "convert_sync_batchnorm", "takes_any_rank", "transfer_batch_norm", "warn_clamp_reverted",
]

# Older torch has no ``bias`` keyword on batch norm; offer it where the installed one does.
TORCH_HAS_BIAS = "bias" in inspect.signature(_NormBase.__init__).parameters

# torch's own batch-norm classes: what a synchronized layer computes exactly.
TORCH_BATCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
)
# The plain class a layer of any input rank becomes, by its input's rank.
PLAIN_BY_INPUT_DIM: dict[int, type[nn.Module]] = {
    2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d,
}
# Classes whose dimension is not in their name (torch's SyncBatchNorm and fsyncbn's).
_ANY_RANK: set[type[nn.Module]] = {nn.SyncBatchNorm}

# What a registered conversion does: the layer of one class becomes its synchronized
# counterpart and back, keeping every tensor.
ToSync = Callable[[nn.Module, "dist.ProcessGroup | None"], nn.Module]
ToPlain = Callable[[nn.Module], nn.Module]


class Conversion(NamedTuple):
    plain: type[nn.Module]
    sync: type[nn.Module]
    to_sync: ToSync
    to_plain: ToPlain


# Exact classes both ways: a subclass is never matched by its base's entry, since it may
# compute something else (timm's BatchNormAct2d adds an activation after the norm).
_BY_PLAIN: dict[type[nn.Module], Conversion] = {}
_BY_SYNC: dict[type[nn.Module], Conversion] = {}


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
        >>> from fsyncbn import SynchronizedBatchNorm2d, convert_model
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
        to_sync = sync_cls.from_batchnorm
    if to_plain is None:
        to_plain = functools.partial(transfer_batch_norm, cls=plain_cls)
    conversion = Conversion(plain_cls, sync_cls, to_sync, to_plain)
    for table, key in ((_BY_PLAIN, plain_cls), (_BY_SYNC, sync_cls)):
        stale = table.pop(key, None)
        if stale is not None:  # the other direction of a replaced conversion goes too
            _BY_PLAIN.pop(stale.plain, None)
            _BY_SYNC.pop(stale.sync, None)
    _BY_PLAIN[plain_cls] = _BY_SYNC[sync_cls] = conversion



def register_any_rank(cls: type[nn.Module]) -> None:
    """``cls`` takes input of any rank from 2 to 5, like nn.SyncBatchNorm: the plain class
    it becomes for deployment depends on its input (see :func:`plain_batch_norm_class`)."""
    _ANY_RANK.add(cls)


def takes_any_rank(cls: type[nn.Module]) -> bool:
    """Whether layers of exactly ``cls`` take input of any rank (see :func:`register_any_rank`)."""
    return cls in _ANY_RANK


def conversion_from_plain(cls: type[nn.Module]) -> Conversion | None:
    """The registered conversion of exactly the plain class ``cls``, or None."""
    return _BY_PLAIN.get(cls)


def conversion_from_sync(cls: type[nn.Module]) -> Conversion | None:
    """The registered conversion of exactly the synchronized class ``cls``, or None."""
    return _BY_SYNC.get(cls)


def repeats_batch_norm(cls: type[nn.Module]) -> bool:
    """Whether layers of exactly ``cls`` compute torch's batch norm: torch's four classes and
    their registered synchronized counterparts (not a subclass that adds to them)."""
    if cls in TORCH_BATCH_NORMS:
        return True
    conversion = _BY_SYNC.get(cls)
    return conversion is not None and conversion.plain in TORCH_BATCH_NORMS


def plain_batch_norm_class(layer: nn.Module, input_dim: int | None = None) -> type[nn.Module] | None:
    """The nn.BatchNormXd that ``layer`` becomes, or None if it is not a synchronized layer
    (exact classes only) or its dimension is unknown.

    Args:
        layer: any module.
        input_dim: the number of dimensions of the layer's input (2 to 5), needed for
            nn.SyncBatchNorm and fsyncbn.SyncBatchNorm.

    Example:
        >>> import fsyncbn
        >>> plain_batch_norm_class(fsyncbn.SynchronizedBatchNorm2d(3)).__name__
        'BatchNorm2d'
        >>> plain_batch_norm_class(fsyncbn.SyncBatchNorm(3), input_dim=5).__name__
        'BatchNorm3d'
    """
    if type(layer) in _ANY_RANK:
        return None if input_dim is None else PLAIN_BY_INPUT_DIM.get(input_dim)
    conversion = _BY_SYNC.get(type(layer))
    if conversion is not None and conversion.plain in PLAIN_BY_INPUT_DIM.values():
        return conversion.plain
    return None


def warn_clamp_reverted(function: str, layer: nn.Module, name: str, plain: type[nn.Module]) -> None:
    """Going back to a torch class loses eps_mode 'clamp': say so, once per layer."""
    if getattr(layer, "eps_mode", None) == "clamp":
        where = f" {name!r}" if name else ""
        warnings.warn(
            f"{function}: {type(layer).__name__}{where} with eps_mode='clamp' becomes "
            f"{plain.__name__}, which normalises with sqrt(var + eps)", stacklevel=4,
        )


_ModuleT = TypeVar("_ModuleT", bound=nn.Module)


def transfer_batch_norm(source: _BatchNorm, cls: type[_ModuleT], **kwargs: Any) -> _ModuleT:
    """Build ``cls`` from ``source``'s hyper-parameters and hand it the same tensors.

    Parameters and buffers are shared, not copied (as torch's convert_sync_batchnorm), so
    dtype, device, requires_grad and every value are kept; so are the training flag and a
    qconfig.
    """
    extra = {"bias": source.bias is not None} if TORCH_HAS_BIAS and source.affine else {}
    target = cls(
        source.num_features, source.eps, source.momentum, source.affine,
        source.track_running_stats, device="meta", **extra, **kwargs,
    )
    for name in ("weight", "bias"):
        setattr(target, name, getattr(source, name))
    for name in STATE_KEYS:
        setattr(target, name, getattr(source, name))
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target


def convert_sync_batchnorm(
    module: nn.Module, sync_cls: Any, synchronized: type[nn.Module],
    process_group: dist.ProcessGroup | None,
) -> nn.Module:
    """``SyncBatchNorm.convert_sync_batchnorm``: every layer of ``module`` that computes torch's
    batch norm (:func:`repeats_batch_norm`) becomes a ``sync_cls`` sharing its tensors; any
    other batch-norm subclass that is not ``synchronized`` already stays, with a warning."""
    converted = module
    if repeats_batch_norm(type(module)):
        converted = sync_cls.from_batchnorm(module, process_group)
    elif isinstance(module, _BatchNorm) and not isinstance(module, synchronized):
        warnings.warn(
            f"SyncBatchNorm.convert_sync_batchnorm: left {type(module).__module__}."
            f"{type(module).__qualname__} unconverted, since a subclass may compute something else "
            "than its base class; fsyncbn.convert_model converts timm's layers and those of "
            "fsyncbn.register_conversion", UserWarning, stacklevel=3,
        )
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, sync_cls, synchronized, process_group))
    return converted
