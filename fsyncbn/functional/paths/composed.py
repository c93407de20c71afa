"""The composed sync path: synchronised training in plain torch ops and torch's batch-norm
kernels, on any device and under torch.compile (one graph).

Forward: local moments packed into the message (:mod:`..moments`), one reducer call, the
merge, then :class:`..normalize.SyncNormalize`, whose backward makes the one backward call.
It also serves every empty participant (N = 0), whatever its device: its message is zeros, so
it takes part in the sums of the other participants' paths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

from ..host import participation
from ..moments import global_moments
from ..normalize import SyncNormalize, normalization_terms
from ..state import State, commit


def train(
    fn: str, input: Tensor, state: Mapping[str, Tensor] | None, weight: Tensor | None,
    bias: Tensor | None, momentum: float | None, eps: float,
    reducer: Callable[[Tensor], Tensor], eps_mode: str, in_place: bool,
) -> tuple[Tensor, State | None]:
    """Training with statistics summed over all participants (one sum forward, one backward)."""
    moments = global_moments(fn, input, reducer, training=True)
    terms = normalization_terms(moments.var, eps, eps_mode)
    output: Tensor = SyncNormalize.apply(  # type: ignore[no-untyped-call]  # torch's apply
        input, weight, bias, moments.mean, terms.var, terms.eps, terms.var_follows_batch,
        moments.count, reducer,
    )
    if state is None:
        return output, None
    # min(global count, 1): an all-empty step leaves the running statistics as they were.
    took_part = participation(moments.count, moments.mean.dtype)
    return output, commit(state, moments.mean, moments.var_unbiased, momentum, took_part, in_place)
