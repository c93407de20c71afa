"""Argument checks at the public boundary of the functional ops.

Every check reads only shapes, dtypes and Python values, never tensor data, so the checks
cost nothing on the device and trace away under torch.compile.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real

import torch
from torch import Tensor

from .host import values_per_channel
from .state import STATE_KEYS

EPS_MODES = ("plus", "clamp")


def shape_str(shape: torch.Size | tuple[int, ...]) -> str:
    """``(8, 32, 7, 7)`` rather than ``torch.Size([8, 32, 7, 7])`` in messages."""
    dims = tuple(int(d) for d in shape)
    return f"({dims[0]},)" if len(dims) == 1 else str(dims)


def check_hyperparameters(fn: str, momentum: float | None, eps: float, eps_mode: str) -> None:
    """Validate momentum, eps and eps_mode (shared by the functional ops and the modules)."""
    if momentum is not None:
        if isinstance(momentum, bool) or not isinstance(momentum, Real):
            raise TypeError(f"{fn}: expected momentum to be a float or None, got {momentum!r}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"{fn}: expected momentum in [0, 1] or None, got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, Real):
        raise TypeError(f"{fn}: expected eps to be a float, got {eps!r}")
    if not float(eps) >= 0.0:  # also rejects NaN
        raise ValueError(f"{fn}: expected eps >= 0, got {eps!r}")
    if eps_mode not in EPS_MODES:
        raise ValueError(f"{fn}: expected eps_mode 'plus' or 'clamp', got {eps_mode!r}")


def _check_per_channel(fn: str, name: str, t: object, input: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: expected {name} to be a torch.Tensor or None, got {type(t).__name__}")
    channels = input.shape[1]
    if t.dim() != 1:
        raise ValueError(
            f"{fn}: expected {name} of shape ({channels},), got shape {shape_str(t.shape)}"
        )
    if t.shape[0] != channels:
        raise ValueError(
            f"{fn}: expected input with {t.shape[0]} channels (from {name}), "
            f"got shape {shape_str(input.shape)}"
        )
    if not t.is_floating_point():
        raise TypeError(f"{fn}: expected {name} to be floating point, got dtype {t.dtype}")


def check_arguments(
    fn: str,
    input: Tensor,
    state: Mapping[str, Tensor] | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    momentum: float | None,
    eps: float,
    eps_mode: str,
    reducer: object,
    configuration_checked: bool = False,
) -> None:
    """Raise TypeError/ValueError naming ``fn`` for anything a batch-norm call cannot accept.

    ``configuration_checked``: the caller has already passed these very arguments through
    this function (a layer remembers the configuration it validated); only the check that
    depends on the batch's size runs again.
    """
    if not configuration_checked:
        if not isinstance(input, Tensor):
            raise TypeError(f"{fn}: expected input to be a torch.Tensor, got {type(input).__name__}")
        if input.dim() < 2:
            raise ValueError(
                f"{fn}: expected input of shape (N, C, *) with at least 2 dimensions, "
                f"got shape {shape_str(input.shape)}"
            )
        if input.shape[1] == 0:
            raise ValueError(
                f"{fn}: expected input with at least one channel (C > 0), "
                f"got shape {shape_str(input.shape)}; give it input of shape (N, C, *)"
            )
        if not input.is_floating_point():
            raise TypeError(f"{fn}: expected a floating-point input, got dtype {input.dtype}")
        if not isinstance(training, bool):
            raise TypeError(f"{fn}: expected training to be a bool, got {training!r}")
        if isinstance(reducer, type):
            raise TypeError(
                f"{fn}: expected reducer to be a reducer instance, got the class {reducer.__name__}; "
                f"pass {reducer.__name__}() instead"
            )
        if reducer is not None and not callable(reducer):
            raise TypeError(
                f"{fn}: expected reducer to be a callable reducer(t) -> sum of t over all "
                f"participants, got {type(reducer).__name__}"
            )
        check_hyperparameters(fn, momentum, eps, eps_mode)
        if float(eps) == 0.0 and (training or state is None):
            raise ValueError(
                f"{fn}: expected eps > 0 when normalising with batch statistics, got {eps!r}"
            )
        if state is not None:
            if not isinstance(state, Mapping):
                raise TypeError(
                    f"{fn}: expected state to be a dict with keys {', '.join(STATE_KEYS)} "
                    f"(see init_state) or None, got {type(state).__name__}"
                )
            for key in STATE_KEYS:
                if key not in state:
                    raise ValueError(
                        f"{fn}: state is missing {key!r}; expected keys {', '.join(STATE_KEYS)} "
                        "(see init_state)"
                    )
            _check_per_channel(fn, "state['running_mean']", state["running_mean"], input)
            _check_per_channel(fn, "state['running_var']", state["running_var"], input)
            if not isinstance(state["num_batches_tracked"], Tensor):
                raise TypeError(
                    f"{fn}: expected state['num_batches_tracked'] to be a torch.Tensor, "
                    f"got {type(state['num_batches_tracked']).__name__}"
                )
        if weight is not None:
            _check_per_channel(fn, "weight", weight, input)
        if bias is not None:
            _check_per_channel(fn, "bias", bias, input)
    if reducer is None and (training or state is None):
        # Batch statistics without synchronisation (training, or eval without running stats).
        check_local_batch_size(fn, input)


def check_local_batch_size(fn: str, input: Tensor) -> None:
    """Without synchronisation, training needs more than one value per channel (as torch)."""
    if values_per_channel(input.shape) == 1:
        raise ValueError(
            f"{fn}: expected more than 1 value per channel when training, "
            f"got input of shape {shape_str(input.shape)}"
        )
