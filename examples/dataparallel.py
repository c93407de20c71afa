"""DataParallelWithCallback: synchronized batch norm across the GPUs of one process.

    python examples/dataparallel.py

With two or more GPUs the replicas run in parallel and their batch-norm statistics are
summed over all of them; on a CPU-only machine DataParallel runs the module itself (one
participant), so the same script runs anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from fsyncbn import DataParallelWithCallback, convert_model


def main(steps: int = 5) -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    model = convert_model(model).to(device)
    parallel = DataParallelWithCallback(model, sync_timeout=30.0)
    optimizer = torch.optim.SGD(parallel.parameters(), lr=0.1)
    for step in range(steps):
        x = torch.randn(8, 3, 16, 16, device=device)
        target = torch.randint(0, 10, (8,), device=device)
        loss = nn.functional.cross_entropy(parallel(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")
    replicas = max(torch.cuda.device_count(), 1)
    print(f"{replicas} replica(s); running_mean[:4] = {model[1].running_mean[:4].tolist()}")


if __name__ == "__main__":
    main()
