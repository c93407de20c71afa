"""The model, data and single-process reference shared by the trainer tests (Lightning, Accelerate).

Two ranks with batches of ``BATCH`` samples and no shuffling see, at step k, the samples
2k*BATCH .. 2(k+1)*BATCH - 1 between them (DistributedSampler gives rank r the samples r,
r+2, ...; Accelerate gives rank r the batches r, r+2, ...). :func:`reference` trains one
unsynchronized copy on those unions in one process: the synchronized ranks must end with its
weights and running statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

STEPS, BATCH = 3, 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.out_bn = nn.BatchNorm1d(3, momentum=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_bn(self.body(x))


def data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * BATCH * STEPS, 4, generator=gen, dtype=torch.float64) * 3 + 1
    y = torch.randn(2 * BATCH * STEPS, 3, generator=gen, dtype=torch.float64)
    return TensorDataset(x, y)


def new_net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def reference() -> dict[str, torch.Tensor]:
    """One process, unsynchronized, on the union of the ranks' batches."""
    net = new_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for x, y in DataLoader(data(), batch_size=2 * BATCH):
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        opt.step()
    return net.state_dict()
