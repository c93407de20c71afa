"""convert_model / revert_model: swap torch's batch-norm layers for fsyncbn's and back.

The swapped layer holds the very same parameter and buffer tensors (so values, dtype,
device, requires_grad and num_batches_tracked are kept), the same hyper-parameters and the
same training flag. An nn.DataParallel anywhere becomes a DataParallelWithCallback.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch.distributed as dist
from torch import nn

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

__all__ = ["convert_model", "patch_sync_batchnorm", "revert_model"]

_TO_FSYNCBN: dict[type[nn.Module], type[SynchronizedBatchNormBase]] = {
    nn.BatchNorm1d: SynchronizedBatchNorm1d,
    nn.BatchNorm2d: SynchronizedBatchNorm2d,
    nn.BatchNorm3d: SynchronizedBatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
}
_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in _TO_FSYNCBN.items()}


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
    """Make ``module`` synchronise its batch norm.

    nn.BatchNorm1d/2d/3d become SynchronizedBatchNorm1d/2d/3d, nn.SyncBatchNorm becomes
    fsyncbn.SyncBatchNorm (exact classes only: a user subclass keeps its own forward), and
    an nn.DataParallel anywhere becomes a DataParallelWithCallback with the same
    device_ids, output_device and dim. Children are replaced in place; the returned module
    is ``module`` unless ``module`` itself was replaced.

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
    if isinstance(module, nn.DataParallel) and not isinstance(module, DataParallelWithCallback):
        inner = convert_model(module.module, process_group)
        return _rewrap_data_parallel(module, inner, DataParallelWithCallback)
    converted = module
    target = _TO_FSYNCBN.get(type(module))
    if target is not None:
        converted = target.from_batchnorm(module, process_group)  # type: ignore[arg-type]
    for name, child in module.named_children():
        converted.add_module(name, convert_model(child, process_group))
    return converted


def revert_model(
    module: nn.Module,
    to_plain: bool = False,
    *,
    example_input: Any = None,
    input_dims: int | Mapping[str, int] | None = None,
) -> nn.Module:
    """Undo :func:`convert_model`: the torch classes it replaced come back (for export).

    SynchronizedBatchNorm1d/2d/3d become nn.BatchNorm1d/2d/3d, fsyncbn.SyncBatchNorm becomes
    nn.SyncBatchNorm (keeping its process_group), DataParallelWithCallback becomes
    nn.DataParallel. Tensors are shared as in convert_model. A layer with
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
    if isinstance(module, DataParallelWithCallback):
        return _rewrap_data_parallel(module, revert_model(module.module), nn.DataParallel)
    reverted = module
    target = _TO_TORCH.get(type(module))
    if target is not None:
        if module.eps_mode == "clamp":  # type: ignore[union-attr]
            warnings.warn(
                f"revert_model: {type(module).__name__} with eps_mode='clamp' becomes "
                f"{target.__name__}, which normalises with sqrt(var + eps)", stacklevel=2,
            )
        extra = {"process_group": module.process_group} if target is nn.SyncBatchNorm else {}
        reverted = transfer_batch_norm(module, target, **extra)  # type: ignore[arg-type]
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
