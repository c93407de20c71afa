"""Following the input through fsyncbn: which modules a call enters, in order.

A module is *entered* when a function of it is called, from a function of another fsyncbn
module (or from outside fsyncbn), with an argument that is the input or a tensor sharing its
storage (a view, a detach). Returning to a caller is not an entry. A run of entries into
the same module is one *stay*: torch's ``Function.apply`` calls a Function's ``forward`` and
then its ``setup_context``; the router asks the CUDA path whether it accepts a batch, whether
it is ready, then runs it. The walk is what docs/architecture.md means by "following the input
visits each module at most once per path": no module has two stays.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

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
    values = [frame.f_locals.get(name) for name in names]
    flat: list[Any] = []
    for value in values:
        flat.extend(value if isinstance(value, (tuple, list)) else [value])
    return flat


def module_entries(run: Callable[[], object], input: torch.Tensor) -> list[str]:
    """Run ``run()`` and return, in order, the fsyncbn modules entered with ``input``."""
    data_ptr = input.untyped_storage().data_ptr()
    rooms: list[str] = []  # the fsyncbn modules of the active fsyncbn frames, innermost last
    frames: list[FrameType] = []
    entries: list[str] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event not in ("call", "return"):
            return
        module = frame.f_globals.get("__name__", "")
        if not (module == "fsyncbn" or module.startswith("fsyncbn.")):
            return
        if event == "call":
            caller = rooms[-1] if rooms else None
            if module != caller and any(_shares_storage(v, data_ptr) for v in _arguments(frame)):
                entries.append(module)
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


def stays(entries: list[str]) -> list[str]:
    """The walk's stays: runs of consecutive entries into one module counted once."""
    return [module for i, module in enumerate(entries) if i == 0 or entries[i - 1] != module]


def walk(run: Callable[[], object], input: torch.Tensor) -> str:
    """The stays of ``run()`` following ``input``, drawn as the docs draw them."""
    entered = stays(module_entries(run, input))
    short = [m.removeprefix("fsyncbn.").removeprefix("functional.") for m in entered]
    assert len(short) == len(set(short)), f"a module is entered twice: {short}"
    return " → ".join(short)
