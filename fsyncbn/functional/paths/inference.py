"""The inference path: normalise with the running statistics; the state is unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from torch import Tensor

from ..normalize import normalization_terms, normalize
from ..state import State


def infer(
    input: Tensor, state: Mapping[str, Tensor], weight: Tensor | None, bias: Tensor | None,
    eps: float, eps_mode: str, in_place: bool,
) -> tuple[Tensor, State]:
    """``(input - running_mean) / sqrt(running_var + eps) * weight + bias``; ``state`` itself
    back when ``in_place``, else a new dict of the same tensors."""
    terms = normalization_terms(state["running_var"], eps, eps_mode)
    output = normalize(input, weight, bias, state["running_mean"], terms.var, terms.eps)
    # in_place: ``state`` is a layer's own State dict (see ..ops.run_batch_norm).
    return output, cast(State, state) if in_place else dict(state)
