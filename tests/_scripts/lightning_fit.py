"""A Lightning fit on 2 CPU processes (strategy "ddp", gloo) with fsyncbn's SyncBatchNormPlugin.

Run as ``python -m tests._scripts.lightning_fit OUT_DIR [reference|convert]``; Lightning starts the
second process itself. Each rank saves its final state_dict and its batch-norm classes to OUT_DIR.
With ``reference``, one process trains the same model on the union of the two ranks'
batches instead (see tests/_support/fit_reference.py). Kept tiny: a few steps, no logger, checkpoint or
progress bar.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from tests._support.fit_reference import BATCH, STEPS, data, new_net, reference


def fit(out_dir: str, how: str = "plugin"):  # type: ignore[no-untyped-def]
    """Fit with the plugin (``how="plugin"``) or with a model converted by the user ("convert");
    return the module and the trainer."""
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from fsyncbn import convert_model

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = convert_model(new_net()) if how == "convert" else new_net()

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> DataLoader:
            # Lightning's own sampler would shuffle; this one gives rank r the samples r, r+2, ...
            sampler = DistributedSampler(data(), shuffle=False)
            return DataLoader(data(), batch_size=BATCH, sampler=sampler)

    module = Module()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, precision="64-true", max_steps=STEPS,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=datetime.timedelta(seconds=30)),
        plugins=_plugins(how), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    classes = [type(m).__name__ for m in module.net.modules()]
    saved = {"state": module.net.state_dict(), "classes": classes}
    torch.save(saved, f"{out_dir}/rank{trainer.global_rank}.pt")
    return module, trainer


def _plugins(how: str) -> list:
    if how != "plugin":
        return []
    from fsyncbn.integrations.lightning import SyncBatchNormPlugin

    return [SyncBatchNormPlugin()]


if __name__ == "__main__":
    if sys.argv[2:] == ["reference"]:
        torch.save(reference(), f"{sys.argv[1]}/reference.pt")
    else:
        fit(sys.argv[1], *sys.argv[2:])
        # Free the trainer's DDP model before the process group goes (docs/integrations.md): one
        # destroyed after it, at interpreter exit, can make gloo abort the process.
        import gc

        import torch.distributed as dist

        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
