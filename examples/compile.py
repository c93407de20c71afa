"""torch.compile with synchronized batch norm: one graph, no breaks, eager's numbers.

    python examples/compile.py

Also under torchrun (the layers then synchronise over the process group, and DDP wraps the
compiled model: ``DDP(torch.compile(model, fullgraph=True))``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fsyncbn import convert_model


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4),
    )


def train(model: nn.Module, steps: int) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 3, 16, 16, generator=gen)
        y = torch.randint(0, 4, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(steps: int = 3) -> None:
    eager = convert_model(make_model())
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(8, 3, 16, 16)
    explanation = torch._dynamo.explain(copy.deepcopy(eager))(x)
    print(f"graphs: {explanation.graph_count}, graph breaks: {explanation.graph_break_count}")
    compiled = torch.compile(compiled_model, fullgraph=True)
    eager_losses, compiled_losses = train(eager, steps), train(compiled, steps)
    gap = max(abs(a - b) for a, b in zip(eager_losses, compiled_losses, strict=True))
    print(f"losses eager {eager_losses}\n       compiled {compiled_losses}\nlargest gap {gap:.1e}")
    buffers = zip(eager.buffers(), compiled_model.buffers(), strict=True)
    print("running stats equal:", all(torch.allclose(a.float(), b.float(), atol=1e-5) for a, b in buffers))


if __name__ == "__main__":
    main()
