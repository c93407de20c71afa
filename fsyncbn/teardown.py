"""Leaving cleanly: the tensors gloo may still hold, fsyncbn's threads and process groups, and
the exit handler that ends them before the interpreter finalizes.

Why: gloo runs each collective on a worker thread of its process group. ``wait()`` returns
when the sum is done, and the worker drops its references to the work a moment later. If
that drops the last C++ reference to a tensor that has a Python object (or to the thread-local
state torch captured with the work, during a backward), the worker takes the GIL. Once the
interpreter has begun to finalize, Python ends such a thread with ``pthread_exit``; its
unwind crosses a ``noexcept`` destructor and the process aborts ("terminate called without an
active exception", pytorch/pytorch#190489).

fsyncbn's share is removed as follows:

- every eager sum of a CPU tensor (the forward and backward sums of the synchronized layers,
  the agreement checks, :class:`fsyncbn.Join`'s announced sums and shadows) runs in a buffer
  that fsyncbn holds (:func:`hold`), and the caller gets a copy (O(C) numbers);
- a buffer is let go only once gloo has let it go: its Python reference count is back to
  that of a tensor nobody else holds. torch keeps one reference to a tensor's Python object
  for as long as any C++ code holds the tensor besides it, and gloo's work drops its tensors
  last, after its thread-local state; so the count is back only once the worker has made every
  decref that needed the GIL. ``sys.getrefcount`` is public and exact here; the baseline is
  measured at import, on a tensor held the same way, so that it holds on any Python version;
- :func:`release_process_groups`, called by the exit handler (registered at import, so it
  runs before torch's own handlers and before finalization) or by the user: stops fsyncbn's
  threads, waits with the GIL released (short sleeps) until gloo has let every buffer go,
  capped at ``timeout_s``, then destroys fsyncbn's own process groups (:class:`fsyncbn.Join`'s),
  whose worker threads then end.

CUDA tensors take torch's plain path (no copy, no host synchronisation; NCCL has no such
worker), and so does ``torch.compile`` (functional collectives). Collectives that the user,
DDP or Lightning start themselves are torch's: see "Leaving the interpreter" in
docs/distributed.md.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["release_process_groups"]

# How long the exit handler waits for gloo to let fsyncbn's tensors go: far above the
# microseconds it takes, unless a collective is stuck (a peer hung), which must not hang exit.
EXIT_TIMEOUT_S = 5.0
_POLL_S = 0.001

_lock = threading.Lock()
_held: list[Tensor] = []  # tensors given to a CPU collective that gloo may still hold
_threads: dict[threading.Thread, threading.Event] = {}  # fsyncbn's live threads, their stop flags
_releasers: list[Callable[[], None]] = []  # destroy fsyncbn's process groups


def _counts(tensors: list[Tensor]) -> list[int]:
    return [sys.getrefcount(t) for t in tensors]


# The count of a tensor held only by such a list: what a buffer gloo has let go comes back to.
_BASELINE = _counts([torch.empty(0)])[0]


def _sweep() -> None:
    """Let go the buffers that nobody but this module holds any more (caller holds _lock)."""
    counts = _counts(_held)
    if any(c <= _BASELINE for c in counts):
        _held[:] = [t for t, c in zip(_held, counts, strict=True) if c > _BASELINE]


def hold(buffer: Tensor) -> Tensor:
    """Keep ``buffer``, about to be given to a CPU collective, until gloo has let it go; returns it."""
    with _lock:
        _sweep()
        _held.append(buffer)
    return buffer


def held() -> int:
    """How many buffers gloo may still hold (for tests)."""
    with _lock:
        _sweep()
        return len(_held)


def drain(timeout_s: float) -> bool:
    """Wait, the GIL released, until gloo has let go every buffer; False if ``timeout_s`` passed first."""
    deadline = time.monotonic() + timeout_s
    while held():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def start_thread(target: Callable[[threading.Event], None], name: str) -> threading.Thread:
    """Start a daemon thread running ``target(stop)``. It must return soon after ``stop`` is
    set, and never block in a collective without watching ``stop`` (see :func:`wait_for`)."""
    stop = threading.Event()

    def run() -> None:
        try:
            target(stop)
        finally:
            with _lock:
                _threads.pop(threading.current_thread(), None)

    thread = threading.Thread(target=run, name=name, daemon=True)
    with _lock:
        _threads[thread] = stop
    thread.start()
    return thread


def stop_threads(
    threads: list[threading.Thread] | None = None, timeout_s: float = EXIT_TIMEOUT_S
) -> list[threading.Thread]:
    """Ask ``threads`` (default: all of fsyncbn's) to stop, wait for them up to ``timeout_s``;
    returns those still running."""
    with _lock:
        chosen = dict(_threads) if threads is None else {t: _threads[t] for t in threads if t in _threads}
    for stop in chosen.values():
        stop.set()
    deadline = time.monotonic() + timeout_s
    for thread in chosen:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t for t in chosen if t.is_alive()]


def wait_for(work, stop: threading.Event, poll_s: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    """Wait for a collective's ``work``; False, leaving it to the backend, once ``stop`` is set.

    The thread is never inside the backend's wait for more than ``poll_s``: a thread that
    returns from it during finalization would abort the process.
    """
    import datetime

    step = datetime.timedelta(seconds=poll_s)
    while not stop.is_set():
        try:
            work.wait(step)
            return True
        except RuntimeError:
            if work.is_completed():
                work.wait()  # the collective's own error, if it failed
                return True
    return False


def on_release(releaser: Callable[[], None]) -> None:
    """Register ``releaser()``, which destroys process groups of fsyncbn's own."""
    _releasers.append(releaser)


def release_process_groups(timeout_s: float = EXIT_TIMEOUT_S) -> bool:
    """Destroy the process groups fsyncbn made for itself (:class:`fsyncbn.Join`'s private copies
    of the layers' groups), after its threads have stopped and gloo has let go its tensors.

    fsyncbn calls it at interpreter exit, and whenever a new :class:`fsyncbn.Join` finds that
    their parent (default) group was destroyed. Call it yourself to free them earlier, on every
    rank at the same point (the next ``fsyncbn.Join`` makes them again, collectively). Groups you
    made (``fsyncbn.sync_groups``, ``new_group``) stay yours.

    Args:
        timeout_s: the most seconds to wait for fsyncbn's threads and for the backend to let its
            tensors go (it takes microseconds unless a collective is stuck on a hung peer).

    Returns:
        True if everything was released; False if a collective was still in flight after
        ``timeout_s``: the groups are then left as they are, since destroying a group waits for
        its collectives.

    Example:
        >>> import fsyncbn
        >>> fsyncbn.release_process_groups()
        True
    """
    deadline = time.monotonic() + timeout_s
    running = stop_threads(timeout_s=timeout_s)
    if running or not drain(max(0.0, deadline - time.monotonic())):
        return False
    for releaser in _releasers:
        releaser()
    return True


def _at_exit() -> None:
    try:
        release_process_groups()
    except Exception as exc:  # noqa: BLE001 - never turn an exit into a traceback
        print(f"fsyncbn: releasing its process groups at exit failed: {exc!r}", file=sys.stderr)


atexit.register(_at_exit)
