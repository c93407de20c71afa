"""timm's ``BatchNormAct2d`` and ``SyncBatchNormAct``, synchronized without losing their activation.

timm's norm + activation layers are batch-norm subclasses whose forward applies a dropout
and an activation after the norm. Swapping them for a plain synchronized layer (as
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does) silently drops both. Here they
become :class:`SynchronizedBatchNormAct2d` and :class:`SyncBatchNormAct`: fsyncbn layers
whose forward is ``act(drop(synchronized_norm(x)))``, holding the very same ``act`` and
``drop`` modules and the same tensors. :func:`fsyncbn.revert_model` gives timm's classes
back.

Importing this module registers the conversions when timm is importable (fsyncbn never
requires timm); :func:`fsyncbn.convert_model` imports it by itself once timm is loaded, so
``convert_model(timm.create_model(...))`` just works. The layer classes themselves do not
need timm, and :func:`register_norm_act` teaches fsyncbn any other class built the same way.
"""

from __future__ import annotations

import importlib
from typing import Any, cast

import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..conversions import ToPlain, ToSync, register_conversion
from ..functional.state import STATE_KEYS
from ..modules import SyncBatchNorm, SynchronizedBatchNorm2d

__all__ = ["SyncBatchNormAct", "SynchronizedBatchNormAct2d", "register_norm_act", "register_timm"]


class _ActDropMixin:
    """``act(drop(norm(x)))``, timm's order; ``act`` and ``drop`` default to identities."""

    act: nn.Module
    drop: nn.Module

    def _set_act_drop(self, act: nn.Module | None, drop: nn.Module | None) -> None:
        # drop first, as timm registers them (only the order of named_children shows it).
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        # super(): the batch-norm class this is mixed into (unknown to mypy here).
        normalized = super().forward(input)  # type: ignore[misc]
        output: Tensor = self.act(self.drop(normalized))
        return output


class SynchronizedBatchNormAct2d(_ActDropMixin, SynchronizedBatchNorm2d):
    """A synchronized ``BatchNorm2d`` followed by ``drop`` then ``act``, like timm's ``BatchNormAct2d``.

    Arguments as :class:`fsyncbn.SynchronizedBatchNorm2d`, plus keyword-only ``act`` and
    ``drop`` modules (None: identity).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> layer = SynchronizedBatchNormAct2d(3, act=nn.ReLU())
        >>> bool((layer(torch.randn(2, 3, 4, 4)) >= 0).all())
        True
    """

    def __init__(self, *args: Any, act: nn.Module | None = None, drop: nn.Module | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._set_act_drop(act, drop)


class SyncBatchNormAct(_ActDropMixin, SyncBatchNorm):
    """fsyncbn's :class:`fsyncbn.SyncBatchNorm` followed by ``drop`` then ``act``, like timm's
    ``SyncBatchNormAct``: inputs of any rank from 2 to 5.

    Arguments as :class:`fsyncbn.SyncBatchNorm`, plus keyword-only ``act`` and ``drop``.
    """

    def __init__(self, *args: Any, act: nn.Module | None = None, drop: nn.Module | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._set_act_drop(act, drop)


def _act_drop(layer: nn.Module) -> dict[str, nn.Module | None]:
    return {"act": getattr(layer, "act", None), "drop": getattr(layer, "drop", None)}


_NormActClass = type[SynchronizedBatchNormAct2d] | type[SyncBatchNormAct]


def _to_sync(sync_cls: _NormActClass) -> ToSync:
    def to_sync(layer: nn.Module, process_group: dist.ProcessGroup | None) -> nn.Module:
        # Called on layers of the registered plain class: a batch-norm subclass.
        synced = cast(SynchronizedBatchNormAct2d | SyncBatchNormAct,  # an instance of sync_cls
                      sync_cls.from_batchnorm(cast(_BatchNorm, layer), process_group))
        synced._set_act_drop(**_act_drop(layer))
        return synced

    return to_sync


def _to_plain(plain_cls: type[nn.Module]) -> ToPlain:
    def to_plain(layer: nn.Module) -> nn.Module:
        # timm's constructors take no `bias` keyword: build, then hand over every tensor.
        hyper = (layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
        try:
            plain = plain_cls(*hyper, device="meta")
        except TypeError:  # an older timm without factory keywords
            plain = plain_cls(*hyper)
        for name in ("weight", "bias", *STATE_KEYS):
            setattr(plain, name, getattr(layer, name))
        if isinstance(plain, nn.SyncBatchNorm):
            plain.process_group = layer.process_group
        for name, module in _act_drop(layer).items():
            if module is not None:
                setattr(plain, name, module)
        plain.train(layer.training)
        if hasattr(layer, "qconfig"):
            plain.qconfig = layer.qconfig
        return plain

    return to_plain


def register_norm_act(
    plain_cls: type[nn.Module], sync_cls: _NormActClass = SynchronizedBatchNormAct2d
) -> None:
    """Register a timm-style norm + activation class: a batch-norm subclass whose forward is
    ``act(drop(batch_norm(x)))`` with its ``act`` and ``drop`` as attributes, and whose
    constructor takes ``(num_features, eps, momentum, affine, track_running_stats)``.

    Args:
        plain_cls: the library's class.
        sync_cls: the fsyncbn class it becomes (:class:`SynchronizedBatchNormAct2d` or
            :class:`SyncBatchNormAct`, or a subclass of them).
    """
    register_conversion(plain_cls, sync_cls, to_sync=_to_sync(sync_cls), to_plain=_to_plain(plain_cls))


def register_timm() -> bool:
    """Register timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` if timm imports.

    Returns:
        Whether timm was found (and its classes registered).
    """
    for name in ("timm.layers.norm_act", "timm.models.layers.norm_act"):
        try:
            norm_act = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - absent, or built for another torch: timm is not usable
            continue
        register_norm_act(norm_act.BatchNormAct2d, SynchronizedBatchNormAct2d)
        if hasattr(norm_act, "SyncBatchNormAct"):
            register_norm_act(norm_act.SyncBatchNormAct, SyncBatchNormAct)
        return True
    return False


TIMM_REGISTERED = register_timm()
