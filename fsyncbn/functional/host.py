"""Small helpers every room may call: values that are a Python number where the host may read
them (eager CPU) and a tensor elsewhere (accelerators, torch.compile), and the rules of
dtypes, counts and layouts that several rooms apply.

They take dtypes and shapes rather than the batch where they can, so that following the
batch through a path enters each room once (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import torch
from torch import Tensor


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The statistics dtype of a batch of ``dtype``: float64 for float64, float32 for every
    other (float16/bfloat16 statistics are never accumulated in their own dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def values_per_channel(shape: torch.Size | tuple[int, ...]) -> int:
    """How many values each channel of an ``(N, C, *)`` batch holds: N times the spatial size."""
    count = 1
    for i, size in enumerate(shape):
        if i != 1:
            count = count * size  # no int(): a symbolic size stays symbolic under torch.compile
    return count


def channels_innermost(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether C varies fastest in memory: (N, C) input, or (N, C, *) laid out channels_last
    (torch's ``is_contiguous(memory_format=channels_last[_3d])``: dims of size 1 are free)."""
    if len(shape) == 2:
        return True
    if len(shape) not in (4, 5):
        return False
    expected = 1
    for dim in (1, *range(len(shape) - 1, 1, -1), 0):  # C, then W, H(, D), then N
        if shape[dim] != 1:
            if strides[dim] != expected:
                return False
            expected = expected * shape[dim]
    return True


def empty_batch_sums(batch: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-channel sums of an empty ``(0, C, *)`` batch: zeros ``(C,)`` computed from it (a
    constant could be hoisted out of a compiled backward, or shared with a buffer that an
    in-place collective overwrites)."""
    return batch.sum([0, *range(2, batch.dim())], dtype=dtype)


def reads_on_host(t: Tensor) -> bool:
    """Whether ``t``'s values may be read on the host: eager CPU tensors only (elsewhere a read
    would stall the stream or break the graph)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def at_least(value: Tensor | float, floor: float) -> Tensor | float:
    """``max(value, floor)`` for a host number or a 0-dim tensor (a count of values)."""
    if isinstance(value, Tensor):
        return value.clamp(min=floor)
    return max(value, floor)


def participation(count: Tensor | float, dtype: torch.dtype) -> Tensor | float | None:
    """``min(count, 1)`` of a global count: 0 when every participant was empty. None for a
    host count of at least 1 (nothing to scale)."""
    if isinstance(count, Tensor):
        return count.clamp(max=1).to(dtype)
    return None if count >= 1 else 0.0


def as_dtype(value: Tensor | float, dtype: torch.dtype) -> Tensor | float:
    """A host number as it is; a tensor cast to ``dtype``."""
    return value.to(dtype) if isinstance(value, Tensor) else value


@overload
def in_dtype(t: Tensor, dtype: torch.dtype) -> Tensor: ...
@overload
def in_dtype(t: None, dtype: torch.dtype) -> None: ...
@overload
def in_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None: ...
def in_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype`` (None stays None; no copy when it already is)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def assert_on_device(condition: Tensor, message: str) -> None:
    """Fail asynchronously where ``condition`` is False: no host read, no graph break."""
    torch._assert_async(condition, message)
