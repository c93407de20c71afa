"""Which reducer and commit policy one training forward of a synchronized layer uses.

The routes, in training (see :func:`route`):

(a) a replica inside :class:`fsyncbn.DataParallelWithCallback` (or a patched nn.DataParallel)
    sums with the other replicas of the same forward and *stages* its new statistics: they
    are written only once every replica's forward has succeeded;
(b) with torch.distributed initialised and the layer's ``process_group`` (default WORLD) of
    size > 1, the layer sums over the ranks of that group and *journals* its writes: the
    values from before the step are kept, and restored in every layer of the step if any of
    them fails (see :mod:`fsyncbn.step_journal`; under torch.compile writes are not
    journaled); inside :class:`fsyncbn.Join` the sums are *announced* on fsyncbn's own copy of
    the group, so that ranks out of data can answer them (see :mod:`fsyncbn.join`);
(c) otherwise nobody: the layer *writes* in place, and is nn.BatchNormXd bit for bit.

Under activation checkpointing a forward may record its sums, and a recomputation replays
them and commits nothing (see :mod:`fsyncbn.recompute`). In eval mode nothing is
synchronised or written.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layer_errors import labelled
from .recompute import RecomputeCache, is_recomputing, may_be_recomputed
from .reducers import ProcessGroupReducer
from .step_journal import StepJournal, journal_for

__all__ = [
    "LOCAL_ROUTE", "Route", "announce", "announced_reducer", "process_group_reducer", "route", "withdraw",
]

Reducer = Callable[[Tensor], Tensor]


class Route(NamedTuple):
    """How one training forward of a layer synchronises and commits."""

    reducer: Reducer | None
    in_place: bool  # the functional op writes the buffers itself
    journal: StepJournal | None
    commit: bool = True  # False: a checkpoint's recomputation keeps no statistics


LOCAL_ROUTE = Route(None, True, None)


def process_group_reducer(name: str, group: Any) -> ProcessGroupReducer:
    """A layer's process-group reducer; a bad ``process_group`` is named as the layer's."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{name}: expected process_group to be a torch.distributed.ProcessGroup (for example "
            f"from torch.distributed.new_group(ranks) or fsyncbn.sync_groups) or None for WORLD, "
            f"got {type(group).__name__} {group!r}"
        )
    return ProcessGroupReducer(group, name=None)


class JournaledReducer:
    """The process-group reducer of one layer call: a failure, also in backward (which may
    run on another thread), rolls back the step of the journal the forward used, and names
    the layer.

    The autograd graph keeps it until the graph is freed (a kept loss keeps it), so it holds
    the layer weakly: a graph must not keep a dropped model alive.
    """

    def __init__(self, layer: nn.Module, journal: StepJournal, reducer: Reducer) -> None:
        self.reducer = reducer
        self.layer = weakref.ref(layer)
        self.journal = journal

    def __call__(self, t: Tensor) -> Tensor:
        try:
            return self.reducer(t)
        except BaseException as exc:
            self.journal.roll_back()
            layer = self.layer()
            named = exc if layer is None else labelled(exc, layer)
            if named is exc:
                raise
            raise named from exc


# The announced reducer (fsyncbn.Join's private group) of each layer inside a Join.
_announcing: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def announce(reducers: Mapping[nn.Module, Any]) -> None:
    """Inside :class:`fsyncbn.Join`: these layers sum through these announced reducers (each
    has the ``group`` it sums over)."""
    _announcing.update(reducers)


def withdraw(layers: Iterable[nn.Module]) -> None:
    """Leaving :class:`fsyncbn.Join`: these layers sum over their own groups again."""
    for layer in layers:
        _announcing.pop(layer, None)


def announced_reducer(layer: nn.Module) -> Any:
    """The announced reducer of ``layer`` inside a :class:`fsyncbn.Join`, or None outside."""
    return _announcing.get(layer)


def route(layer: nn.Module) -> Route:
    """The route of ``layer``'s current forward (see the module docstring)."""
    chosen = _synchronisation(layer)
    if not layer.training or torch.compiler.is_compiling():
        return chosen
    if is_recomputing():
        replay = recompute_cache(layer).replaying()
        return Route(replay or chosen.reducer, False, None, commit=False)
    if may_be_recomputed():
        if chosen.reducer is None:
            recompute_cache(layer).clear()
        else:
            return chosen._replace(reducer=recompute_cache(layer).recording(chosen.reducer))
    return chosen


def recompute_cache(layer: nn.Module) -> RecomputeCache:
    """``layer``'s cache of sums for a checkpoint's recomputation (made on first use)."""
    cache: RecomputeCache | None = layer.__dict__.get("_recompute")
    if cache is None:
        cache = layer.__dict__.setdefault("_recompute", RecomputeCache())
    return cache


def _synchronisation(layer: Any) -> Route:
    if not layer.training:
        return LOCAL_ROUTE
    if layer._replica is not None:
        group, replica = layer._replica
        return Route(group.reducer(replica), False, None)
    if dist.is_available() and dist.is_initialized():
        announced = announced_reducer(layer)
        if announced is not None:
            journal = journal_for(announced.group)
            return Route(JournaledReducer(layer, journal, announced), True, journal)
        group = layer.process_group
        if dist.get_world_size(group) > 1:
            if torch.compiler.is_compiling():
                return Route(layer._process_group_reducer, True, None)
            journal = journal_for(group if group is not None else dist.group.WORLD)
            return Route(JournaledReducer(layer, journal, layer._process_group_reducer), True, journal)
    return LOCAL_ROUTE
