"""Pure functional batch norm with explicit state.

Tensors and Python scalars in, tensors out: nothing here holds state, imports modules or
knows about process groups. Synchronisation is a ``reducer`` argument, any callable that
returns the element-wise sum of its argument over all participants.

The rooms: :mod:`.ops` (the public ops and the one router), :mod:`.paths` (one file per path:
inference, native local, composed sync, CUDA sync), :mod:`.state` (the state and its update
rule), :mod:`.checks` (argument checks), :mod:`.message` (the wire format), :mod:`.agreement`
(what participants must agree on), :mod:`.moments` (statistics, their kernel and their merge),
:mod:`.normalize` (normalisation and the composed synchronised backward), :mod:`.host`
(small helpers of dtypes, shapes and host numbers), :mod:`.reducer` (the reducer contract),
:mod:`.activated` (in-place activated batch norm). Each math room chooses its own kernels.
"""

from .activated import Activation, batch_norm_act
from .agreement import SynchronizationError
from .ops import EpsMode, batch_norm, sync_batch_norm
from .reducer import LocalReducer, Reducer
from .state import State, init_state

__all__ = [
    "Activation",
    "EpsMode",
    "LocalReducer",
    "Reducer",
    "State",
    "SynchronizationError",
    "batch_norm",
    "batch_norm_act",
    "init_state",
    "sync_batch_norm",
]
