"""convert_model / revert_model: swap torch's batch-norm layers for fsyncbn's and back.

The swapped layer holds the very same parameter and buffer tensors (so values, dtype,
device, requires_grad and num_batches_tracked are kept), the same hyper-parameters and the
same training flag. An nn.DataParallel anywhere becomes a DataParallelWithCallback.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, cast

import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .conversions import (
    conversion_from_plain,
    conversion_from_sync,
    register_conversion,
    transfer_batch_norm,
    warn_clamp_reverted,
)
from .deployment import revert_to_plain
from .inplace_abn import InPlaceABN
from .layer_errors import name_layers
from .modules import (
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
    SynchronizedBatchNormBase,
)
from .parallel import DEFAULT_SYNC_TIMEOUT_S, DataParallelWithCallback

__all__ = [
    "ConversionWarning", "convert_model", "patch_sync_batchnorm", "register_conversion", "revert_model",
]

class ConversionWarning(UserWarning):
    """convert_model left batch-norm layers unsynchronized (unknown subclasses, lazy layers)."""




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


def _rewrap_data_parallel(
    dp: nn.DataParallel[nn.Module], inner: nn.Module, cls: type[nn.Module]
) -> nn.Module:
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


def convert_model(
    module: nn.Module, process_group: dist.ProcessGroup | None = None, *, fuse_activations: bool = False,
) -> nn.Module:
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

    ``fuse_activations=True`` also folds batch norm + activation into one
    :class:`fsyncbn.InPlaceABN` (half the activation memory; see
    :mod:`fsyncbn.functional.activated` for how it differs from batch norm + activation: the
    weight's magnitude is floored at eps), where folding is safe: an exact nn.BatchNorm1d/2d/3d
    inside an nn.Sequential, right after a convolution or linear layer (whose fresh output
    nobody else reads, so it may be overwritten) and right before an nn.LeakyReLU (slope > 0),
    nn.ELU (alpha > 0) or nn.Identity, none with hooks; the activation's slot becomes an
    nn.Identity, so indices stay. Likewise timm's ``BatchNormAct2d`` (and other classes of
    :func:`fsyncbn.integrations.timm.register_norm_act`) with such an activation and no dropout,
    where its input is a convolution's fresh output (right after one in an nn.Sequential, or
    the ``bn`` after the ``conv`` of timm's ``ConvNormAct``). Every other batch norm followed
    by an activation is converted as usual, with one :class:`ConversionWarning` per skipped
    pattern saying why. :func:`revert_model` undoes the fold.

    Args:
        module: any module.
        process_group: torch.distributed group for the converted layers (None: WORLD).
        fuse_activations: fold batch norm + activation into InPlaceABN where safe.

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
    unfolded: dict[tuple[str, str], list[str]] | None = {} if fuse_activations else None
    converted = _convert(module, process_group, "", skipped, lazy, unfolded)
    for (pattern, reason), paths in (unfolded or {}).items():
        warnings.warn(
            f"convert_model: did not fold {pattern} into InPlaceABN at {_where(paths)}, since {reason}; "
            "converted the norm as usual", ConversionWarning, stacklevel=2,
        )
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
    name_layers(converted)  # errors name each layer by its place in the model
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
    unfolded: dict[tuple[str, str], list[str]] | None = None,
) -> nn.Module:
    if isinstance(module, nn.DataParallel) and not isinstance(module, DataParallelWithCallback):
        inner = _convert(module.module, process_group, _join(path, "module"), skipped, lazy, unfolded)
        return _rewrap_data_parallel(module, inner, DataParallelWithCallback)
    converted = module
    conversion = conversion_from_plain(type(module))
    if conversion is not None:
        converted = conversion.to_sync(module, process_group)
    elif isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        lazy.append(path)
    elif isinstance(module, _BatchNorm) and conversion_from_sync(type(module)) is None:
        if not isinstance(module, SynchronizedBatchNormBase):
            skipped.setdefault(type(module), []).append(path)
    children = list(module.named_children())
    folded: dict[str, nn.Module] = {}
    for index, (name, child) in enumerate(children):
        if unfolded is not None and name not in folded:
            folded.update(_fold(module, children, index, process_group, path, unfolded))
        replacement = folded.get(name)
        if replacement is None:
            replacement = _convert(child, process_group, _join(path, name), skipped, lazy, unfolded)
        converted.add_module(name, replacement)
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
    goes back to its library's class, an InPlaceABN that ``convert_model(fuse_activations=True)``
    folded becomes its batch norm and activation again (the very modules, in their slots),
    and DataParallelWithCallback becomes nn.DataParallel.
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
    conversion = conversion_from_sync(type(module))
    if isinstance(module, InPlaceABN) and module._fold_origin is not None:
        reverted = _unfold(module)
    elif conversion is not None:
        warn_clamp_reverted("revert_model", module, getattr(module, "qualified_name", None) or "",
                            conversion.plain)
        reverted = conversion.to_plain(module)
    restored: dict[str, nn.Module] = {}
    children = list(module.named_children())
    for index, (name, child) in enumerate(children):
        reverted.add_module(name, restored[name] if name in restored else revert_model(child))
        origin = child._fold_origin if isinstance(child, InPlaceABN) else None
        if origin is not None and origin.placeholder is not None and index + 1 < len(children):
            next_name, next_child = children[index + 1]
            if next_child is origin.placeholder:  # the activation's slot, as the fold left it
                restored[next_name] = origin.activation
    return reverted


# --- folding batch norm + activation into InPlaceABN (convert_model(fuse_activations=True)) ---

# Exact classes: a subclass may compute something else.
_FOLDABLE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Layers whose output is a fresh tensor that only the next module of an nn.Sequential reads
# (their backward keeps their input, not their output): it may be overwritten.
_FRESH_OUTPUT = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)
# timm's conv + norm-act classes, whose forward is ``self.bn(self.conv(x))`` (then maybe an
# anti-aliasing layer): their ``bn`` reads a fresh convolution output.
_CONV_NORM_ACT = {"ConvNormAct", "ConvNormActAa", "ConvBnAct"}


class FoldOrigin(NamedTuple):
    """What an InPlaceABN was folded from, for :func:`revert_model`."""

    norm_cls: type[nn.Module]
    activation: nn.Module
    drop: nn.Module | None  # a norm-act layer's dropout slot (an identity)
    placeholder: nn.Module | None  # the nn.Identity left in an nn.Sequential's activation slot


def _activation_of(act: nn.Module) -> tuple[str, float] | str:
    """``(activation, activation_param)`` of InPlaceABN computing ``act``, or why it cannot."""
    if type(act) is nn.Identity:
        return "identity", 0.0
    if type(act) is nn.LeakyReLU:
        if act.negative_slope > 0:
            return "leaky_relu", float(act.negative_slope)
        return "its negative_slope is not > 0, so it cannot be inverted"
    if type(act) is nn.ELU:
        if act.alpha > 0:
            return "elu", float(act.alpha)
        return "its alpha is not > 0, so it cannot be inverted"
    if type(act) in (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Threshold):
        return "it is not invertible (it maps a range of inputs to one value): nn.LeakyReLU(0.01) folds"
    return "InPlaceABN computes only nn.LeakyReLU, nn.ELU and nn.Identity"


def _is_activation(module: nn.Module) -> bool:
    return type(module) is nn.Identity or type(module).__module__ == "torch.nn.modules.activation"


def _has_hooks(*modules: nn.Module) -> bool:
    return any(
        getattr(m, hooks, None) for m in modules
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def _is_norm_act(module: nn.Module) -> bool:
    """A registered timm-style norm + activation layer (its counterpart carries act and drop)."""
    conversion = conversion_from_plain(type(module))
    return conversion is not None and hasattr(conversion.sync, "_set_act_drop")


def _fold(
    parent: nn.Module, children: list[tuple[str, nn.Module]], index: int,
    process_group: dist.ProcessGroup | None, path: str, unfolded: dict[tuple[str, str], list[str]],
) -> dict[str, nn.Module]:
    """The replacements folding ``children[index]`` into an InPlaceABN, or {} (recording in
    ``unfolded`` why a batch norm + activation pattern was not folded)."""
    name, child = children[index]
    previous = children[index - 1][1] if index > 0 else None
    in_sequential = type(parent) is nn.Sequential
    fresh_input = in_sequential and type(previous) in _FRESH_OUTPUT
    if type(child) in _FOLDABLE_NORMS and in_sequential and index + 1 < len(children):
        act_name, act = children[index + 1]
        if not _is_activation(act):
            return {}
        drop = None
    elif _is_norm_act(child):
        act, drop = getattr(child, "act", nn.Identity()), getattr(child, "drop", nn.Identity())
        fresh_input = fresh_input or (
            type(parent).__name__ in _CONV_NORM_ACT and isinstance(previous, nn.modules.conv._ConvNd)
            and children[index - 1][0] == "conv" and name == "bn"
        )
    else:
        return {}
    pattern = f"{type(child).__name__} + {type(act).__name__}"
    spec = _activation_of(act)
    if isinstance(spec, str):
        reason = spec
    elif drop is not None and type(drop) is not nn.Identity:
        reason = "a dropout runs between the norm and the activation"
    elif not fresh_input:
        reason = ("its input is not the fresh output of a convolution or linear layer: the caller may still "
                  "read it after InPlaceABN overwrites it (a residual shortcut, for example)")
    elif _has_hooks(child, act, *(() if previous is None else (previous,))):
        reason = ("hooks are registered on these layers, and they would no longer run (or see "
                  "overwritten tensors)")
    else:
        activation, param = spec
        folded = transfer_batch_norm(  # child: a foldable norm, a batch norm
            cast(_BatchNorm, child), InPlaceABN, process_group=process_group, activation=activation,
            activation_param=param,
        )
        if drop is not None:
            folded._fold_origin = FoldOrigin(type(child), act, drop, None)
            return {name: folded}
        placeholder = nn.Identity()
        folded._fold_origin = FoldOrigin(type(child), act, None, placeholder)
        return {name: folded, act_name: placeholder}
    unfolded.setdefault((pattern, reason), []).append(_join(path, name))
    return {}


def _unfold(layer: InPlaceABN) -> nn.Module:
    """The batch norm (a norm-act layer: with its activation and dropout) a fold came from."""
    origin = cast(FoldOrigin, layer._fold_origin)  # called for a folded layer only
    conversion = conversion_from_plain(origin.norm_cls)
    if origin.drop is None or conversion is None:
        return transfer_batch_norm(layer, origin.norm_cls)
    plain = conversion.to_plain(layer)
    plain.drop, plain.act = origin.drop, origin.activation
    return plain


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
    # The patch this function exists for: mypy forbids rebinding a class.
    nn.BatchNorm1d = SynchronizedBatchNorm1d  # type: ignore[misc,assignment]
    nn.BatchNorm2d = SynchronizedBatchNorm2d  # type: ignore[misc,assignment]
    nn.BatchNorm3d = SynchronizedBatchNorm3d  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d = originals  # type: ignore[misc]
