"""Following the input through fsyncbn: which modules a call enters, in order.

A module is *entered* when a function of it is called, from a function of another fsyncbn
module (or from outside fsyncbn), with an argument that is the input or a tensor sharing its
storage (a view, a detach). Returning to a caller is not an entry. Each entry is a *stay*,
except where a caller outside the module makes back-to-back calls that are one step by design,
listed in ONE_STAY: torch's ``Function.apply`` calls a Function's ``forward`` then its
``setup_context``; the router asks the CUDA path whether it accepts a batch and is ready, then
runs it. The walk is what docs/architecture.md means by "following the input visits each
module at most once per path": no module has two stays.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

# Back-to-back entries into one module that are one stay (see the module docstring).
ONE_STAY = {
    "fsyncbn.functional.normalize": {"SyncNormalize.forward", "SyncNormalize.setup_context"},
    "fsyncbn.functional.paths.cuda_sync": {"accepts", "ready", "train"},
}

# Each path's walk through a layer's forward, as docs/architecture.md draws it (module names
# without "fsyncbn." and "functional."). Checked by tests/test_walk.py and, for the CUDA path
# run on CPU, by tests/functional/test_cuda_sync.py.
DRAWN_WALKS = {
    "native_local": "modules → ops → checks → paths.native_local",
    "inference": "modules → ops → checks → paths.inference → normalize",
    "composed": "modules → ops → checks → paths.cuda_sync → paths.composed → moments → normalize",
    "cuda_sync": "modules → ops → checks → paths.cuda_sync",
    "composed, the op": "ops → checks → paths.cuda_sync → paths.composed → moments → normalize",
    "InPlaceABN": "modules → inplace_abn → activated → checks → moments",
}


def _shares_storage(value: object, data_ptr: int) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.numel() > 0
        and value.untyped_storage().data_ptr() == data_ptr
    )


def _arguments(frame: FrameType) -> list[Any]:
    code = frame.f_code
    count = code.co_argcount + code.co_kwonlyargcount
    names = list(code.co_varnames[:count])
    if code.co_flags & 0x04:  # *args
        names.append(code.co_varnames[count])
        count += 1
    if code.co_flags & 0x08:  # **kwargs
        names.append(code.co_varnames[count])
    flat: list[Any] = []
    for value in (frame.f_locals.get(name) for name in names):
        if isinstance(value, dict):
            flat.extend(value.values())
        elif isinstance(value, (tuple, list)):
            flat.extend(value)
        else:
            flat.append(value)
    return flat


def module_entries(run: Callable[[], object], input: torch.Tensor) -> list[tuple[str, str]]:
    """Run ``run()`` and return, in order, the (module, function) entries made with ``input``."""
    data_ptr = input.untyped_storage().data_ptr()
    rooms: list[str] = []  # the fsyncbn modules of the active fsyncbn frames, innermost last
    frames: list[FrameType] = []
    entries: list[tuple[str, str]] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event not in ("call", "return"):
            return
        module = frame.f_globals.get("__name__", "")
        if not (module == "fsyncbn" or module.startswith("fsyncbn.")):
            return
        if event == "call":
            caller = rooms[-1] if rooms else None
            if module != caller and any(_shares_storage(v, data_ptr) for v in _arguments(frame)):
                entries.append((module, frame.f_code.co_qualname))
            rooms.append(module)
            frames.append(frame)
        elif frames and frames[-1] is frame:
            rooms.pop()
            frames.pop()

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(previous)
    return entries


def stays(entries: list[tuple[str, str]]) -> list[str]:
    """The modules of the walk's stays: every entry, except back-to-back entries that
    ONE_STAY makes one."""
    walk: list[str] = []
    for i, (module, function) in enumerate(entries):
        one_step = ONE_STAY.get(module, set())
        if i and entries[i - 1][0] == module and {entries[i - 1][1], function} <= one_step:
            continue
        walk.append(module)
    return walk


def walk(run: Callable[[], object], input: torch.Tensor) -> str:
    """The stays of ``run()`` following ``input``, drawn as the docs draw them."""
    entered = stays(module_entries(run, input))
    short = [m.removeprefix("fsyncbn.").removeprefix("functional.") for m in entered]
    assert len(short) == len(set(short)), f"a module is entered twice: {short}"
    return " → ".join(short)
