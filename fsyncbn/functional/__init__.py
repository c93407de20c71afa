"""Pure functional batch norm with explicit state.

Tensors and Python scalars in, tensors out: nothing here holds state, imports modules or
knows about process groups. Synchronisation is a ``reducer`` argument, any callable that
returns the element-wise sum of its argument over all participants.
"""

from ._state import State, init_state
from .batch_norm import EpsMode, Reducer, batch_norm, sync_batch_norm

__all__ = ["EpsMode", "Reducer", "State", "batch_norm", "init_state", "sync_batch_norm"]
