"""Back to plain batch norm for deployment: nn.BatchNorm1d/2d/3d in place of every
synchronized layer (fsyncbn's and torch's nn.SyncBatchNorm), for TorchScript, ONNX or any
tool that knows only torch's plain layers.

Reached through ``fsyncbn.revert_model(model, to_plain=True, ...)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .conversions import (
    PLAIN_BY_INPUT_DIM,
    plain_batch_norm_class,
    takes_any_rank,
    transfer_batch_norm,
    warn_clamp_reverted,
)

__all__ = ["revert_to_plain"]


def revert_to_plain(
    module: nn.Module,
    *,
    example_input: Any = None,
    input_dims: int | Mapping[str, int] | None = None,
) -> nn.Module:
    """Turn every synchronized layer of ``module`` into nn.BatchNorm1d/2d/3d (exact classes:
    a user subclass keeps its own forward and stays as it is).

    SynchronizedBatchNorm1d/2d/3d give their dimension by their class. nn.SyncBatchNorm and
    fsyncbn.SyncBatchNorm take any input rank, so theirs comes from ``input_dims`` or, else,
    from a dry run: ``module`` runs once in eval mode under no_grad on ``example_input``
    (nothing is synchronised or written), and each such layer's input rank is recorded.
    The new layers hold the very same tensors (parameters, running statistics,
    num_batches_tracked) and flags (eps, momentum, affine, track_running_stats, training,
    requires_grad, qconfig); the training flags of every module are restored after the dry
    run. Hooks registered on a replaced layer do not carry over.

    Args:
        module: any module.
        example_input: an input of ``module`` (a tensor, or a tuple of positional arguments).
        input_dims: the input rank (2 to 5) of every SyncBatchNorm layer, or a mapping from
            a layer's qualified name (as in ``named_modules``) to its input rank.

    Returns:
        The reverted module (``module`` itself unless ``module`` is a synchronized layer).

    Raises:
        ValueError: a SyncBatchNorm layer whose dimension neither argument gives.
    """
    ambiguous = [name for name, m in module.named_modules() if takes_any_rank(type(m))]
    dims = _known_input_dims(ambiguous, input_dims)
    missing = [name for name in ambiguous if name not in dims]
    if missing and example_input is not None:
        dims.update(_observed_input_dims(module, missing, example_input))
    missing = [name for name in ambiguous if name not in dims]
    if missing:
        found = "" if example_input is None else " (the example input did not reach it)"
        raise ValueError(
            f"revert_model: cannot tell whether {_describe(module, missing[0])} is 1d, 2d or 3d"
            f"{found}; pass example_input=<an input of the model> or input_dims=<2..5, or "
            f"{{{missing[0]!r}: 2..5}}>"
        )
    return _swap(module, "", dims)


def _known_input_dims(names: list[str], input_dims: int | Mapping[str, int] | None) -> dict[str, int]:
    if input_dims is None:
        return {}
    given = dict.fromkeys(names, input_dims) if isinstance(input_dims, int) else dict(input_dims)
    for name, dim in given.items():
        if dim not in PLAIN_BY_INPUT_DIM:
            raise ValueError(
                f"revert_model: expected input_dims to give an input rank from 2 to 5 "
                f"(2 or 3: BatchNorm1d, 4: 2d, 5: 3d), got {dim!r} for layer {name!r}"
            )
    return {name: dim for name, dim in given.items() if name in names}


def _observed_input_dims(module: nn.Module, names: list[str], example_input: Any) -> dict[str, int]:
    """Each named layer's input rank in one eval-mode, no-grad forward of ``module``."""
    seen: dict[str, int] = {}

    def recorder(name: str) -> Any:
        def record(_layer: nn.Module, args: tuple[Any, ...]) -> None:  # None: the input is unchanged
            seen.setdefault(name, args[0].dim())

        return record

    modules = dict(module.named_modules())
    handles = [modules[name].register_forward_pre_hook(recorder(name)) for name in names]
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            module(*args)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in flags:
            m.training = training
    return seen


def _swap(module: nn.Module, name: str, dims: Mapping[str, int]) -> nn.Module:
    plain = plain_batch_norm_class(module, dims.get(name))
    replaced = module
    if plain is not None:
        warn_clamp_reverted("revert_model", module, name, plain)
        replaced = transfer_batch_norm(module, plain)  # type: ignore[arg-type]
    for child_name, child in module.named_children():
        replaced.add_module(child_name, _swap(child, f"{name}.{child_name}" if name else child_name, dims))
    return replaced


def _describe(root: nn.Module, name: str) -> str:
    """``SyncBatchNorm 'features.1'``: a layer of ``root`` by class and qualified name."""
    return f"{type(root.get_submodule(name)).__name__} {name!r}" if name else type(root).__name__
