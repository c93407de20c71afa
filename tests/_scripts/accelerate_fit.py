"""An Accelerate training loop on 2 CPU processes with synchronized batch norm (the docs' recipe).

Run as ``torchrun --nproc-per-node 2 -m tests._scripts.accelerate_fit OUT_DIR``. Each rank saves its
final state_dict to OUT_DIR; tests/_support/fit_reference.py has the single-process reference.
"""

from __future__ import annotations

import gc
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from tests._support.fit_reference import BATCH, data, new_net


def fit(out_dir: str) -> None:
    from accelerate import Accelerator

    import fsyncbn

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # gloo on CPU, nccl on GPUs
    model = fsyncbn.convert_model(new_net())  # before prepare(), which wraps it in DDP
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data(), batch_size=BATCH)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for x, y in loader:
        optimizer.zero_grad()
        accelerator.backward(F.mse_loss(model(x), y))
        optimizer.step()
    state = accelerator.unwrap_model(model).state_dict()
    torch.save(state, f"{out_dir}/rank{accelerator.process_index}.pt")
    # Free the DDP model before the process group goes: one destroyed after it can make gloo
    # abort the process at exit (docs/integrations.md).
    del model, optimizer, loader
    gc.collect()
    accelerator.end_training()  # destroys the process group


if __name__ == "__main__":
    fit(sys.argv[1])
