"""Undo the running-statistics writes of a training step that failed (torch.distributed path).

On the torch.distributed path every layer writes its new running statistics right after its
own sums succeed, and no layer sees where a training step begins or ends. So that a step
failing at layer k does not keep the writes of layers 1..k-1, each layer's buffers are saved
(O(C) numbers, once per step) before its first write of the step, and a failure in any layer,
in forward or in backward, restores them all.

Where a step begins: the first synchronized layer of a step (its *opener*) starts the next
step when it runs again after the step's backward has begun, or after its output has been
freed unused (a forward without backward). Several forwards before one backward (two views of
a batch, a GAN's generator and discriminator) are therefore one step.

A journal serves one (process group, thread) pair (:func:`journal_for`): models trained in
different threads, or over different process groups, never roll back each other's writes.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import group_keys
from .functional.state import STATE_KEYS

__all__ = ["StepJournal", "journal_for", "roll_back_step"]


class StepJournal:
    """The buffers' values before the current step, per layer, to restore on failure.

    Thread-safe: a backward on a GPU runs on the autograd engine's device threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Weak keys: a dropped model's saved values go with it.
        self._saved: weakref.WeakKeyDictionary[nn.Module, dict[str, Tensor]] = weakref.WeakKeyDictionary()
        self._opener: weakref.ref[nn.Module] | None = None
        self._opener_output: weakref.ref[Tensor] | None = None
        self._backward_began = False
        self._step = 0

    def layer_starts(self, layer: nn.Module) -> None:
        """Call before a synchronized layer computes; it may start a new step."""
        with self._lock:
            opener = self._opener() if self._opener is not None else None
            if opener is None or (opener is layer and self._step_is_done()):
                self._begin_step(layer)

    def _step_is_done(self) -> bool:
        output = self._opener_output() if self._opener_output is not None else None
        return self._backward_began or (self._opener_output is not None and output is None)

    def _begin_step(self, opener: nn.Module) -> None:
        self._saved.clear()
        self._opener = weakref.ref(opener)
        self._opener_output = None
        self._backward_began = False
        self._step += 1

    def layer_writes(self, layer: nn.Module) -> None:
        """Call just before ``layer`` writes its buffers: keep their values from before the step."""
        with self._lock:
            if layer not in self._saved:
                with torch.no_grad():
                    saved = {
                        name: getattr(layer, name).clone()
                        for name in STATE_KEYS
                        if getattr(layer, name, None) is not None
                    }
                self._saved[layer] = saved

    def layer_returns(self, layer: nn.Module, output: Tensor) -> None:
        """Call with a synchronized layer's output: the opener's tells when the step is done."""
        with self._lock:
            opener = self._opener() if self._opener is not None else None
            if opener is not layer or self._opener_output is not None:
                return
            self._opener_output = weakref.ref(output)
            if output.grad_fn is None:
                self._backward_began = True  # no backward will come
            else:
                output.grad_fn.register_prehook(self._backward_hook(self._step))

    def _backward_hook(self, step: int) -> Callable[[tuple[Tensor | None, ...]], None]:
        def backward_began(grad_outputs: tuple[Tensor | None, ...]) -> None:
            with self._lock:
                if self._step == step:
                    self._backward_began = True

        return backward_began

    def roll_back(self) -> None:
        """Restore every buffer written in the current step; the next layer starts a new one."""
        with self._lock:
            with torch.no_grad():
                for layer, saved in list(self._saved.items()):
                    for name, value in saved.items():
                        getattr(layer, name).copy_(value)
            self._saved.clear()
            self._opener = None
            self._opener_output = None
            self._step += 1


# One journal per (process group, thread); groups are named, not held (see group_keys).
_journals: dict[group_keys.GroupKey, threading.local] = {}
_journals_lock = threading.Lock()


def journal_for(group: object) -> StepJournal:
    """The journal of ``group`` (a process group) in the calling thread."""
    key = group_keys.key_of(group)
    with _journals_lock:
        per_thread = _journals.get(key)
        if per_thread is None:
            group_keys.prune(_journals)
        if per_thread is None:
            per_thread = _journals[key] = threading.local()
    journal = getattr(per_thread, "journal", None)
    if journal is None:
        journal = per_thread.journal = StepJournal()
    return journal


def roll_back_step() -> None:
    """Undo the running-statistics writes of the current training step (torch.distributed path).

    fsyncbn does this by itself when a synchronized layer fails, on every rank that sees the
    failure. Call it when your own code raises in the middle of a step, so that this rank too
    keeps nothing of it. It undoes the steps of the calling thread, on every process group.
    The replica path (DataParallel) never writes a failed step, and the local path has
    nothing to undo.

    Example:
        >>> roll_back_step()  # nothing to undo outside a step
    """
    with _journals_lock:
        per_threads = list(_journals.values())
    for per_thread in per_threads:
        journal = getattr(per_thread, "journal", None)
        if journal is not None:
            journal.roll_back()
