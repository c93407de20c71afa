"""Activation checkpointing: a recomputed forward replays the statistics of the original.

``torch.utils.checkpoint`` runs a layer's forward a second time during backward. Left alone,
a synchronized layer would update its running statistics twice per step and send a second
forward sum (torch's own batch norm double-counts too, in the reentrant mode). Here:

- A forward that *may* be recomputed (training, with grad disabled, as in the reentrant
  mode's first pass, or with saved-tensor hooks active, as in the non-reentrant mode)
  remembers its local message, the summed message and its reducer in a small per-layer
  cache (:class:`RecomputeCache`, the last few calls, O(C) numbers each). A local forward
  (nobody to sync with) empties the cache instead: its recomputation needs nothing.
- A forward that runs while autograd executes a backward *is* a recomputation
  (:func:`is_recomputing`). It commits nothing to the running statistics, and its reducer
  (:class:`_Replay`) answers the forward sum from the cache, without a collective, so the
  recomputed output and saved tensors are exactly the original ones. The backward sums of
  the recomputed graph (reentrant mode) go to the reducer of the original forward (for a
  DataParallel replica, detached from its replica group by then, the group's): a
  recomputation costs at most the layer's backward collective, which the step needs anyway.

The cache entry is found by exact equality of the local message, which a deterministic
recomputation reproduces; if none is equal (a nondeterministic kernel before the layer), the
newest entry is used. That choice depends on the program's order only, never on data that
differ between participants, so every participant makes the same collective calls. A layer
whose cache is empty (its first pass ran with grad enabled and no hooks) syncs its
recomputation like any forward, and still commits nothing.
"""

from __future__ import annotations

import collections
import threading
from typing import cast

import torch
from torch import Tensor

from .functional.reducer import Reducer

__all__ = ["CACHE_SIZE", "RecomputeCache", "is_recomputing", "may_be_recomputed"]

CACHE_SIZE = 8


# torch has no public signal for either question; these are the ones torch.utils.checkpoint
# itself relies on. Without them (another torch), nothing is recomputation-aware.
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def is_recomputing() -> bool:
    """Whether the calling thread runs inside an autograd backward (a checkpoint's recomputation)."""
    return _graph_task_id is not None and _graph_task_id() != -1


def may_be_recomputed() -> bool:
    """Whether the current forward may run again in backward: grad disabled (reentrant
    checkpoint's first pass) or saved-tensor hooks active (non-reentrant checkpoint)."""
    if not torch.is_grad_enabled():
        return True
    return _top_saved_tensors_hooks is not None and _top_saved_tensors_hooks(False) is not None


class RecomputeCache:
    """The last ``size`` (local message, summed message) pairs of one layer's forwards that
    may be recomputed. Thread-safe (DataParallel replicas share their layer's attributes)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self._entries: collections.deque[tuple[Tensor, Tensor, Reducer]] = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __reduce__(self) -> tuple[type[RecomputeCache], tuple[int | None]]:
        # A copy or a pickle of the layer starts empty (and a lock cannot be copied).
        return (RecomputeCache, (self._entries.maxlen,))

    def remember(self, message: Tensor, total: Tensor, reducer: Reducer) -> None:
        with self._lock:
            self._entries.append((message.detach().clone(), total.detach(), reducer))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def lookup(self, message: Tensor) -> tuple[Tensor, Reducer] | None:
        """(summed message, reducer) of the entry whose local message equals ``message``,
        else of the newest entry, else None."""
        with self._lock:
            entries = list(self._entries)
        for local, total, reducer in reversed(entries):
            if local.shape == message.shape and torch.equal(local, message.detach()):
                return total, reducer
        return entries[-1][1:] if entries else None

    def recording(self, reducer: Reducer) -> Reducer:
        """``reducer``, remembering the result of its first call (the forward sum)."""
        return _Recording(self, reducer)

    def replaying(self) -> Reducer | None:
        """A reducer answering the forward sum from the cache, and passing later calls (the
        backward sums) to the original forward's reducer; None when the cache is empty."""
        return _Replay(self) if len(self) else None


class _Recording:
    def __init__(self, cache: RecomputeCache, reducer: Reducer) -> None:
        self.cache, self.reducer, self.calls = cache, reducer, 0

    def __call__(self, t: Tensor) -> Tensor:
        total = self.reducer(t)
        self.calls += 1
        if self.calls == 1:
            self.cache.remember(t, total, self.reducer)
        return total


class _Replay:
    def __init__(self, cache: RecomputeCache) -> None:
        self.cache, self.calls = cache, 0
        self.reducer: Reducer | None = None

    def __call__(self, t: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == 1:
            found = self.cache.lookup(t)
            if found is None:
                raise RuntimeError("a checkpoint's recomputation found its layer's statistics cache emptied")
            total, self.reducer = found
            return total.clone()
        return cast(Reducer, self.reducer)(t)  # set by the first call
