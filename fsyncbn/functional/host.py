"""Host numbers and tensors alike: small helpers for values that are a Python number where the
host may read them (eager CPU) and a tensor elsewhere (accelerators, torch.compile)."""

from __future__ import annotations

from typing import overload

import torch
from torch import Tensor


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
