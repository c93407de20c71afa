"""Uneven data across ranks: :class:`Join`, torch's join context manager that also shadows the
synchronized layers' sums of the ranks that ran out of data.

torch's ``Join([ddp_model])`` lets a rank leave its training loop early: it then *shadows* the
collectives of the ranks still training (DDP's gradient buckets), contributing zeros. It knows
nothing of synchronized batch norm, whose forward and backward sums would leave the active
ranks waiting for the rank that left. fsyncbn's messages carry their counts, so a rank's empty
contribution (N = 0, every number zero) leaves the statistics of the others exactly those of
the union of their batches; only the *schedule* of the sums has to be shadowed.

The protocol, on a process group of fsyncbn's own per layer group (so that it never
interleaves with DDP's gradient buckets on the model's group):

- inside :class:`Join`, an active rank sends every batch-norm sum (forward and backward) as
  one float64 all_reduce of fixed size: the header ``[1, n, n*n, dtype, dtype*dtype]``, then
  its ``n`` numbers, then zeros up to the group's capacity (``2 * C_max + 4``, the largest
  forward message of the group's layers, agreed by all ranks when the Join is made);
- a rank that has run out of data starts, before entering torch's join loop, one *shadow*
  thread per group, which all_reduces zeros of that size over and over: an empty contribution
  to whatever message the active ranks send, whose size and dtype it never needs to know;
- the header sums to ``[W, W*n, W*n*n, ...]`` for the ``W`` active ranks: they check that all
  sent the same size and dtype (as with :mod:`fsyncbn.functional.agreement`); when it sums to
  zero active ranks, every rank of the group has joined: the shadows stop, and the context
  manager waits for them after torch's join loop.

It cannot deadlock with DDP: torch's joined rank runs DDP's main hook, which blocks on the
bucket all_reduces, while its shadow thread answers the batch-norm sums that the active ranks
must finish before launching those buckets. Every collective on the private group has the
same size and dtype, so a shadow matches whatever the active ranks send, in their order (the
active ranks run the same layers in the same order, as without Join). Eval-mode forwards and
steps that call no synchronized layer send nothing, and so need nothing from the shadows.
Messages travel as float64: float32 backward sums come back rounded from a float64 sum.

Why a subclass of torch's Join rather than a Joinable in its list: a joined rank runs the
joinables' main hooks one after the other, each iteration. A batch-norm Joinable listed after
DDP would start answering only once DDP's main hook returns, and that hook waits for gradient
buckets the active ranks launch only after their batch-norm sums: a deadlock. Listed first, it
would become the joinable that counts the ranks still training each iteration, in DDP's
place, and DDP would lose the count it scales gradients with. The subclass starts the shadows
at the one moment that is right: when this rank leaves its loop, before torch's join loop.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.join import Join as TorchJoin
from torch.distributed.algorithms.join import Joinable

from . import routing, teardown
from .functional.agreement import SynchronizationError, agreement_header, disagreement
from .layer_errors import name_layers
from .modules import SynchronizedBatchNormBase
from .reducers import is_peer_failure

__all__ = ["Join"]

# Message dtypes, numbered in the header.
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_HEADER_SIZE = 5
# After torch's join loop every rank has started its shadows, which then stop at once.
_SHADOW_STOP_TIMEOUT_S = 60.0

# Private groups, per default group (by name: no weak reference to a process group, which would
# run Python while gloo tears it down at exit) and rank lists, made once, in the same order.
# The only references fsyncbn keeps to them: they end with their parent (see _release_stale)
# or when fsyncbn.release_process_groups() runs (at the latest at interpreter exit).
_private_cache: dict[tuple[str, int], dict[tuple[int, ...], dist.ProcessGroup]] = {}


class _PrivateGroup:
    """fsyncbn's own copy of one layer group: active ranks send headed messages of ``capacity``
    numbers, shadows send zeros. Called, it is the layers' reducer inside the Join. It names
    its process group (``key``, ``ranks`` in ``_private_cache``) rather than holding it, so that
    a Join or an autograd graph kept by the user does not keep the group alive."""

    def __init__(self, key: tuple[str, int], ranks: tuple[int, ...], device: torch.device,
                 capacity: int) -> None:
        self.key, self.ranks, self.device, self.capacity = key, ranks, device, capacity

    @property
    def group(self) -> dist.ProcessGroup:
        group = _private_cache.get(self.key, {}).get(self.ranks)
        if group is None:
            raise RuntimeError(
                f"fsyncbn.Join: the process group it made for ranks {list(self.ranks)} was released "
                "(fsyncbn.release_process_groups() ran, or the default group was destroyed); make a "
                "new fsyncbn.Join"
            )
        return group

    def __call__(self, t: Tensor) -> Tensor:
        total: Tensor = _AnnouncedSum.apply(t, self)  # type: ignore[no-untyped-call]  # torch's apply
        return total

    def announced_sum(self, t: Tensor) -> Tensor:
        """The active side: the sum of ``t`` over the group, ``t``'s size and dtype checked."""
        size, code = t.numel(), _DTYPES.index(t.dtype)
        if size > self.capacity:
            raise ValueError(
                f"fsyncbn.Join: a batch-norm message of {size} numbers exceeds the {self.capacity} "
                "this Join was made for; make the Join after the model has all its layers"
            )
        message = torch.zeros(_HEADER_SIZE + self.capacity, dtype=torch.float64, device=t.device)
        message[:_HEADER_SIZE] = torch.tensor(
            (*agreement_header(size), float(code), float(code * code)), dtype=torch.float64
        )
        message[_HEADER_SIZE:_HEADER_SIZE + size] = t.detach().reshape(-1)
        if message.device.type == "cpu":
            teardown.hold(message)  # until gloo has let it go (the result below is a copy)
        try:
            dist.all_reduce(message, group=self.group)
        except (RuntimeError, dist.DistError) as exc:
            if not is_peer_failure(exc):
                raise
            raise SynchronizationError(
                f"fsyncbn.Join: a batch-norm sum failed: a rank died, hung past the process group's "
                f"timeout, or left without fsyncbn.Join ({type(exc).__name__}: {exc})"
            ) from exc
        active, total, total_square, codes, codes_square = message[:_HEADER_SIZE].tolist()
        average = disagreement((active, total, total_square), size)
        if average is not None or disagreement((active, codes, codes_square), code) is not None:
            raise SynchronizationError(
                f"fsyncbn.Join: the active ranks are out of step: this rank sums {size} numbers "
                f"of {t.dtype}, the {active:g} active ranks average {total / active:g} numbers "
                "(a rank skipped a synchronized layer, called one again, or has another C)"
            )
        # A copy: a view would keep a reference to the message.
        return message[_HEADER_SIZE:_HEADER_SIZE + size].to(t.dtype, copy=True).reshape(t.shape)

    def shadow(self, stop: threading.Event) -> None:
        """The joined side: send zeros, an empty contribution to every message of the active
        ranks, until every rank of the group has joined, or until ``stop`` is set (the sum in
        flight is then left to the backend, its message held until gloo lets it go)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device is per thread
        group = self.group
        while True:
            message = torch.zeros(_HEADER_SIZE + self.capacity, dtype=torch.float64, device=self.device)
            if message.device.type == "cpu":
                teardown.hold(message)
            if not teardown.wait_for(dist.all_reduce(message, group=group, async_op=True), stop):
                return
            if message[0].item() == 0:
                return


class _AnnouncedSum(torch.autograd.Function):
    """Announced all_reduce(SUM) whose backward is the announced all_reduce(SUM) of the gradient."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, private: _PrivateGroup) -> Tensor:
        ctx.private = private
        return private.announced_sum(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.private.announced_sum(grad), None


class Join(TorchJoin):
    """torch's ``Join`` for uneven inputs, also for models with synchronized batch norm.

    Use it in place of ``torch.distributed.algorithms.join.Join``, with the same arguments::

        with fsyncbn.Join([ddp_model, optimizer]):
            for x, y in loader:            # ranks may hold different numbers of batches
                loss_fn(ddp_model(x), y).backward()
                optimizer.step()

    The statistics of every synchronized layer in the listed modules are then, at each step,
    those of the union of the batches of the ranks still training, and the layers' gradients
    those of that union: no padding, no dropped batches, no hang. torch's join semantics are
    kept (DDP divides gradients by the initial world size unless given
    ``divide_by_initial_world_size=False``; after the block DDP copies the last rank's model
    to every rank). See :mod:`fsyncbn.join` for the protocol.

    Constructing it is a collective call over the default group (every rank, same point): it
    exchanges the layers' groups and, the first time, makes fsyncbn's private copies of them.

    Differences from torch's Join: items that are not torch Joinables (a plain optimizer, a
    module without DDP) take no part in torch's protocol and are accepted. A model that is
    evaluated inside the block must be run under ``ddp_model.no_sync()`` or outside DDP
    (``ddp_model.module``), as torch's Join requires for any forward without backward. Inside
    the block every batch-norm sum is padded to the size of the group's largest one (one
    all_reduce of ``2 * C_max + 9`` float64 numbers), and ``torch.compile`` of the layers is
    not supported there. A failed step is rolled back as
    outside (see :func:`fsyncbn.roll_back_step`).

    Args:
        joinables: as torch's; modules among them (DDP or not) are searched for synchronized
            layers.
        enable: as torch's: False turns the whole mechanism off.
        throw_on_early_termination: as torch's: every rank raises once one has run out of
            data (no shadowing is needed then).
        **kwargs: forwarded to the join hooks (e.g. ``divide_by_initial_world_size``).
    """

    def __init__(
        self,
        joinables: list[Any],
        enable: bool = True,
        throw_on_early_termination: bool = False,
        **kwargs: Any,
    ) -> None:
        torch_joinables = [j for j in joinables if isinstance(j, Joinable)]
        if not torch_joinables:
            raise ValueError(
                "fsyncbn.Join: expected at least one torch Joinable among joinables (a "
                "DistributedDataParallel model, a ZeroRedundancyOptimizer), got "
                f"{[type(j).__name__ for j in joinables]}"
            )
        super().__init__(torch_joinables, enable, throw_on_early_termination, **kwargs)
        self._privates: dict[nn.Module, _PrivateGroup] = {}
        self._shadows: list[threading.Thread] = []
        self._shadow_errors: list[BaseException] = []
        if enable:
            self._privates = _private_groups(_synchronized_layers(joinables))

    def __enter__(self) -> None:
        super().__enter__()  # type: ignore[no-untyped-call]  # untyped in torch
        routing.announce(self._privates)

    def __exit__(
        self,
        type: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if self._enable and type is None and not self._throw_on_early_termination:
                self._start_shadows()
            super().__exit__(type, value, traceback)
            self._wait_for_shadows()
        finally:
            routing.withdraw(self._privates)
            # Shadows still running (torch's join loop raised, or they did not stop in time)
            # leave their collective now: no thread of fsyncbn outlives the block.
            teardown.stop_threads(self._shadows)
            self._shadows = []

    def _start_shadows(self) -> None:
        distinct = {p.ranks: p for p in self._privates.values()}
        for private in distinct.values():
            self._shadows.append(teardown.start_thread(
                functools.partial(self._run_shadow, private), "fsyncbn-join-shadow"
            ))

    def _run_shadow(self, private: _PrivateGroup, stop: threading.Event) -> None:
        try:
            private.shadow(stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            self._shadow_errors.append(exc)

    def _wait_for_shadows(self) -> None:
        deadline = time.monotonic() + _SHADOW_STOP_TIMEOUT_S
        for thread in self._shadows:
            thread.join(max(0.0, deadline - time.monotonic()))
        running = [t for t in self._shadows if t.is_alive()]
        if self._shadow_errors:
            error = self._shadow_errors[0]
            raise SynchronizationError(
                f"fsyncbn.Join: shadowing the batch-norm sums of the active ranks failed "
                f"({type(error).__name__}: {error})"
            ) from error
        if running:
            raise SynchronizationError(
                f"fsyncbn.Join: the batch-norm shadows had not stopped {_SHADOW_STOP_TIMEOUT_S:g} s "
                "after every rank joined (a rank left its loop without this context manager?)"
            )


def _synchronized_layers(joinables: Iterable[Any]) -> list[SynchronizedBatchNormBase]:
    layers: dict[int, SynchronizedBatchNormBase] = {}
    for item in joinables:
        if isinstance(item, nn.Module):
            name_layers(item)
            for m in item.modules():
                if isinstance(m, SynchronizedBatchNormBase):
                    layers.setdefault(id(m), m)
    return list(layers.values())


def _private_groups(layers: list[SynchronizedBatchNormBase]) -> dict[nn.Module, _PrivateGroup]:
    """A private copy of every layer group, made collectively: the ranks exchange their layers'
    rank lists and all create every group in one sorted order."""
    world = cast(dist.ProcessGroup, dist.group.WORLD)  # Join needs torch.distributed initialized
    mine = {}
    widest: dict[tuple[int, ...], int] = {}  # the most channels of a layer, per group
    for layer in layers:
        group = world if layer.process_group is None else layer.process_group
        ranks = mine[layer] = tuple(dist.get_process_group_ranks(group))
        widest[ranks] = max(widest.get(ranks, 0), layer.num_features)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(widest.items()))
    for entries in everyone:  # the capacity every rank of a group agrees on
        for ranks, channels in entries:
            widest[tuple(ranks)] = max(widest.get(tuple(ranks), 0), channels)
    all_lists = sorted({tuple(ranks) for entries in everyone for ranks, _ in entries})
    _release_stale()
    key = (world.group_name, id(world))
    cache = _private_cache.setdefault(key, {})
    timeout = _timeout_of(world)
    for ranks in all_lists:
        if ranks not in cache:  # the same on every rank: they saw the same lists before
            cache[ranks] = dist.new_group(list(ranks), timeout=timeout)
    privates: dict[tuple[int, ...], _PrivateGroup] = {}
    result: dict[nn.Module, _PrivateGroup] = {}
    for layer, ranks in mine.items():
        if ranks not in privates:
            # The forward message, 2C + 4 numbers, is the largest (backward: 2C).
            privates[ranks] = _PrivateGroup(key, ranks, _device_of(layer), 2 * widest[ranks] + 4)
        result[layer] = privates[ranks]
    return result


def _registered(group: dist.ProcessGroup) -> bool:
    """Whether torch still knows ``group`` (destroy_process_group forgets it)."""
    try:
        dist.get_backend(group)
    except (ValueError, RuntimeError):
        return False
    return True


def _destroy(groups: dict[tuple[int, ...], dist.ProcessGroup]) -> None:
    """Destroy private groups and drop fsyncbn's references to them: being the last, gloo's
    worker threads then end (collectives on them must be over: see fsyncbn.teardown)."""
    for group in groups.values():
        if dist.is_initialized() and _registered(group):
            dist.destroy_process_group(group)
    groups.clear()


def _release_stale() -> None:
    """Destroy the private groups whose parent (the default group they were made under) was
    destroyed. Checked when a Join is made and at exit, rather than by wrapping torch's
    destroy_process_group: torch and the launchers call it by many names."""
    world = dist.group.WORLD if dist.is_initialized() else None
    live = None if world is None else (world.group_name, id(world))
    stale = [key for key, groups in _private_cache.items()
             if key != live or not all(_registered(g) for g in groups.values())]
    if stale and teardown.drain(teardown.EXIT_TIMEOUT_S):
        for key in stale:
            _destroy(_private_cache.pop(key))


def _release_all() -> None:
    while _private_cache:
        _destroy(_private_cache.popitem()[1])


teardown.on_release(_release_all)


def _device_of(layer: nn.Module) -> torch.device:
    tensor = next(iter(layer.buffers()), None)
    if tensor is None:
        tensor = next(iter(layer.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _timeout_of(group: dist.ProcessGroup) -> Any:
    """The group's own timeout, so that the private groups wait no longer than it (None: torch's
    default)."""
    try:
        return group._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # noqa: BLE001 - another backend, another torch: the default
        return None
