"""A Lightning ``LayerSync`` plugin: fsyncbn's synchronized batch norm for ``Trainer(plugins=[...])``.

``Trainer(sync_batchnorm=True)`` uses torch.nn.SyncBatchNorm, which refuses CPU tensors and
breaks the graph under torch.compile. With this plugin the Trainer converts the model with
:func:`fsyncbn.convert_model` when fitting starts (after the process group exists, before
DDP wraps the model) and reverts it with :func:`fsyncbn.revert_model` when fitting ends, so
the model it hands back, checkpoints aside, holds the classes it was built with.

Example (2 processes on CPU, gloo)::

    import lightning as L
    from fsyncbn.integrations.lightning import SyncBatchNormPlugin

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp",
                        plugins=[SyncBatchNormPlugin()])
    trainer.fit(model, dataloader)

The plugin subclasses ``lightning.pytorch``'s LayerSync; with only the older
``pytorch_lightning`` package installed, it subclasses that one's instead.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..convert import convert_model, revert_model

try:
    from lightning.pytorch.plugins.layer_sync import LayerSync
except ImportError:  # only the older package name is installed
    # The same class under the older name; mypy sees two distinct classes.
    from pytorch_lightning.plugins.layer_sync import LayerSync  # type: ignore[assignment]

__all__ = ["SyncBatchNormPlugin"]


class SyncBatchNormPlugin(LayerSync):
    """Synchronise every batch-norm layer of the model over the Trainer's processes.

    Args:
        process_group: the torch.distributed group to synchronise over (None: WORLD, every
            process of the Trainer). It must exist when fitting starts.

    Example:
        >>> from torch import nn
        >>> plugin = SyncBatchNormPlugin()
        >>> model = plugin.apply(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
        >>> type(model[1]).__name__, type(plugin.revert(model)[1]).__name__
        ('SynchronizedBatchNorm1d', 'BatchNorm1d')
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert ``model``'s batch norm (see :func:`fsyncbn.convert_model`)."""
        return convert_model(model, self.process_group)

    def revert(self, model: nn.Module) -> nn.Module:
        """Give ``model`` its original batch-norm classes back (see :func:`fsyncbn.revert_model`)."""
        return revert_model(model)

    def __repr__(self) -> str:
        return f"SyncBatchNormPlugin(process_group={self.process_group!r})"
