"""fsyncbn: synchronized batch norm for PyTorch.

Pure functional ops with explicit state (:mod:`fsyncbn.functional`), reducers that sum
statistics over participants (:mod:`fsyncbn.reducers`), and the familiar modules and
helpers of Synchronized-BatchNorm-PyTorch and torch.nn.SyncBatchNorm.
"""

from . import functional, reducers, replicas
from .convert import ConversionWarning, convert_model, patch_sync_batchnorm, register_conversion, revert_model
from .functional.agreement import SynchronizationError
from .groups import sync_groups
from .join import Join
from .modules import (
    SyncBatchNorm,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
    get_sbn_eps_mode,
    roll_back_step,
    set_sbn_eps_mode,
)
from .parallel import (
    DataParallelWithCallback,
    execute_replication_callbacks,
    patch_replication_callback,
)
from .reducers import LocalReducer, ProcessGroupReducer
from .replicas import ReplicaGroup
from .teardown import release_process_groups

__version__ = "0.1.0"

__all__ = [
    "ConversionWarning",
    "DataParallelWithCallback",
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
