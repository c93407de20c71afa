"""Participants as CPU threads, and a reducer written against the public contract alone.

The contract: ``reducer(t)`` returns the element-wise sum of ``t`` over all participants and
is differentiable, its backward being the same sum of the gradients. ``ThreadGroup`` builds
one such reducer per participant from a barrier and shared slots; it knows nothing else of
fsyncbn. Every wait has a timeout, so a broken test fails instead of hanging.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

TIMEOUT_S = 30.0


class ThreadGroup:
    """``world_size`` participants meeting at a barrier; counts every sum it performs.

    Args:
        world_size: number of participants.
        overlap: sum only the overlapping prefix of unequal tensors, each participant
            getting a result of its own length, as gloo does. Without it, unequal shapes
            are an error.
    """

    def __init__(self, world_size: int, *, overlap: bool = False, timeout: float = TIMEOUT_S):
        self.world_size = world_size
        self.overlap = overlap
        self.barrier = threading.Barrier(world_size, timeout=timeout)
        self.slots: list[Tensor | None] = [None] * world_size
        self.sums: list[list[tuple[int, ...]]] = [[] for _ in range(world_size)]

    def _sum(self, rank: int, t: Tensor) -> Tensor:
        self.slots[rank] = t.detach()
        self.barrier.wait()
        try:
            parts = list(self.slots)
            if self.overlap:
                total = torch.zeros_like(t)
                for part in parts:
                    n = min(part.numel(), t.numel())
                    total[:n] += part[:n].to(t.dtype)
            else:
                total = torch.stack(parts).sum(0)
        finally:
            self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        self.sums[rank].append(tuple(t.shape))
        return total

    def reducer(self, rank: int) -> Callable[[Tensor], Tensor]:
        group = self

        class _Sum(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
                return group._sum(rank, t)

            @staticmethod
            def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
                return group._sum(rank, grad)

        return _Sum.apply


def run_threads(world_size: int, fn: Callable[[int], Any], timeout: float = TIMEOUT_S) -> list[Any]:
    """Run ``fn(rank)`` in one thread per rank; return results in rank order.

    Returns each rank's result, or the exception it raised (so tests can check that every
    participant failed). Fails the test if a thread is still running after ``timeout``.
    """
    results: list[Any] = [None] * world_size

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        if t.is_alive():
            raise AssertionError(f"participant thread still running after {timeout} s")
    return results


def raise_first(results: list[Any]) -> list[Any]:
    """Re-raise the first exception among ``results``; return them otherwise."""
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results
