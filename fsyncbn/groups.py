"""Sync groups: synchronise batch norm within groups of ranks (per node, or per k ranks).

At scale, batch norm is often synchronised over a few GPUs rather than over the whole job
(apex's ``create_syncbn_process_group``, Flax's ``axis_index_groups``). torch.distributed
requires *every* rank to call ``new_group`` for *every* group, in the same order, even for the
groups it is not in; a rank that skips one or calls them in another order hangs the job.
:func:`sync_groups` does that bookkeeping and returns the group of the calling rank, ready
for ``convert_model(model, process_group=...)`` or a layer's ``process_group``.
"""

from __future__ import annotations

import datetime
import socket

import torch.distributed as dist

__all__ = ["sync_groups"]


def sync_groups(
    group_size: int | None = None,
    *,
    per_node: bool = False,
    backend: str | None = None,
    timeout: datetime.timedelta | None = None,
) -> dist.ProcessGroup:
    """Split the world into sync groups, collectively, and return the calling rank's group.

    Call it on every rank at the same point (it is a collective call). With ``group_size=k``
    the groups are consecutive blocks of k ranks: ``[0..k-1], [k..2k-1], ...``. With
    ``per_node=True`` a group holds the ranks that share a host (by ``socket.gethostname()``,
    exchanged over the default group), in the order of their lowest rank; nodes may hold
    different numbers of ranks.

    The checks that can fail run before any collective, identically on every rank, so a bad
    argument raises the same error on every rank instead of leaving some ranks waiting.

    Args:
        group_size: ranks per group; must divide the world size. Give this or ``per_node``.
        per_node: one group per host.
        backend: backend of the new groups (None: the default group's).
        timeout: timeout of the new groups (None: torch's default).

    Returns:
        The process group of the calling rank. Pass it to
        ``fsyncbn.convert_model(model, process_group=group)``.

    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError: neither or both of ``group_size`` and ``per_node``; ``group_size`` not a
            positive integer or not dividing the world size.

    Example (on every rank, after ``init_process_group``; not run here)::

        group = fsyncbn.sync_groups(group_size=4)      # or sync_groups(per_node=True)
        model = DDP(fsyncbn.convert_model(model, process_group=group), forward_sync_buffers=False)

    DDP's buffer broadcast (on by default; ``broadcast_buffers=False`` before torch 2.13) would
    copy rank 0's running statistics over the other groups': turn it off with sync groups.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "sync_groups: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group on every rank first"
        )
    if (group_size is None) == (not per_node):
        raise ValueError(
            f"sync_groups: give exactly one of group_size (an int) or per_node=True, got "
            f"group_size={group_size!r}, per_node={per_node!r}"
        )
    world_size = dist.get_world_size()
    if per_node:
        rank_lists = _ranks_per_host(world_size)
    else:
        rank_lists = _consecutive_blocks(group_size, world_size)  # type: ignore[arg-type]
    rank = dist.get_rank()
    mine: dist.ProcessGroup | None = None
    for ranks in rank_lists:
        # Every rank creates every group, in the same order: torch.distributed requires it.
        group = dist.new_group(ranks, timeout=timeout, backend=backend)
        if rank in ranks:
            mine = group
    assert mine is not None  # the lists partition range(world_size)
    return mine


def _consecutive_blocks(group_size: int, world_size: int) -> list[list[int]]:
    """``[[0..k-1], [k..2k-1], ...]``; raises (on every rank alike) if k does not fit."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"sync_groups: expected group_size to be a positive int, got {group_size!r}"
        )
    if world_size % group_size != 0:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"sync_groups: group_size={group_size} does not divide the world size {world_size}; "
            f"use one of {divisors}, or per_node=True"
        )
    return [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]


def _ranks_per_host(world_size: int) -> list[list[int]]:
    """The ranks of each host, hosts in the order of their lowest rank (one all_gather)."""
    hosts: list[str | None] = [None] * world_size
    dist.all_gather_object(hosts, socket.gethostname())
    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(str(host), []).append(rank)
    return list(by_host.values())
