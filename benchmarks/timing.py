"""Interleaved timing: both sides in every round, order alternating, medians of ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Ratio:
    ours_us: float  # median time per call, microseconds
    theirs_us: float
    ratio: float  # median over rounds of ours / theirs
    low: float  # smallest and largest round ratio: the spread
    high: float


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], iters: int, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters * 1e6


def compare(ours: Callable[[], object], theirs: Callable[[], object], *, rounds: int, iters: int,
            warmup: int = 3, device: str = "cpu") -> Ratio:
    """Time ``ours`` against ``theirs``: ``rounds`` interleaved rounds of ``iters`` calls."""
    for _ in range(warmup):
        ours()
        theirs()
    ours_t, theirs_t, ratios = [], [], []
    for r in range(rounds):
        if r % 2:
            b = _time(theirs, iters, device)
            a = _time(ours, iters, device)
        else:
            a = _time(ours, iters, device)
            b = _time(theirs, iters, device)
        ours_t.append(a)
        theirs_t.append(b)
        ratios.append(a / b)
    return Ratio(statistics.median(ours_t), statistics.median(theirs_t), statistics.median(ratios),
                 min(ratios), max(ratios))
