"""How fsyncbn's registries name a process group: by name, never by a reference.

A reference to a process group (even a weak one) runs Python while gloo tears the group down
at exit, and would keep it alive. So registries key by :func:`key_of`: the group's name under
the default group it belongs to. :func:`prune` drops the entries of every default group but
the current one (destroyed, or replaced by a new ``init_process_group``); a subgroup
destroyed while its default group lives keeps its entry (O(1) numbers) until then.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, cast

import torch.distributed as dist

__all__ = ["key_of", "prune", "world_key"]


def world_key() -> tuple[str, int] | None:
    """The current default group's name and identity, or None without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = cast(dist.ProcessGroup, dist.group.WORLD)  # initialized: the default group exists
    return (world.group_name, id(world))


# A registry key: the default group's (name, identity), the group's name and identity.
GroupKey = tuple[tuple[str, int] | None, str, int]


def key_of(group: Any) -> GroupKey:
    """The registry key of ``group``: its default group's key, its name and identity."""
    return (world_key(), getattr(group, "group_name", ""), id(group))


def prune(registry: MutableMapping[Any, Any]) -> None:
    """Drop the entries of default groups other than the current one (caller holds the lock)."""
    live = world_key()
    for key in [k for k in registry if k[0] != live]:
        del registry[key]
