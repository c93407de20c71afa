"""fsyncbn: synchronized batch norm for PyTorch.

The three calls most users need:

    model = fsyncbn.convert_model(model)       # nn.BatchNorm*d -> synchronized layers
    model = DDP(model)                         # train as usual: statistics span every rank
    plain = fsyncbn.revert_model(model.module, to_plain=True)   # back to nn.BatchNorm*d

With ranks that run out of data at different steps, train inside ``with fsyncbn.Join([model,
optimizer]):``. Under nn.DataParallel, ``fsyncbn.DataParallelWithCallback(model)``.

The rest: pure functional ops with explicit state (:mod:`fsyncbn.functional`), reducers that
sum statistics over participants (:mod:`fsyncbn.reducers`), and the familiar modules and
helpers of Synchronized-BatchNorm-PyTorch and torch.nn.SyncBatchNorm. Every public name, one
line each: docs/api.md.
"""

from . import functional, reducers, replicas
from .conversions import register_conversion
from .convert import ConversionWarning, convert_model, patch_sync_batchnorm, revert_model
from .eps_mode import get_sbn_eps_mode, set_sbn_eps_mode
from .functional.agreement import SynchronizationError
from .groups import sync_groups
from .inplace_abn import InPlaceABN
from .join import Join
from .modules import (
    SyncBatchNorm,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
)
from .parallel import (
    DataParallelWithCallback,
    execute_replication_callbacks,
    patch_replication_callback,
)
from .reducers import LocalReducer, ProcessGroupReducer
from .replicas import ReplicaGroup
from .step_journal import roll_back_step
from .teardown import release_process_groups

__version__ = "0.1.0"

__all__ = [
    "ConversionWarning",
    "DataParallelWithCallback",
    "InPlaceABN",
    "Join",
    "LocalReducer",
    "ProcessGroupReducer",
    "ReplicaGroup",
    "SyncBatchNorm",
    "SynchronizationError",
    "SynchronizedBatchNorm1d",
    "SynchronizedBatchNorm2d",
    "SynchronizedBatchNorm3d",
    "convert_model",
    "execute_replication_callbacks",
    "functional",
    "get_sbn_eps_mode",
    "patch_replication_callback",
    "patch_sync_batchnorm",
    "reducers",
    "register_conversion",
    "release_process_groups",
    "replicas",
    "revert_model",
    "roll_back_step",
    "set_sbn_eps_mode",
    "sync_groups",
]
