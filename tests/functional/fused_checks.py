"""Checks of the fused Triton path on CPU, under Triton's interpreter.

Run by tests/functional/test_fused.py in a subprocess with TRITON_INTERPRET=1 and
FSYNCBN_FUSED_ON_CPU=1 (the interpreter is chosen when the kernels are defined). Every check
compares against an independent reference: F.batch_norm, or float64 formulas on the whole batch.
"""

from __future__ import annotations

import os
import sys
import threading

import torch
import torch.nn.functional as F

from fsyncbn.functional import LocalReducer, batch_norm, init_state, kernels, sync_batch_norm
from fsyncbn.functional.ops import run_batch_norm
from tests.reference import (
    float64_moments,
    float64_training_batch_norm,
    informative_grad,
    nearly_constant_channel,
)
from tests.threads import ThreadGroup, raise_first, run_threads

LAYOUTS = [((6, 3, 4), None), ((4, 5, 3, 3), torch.channels_last), ((8, 5), None),
           ((4, 5, 3, 3), None), ((2, 3, 2, 2, 3), torch.channels_last_3d)]


def _leaf(t):
    return t.detach().clone().requires_grad_()


def check_equals_torch() -> None:
    for (shape, layout) in LAYOUTS:
        for affine, momentum in ((True, 0.1), (False, None)):
            gen = torch.Generator().manual_seed(len(shape))
            x = torch.randn(shape, generator=gen) * 2 + 3
            x = x.contiguous(memory_format=layout) if layout else x
            w = torch.rand(shape[1], generator=gen) + 0.5 if affine else None
            b = torch.randn(shape[1], generator=gen) if affine else None
            g = informative_grad(shape, torch.float32)
            state = init_state(shape[1])
            state["num_batches_tracked"] += 2
            assert kernels.runs_fused(x)
            xs = _leaf(x)
            ws, bs = (None, None) if w is None else (_leaf(w), _leaf(b))
            y, new_state = sync_batch_norm(xs, state, ws, bs, reducer=LocalReducer(), momentum=momentum)
            (y * g).sum().backward()
            xr = _leaf(x)
            wr, br = (None, None) if w is None else (_leaf(w), _leaf(b))
            rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
            factor = 1 / 3 if momentum is None else momentum
            yr = F.batch_norm(xr, rm, rv, wr, br, True, factor, 1e-5)
            (yr * g).sum().backward()
            tol = {"rtol": 1e-5, "atol": 1e-5}
            torch.testing.assert_close(y, yr, **tol)
            assert y.is_contiguous(memory_format=layout or torch.contiguous_format)
            torch.testing.assert_close(xs.grad, xr.grad, **tol)
            if w is not None:
                torch.testing.assert_close(ws.grad, wr.grad, **tol)
                torch.testing.assert_close(bs.grad, br.grad, **tol)
            torch.testing.assert_close(new_state["running_mean"], rm, **tol)
            torch.testing.assert_close(new_state["running_var"], rv, **tol)
            assert int(new_state["num_batches_tracked"]) == 3
            assert torch.equal(state["running_mean"], torch.zeros(shape[1])), "the pure op kept its state"


def check_in_place_and_no_state() -> None:
    x = torch.randn(6, 4, 5)
    state = init_state(4)
    tensors = dict(state)
    y, returned = run_batch_norm("batch_norm", x, state, None, None, training=True, momentum=0.5,
                                 eps=1e-5, reducer=LocalReducer(), eps_mode="plus", in_place=True)
    assert returned["running_mean"] is tensors["running_mean"]
    mean, _, var_unbiased = float64_moments(x)
    torch.testing.assert_close(state["running_mean"], 0.5 * mean.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["running_var"], 0.5 + 0.5 * var_unbiased.float(), rtol=1e-5, atol=1e-6)
    assert int(state["num_batches_tracked"]) == 1
    y_none, none = sync_batch_norm(x, None, reducer=LocalReducer())
    assert none is None
    torch.testing.assert_close(y_none, F.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)


def check_reduced_precision() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        x64 = torch.randn(8, 3, 5, dtype=torch.float64) * 3 + 1
        w = torch.rand(3, dtype=torch.float64) + 0.5
        g = informative_grad(x64.shape, torch.float64)
        xr, wr = _leaf(x64), _leaf(w)
        (float64_training_batch_norm(xr, wr, None, eps=1e-5, eps_mode="plus") * g).sum().backward()
        xs, ws = _leaf(x64.to(dtype)), _leaf(w.float())
        y, _ = sync_batch_norm(xs, None, ws, reducer=LocalReducer())
        assert y.dtype == dtype
        (y * g.to(dtype)).sum().backward()
        tol = {"rtol": 3e-2, "atol": 3e-2}
        torch.testing.assert_close(xs.grad.double(), xr.grad, **tol)
        torch.testing.assert_close(ws.grad.double(), wr.grad, **tol)


def check_clamp_gradient() -> None:
    x64 = nearly_constant_channel((6, 3, 4))
    w = torch.rand(3, dtype=torch.float64) + 0.5
    g = informative_grad(x64.shape, torch.float64)
    xr, wr = _leaf(x64), _leaf(w)
    (float64_training_batch_norm(xr, wr, None, eps=1e-5, eps_mode="clamp") * g).sum().backward()
    xs, ws = _leaf(x64.float()), _leaf(w.float())
    y, _ = batch_norm(xs, None, ws, training=True, eps_mode="clamp", reducer=LocalReducer())
    (y * g.float()).sum().backward()
    torch.testing.assert_close(xs.grad.double(), xr.grad, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(ws.grad.double(), wr.grad, rtol=1e-4, atol=1e-4)


def check_offset_data() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 4, 9, generator=gen, dtype=torch.float64) + 1e4
    _, var, _ = float64_moments(x)
    y, state = sync_batch_norm(x.float(), init_state(4), reducer=LocalReducer(), momentum=1.0)
    relative = ((state["running_var"].double() * (x.numel() / 4 - 1) / (x.numel() / 4)) - var).abs() / var
    assert relative.max() < 1e-3, relative


class _OneLaunchAtATime:
    """Triton's interpreter is not thread-safe: participants (threads) take turns to launch."""

    lock = threading.Lock()

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            with self.lock:
                return launch(*args, **kwargs)

        return run


# Ops that allocate or view memory: no kernel on a GPU.
NO_KERNEL = {"empty.memory_format", "empty_like.default", "new_empty.default", "view.default",
             "slice.Tensor", "detach.default", "unbind.int", "as_strided.default"}


def check_launch_budget() -> None:
    """One layer step on the fused path: 5 Triton kernels, and no other op that would launch a
    kernel on a GPU (allocations and views only). With a process-group reducer add its clone
    and all_reduce per call, and on CUDA one asynchronous assert: about 10 in all, where the
    budget is 16 (tests/test_cuda.py counts the real CUDA kernels)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    from fsyncbn.functional import triton_kernels

    launches: list[str] = []

    class Counted:
        def __init__(self, name, kernel) -> None:
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                launches.append(self.name)
                with _disable_current_modes():  # the interpreter's own tensor work is not ours
                    return launch(*args, **kwargs)

            return run

    for name in [n for n in dir(triton_kernels) if n.endswith("_kernel")]:
        setattr(triton_kernels, name, Counted(name, getattr(triton_kernels, name)))

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter[str] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func).removeprefix("aten.")] += 1
            return func(*args, **(kwargs or {}))

    x = torch.randn(8, 4, 3, 3, requires_grad=True)
    w, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    state = init_state(4)
    with Ops() as forward:
        y, _ = run_batch_norm("batch_norm", x, state, w, b, training=True, momentum=0.1, eps=1e-5,
                              reducer=LocalReducer(), eps_mode="plus", in_place=True)
    grad = torch.randn_like(y)
    with Ops() as backward:
        y.backward(grad)
    kernels_ops = {op: n for op, n in (forward.ops + backward.ops).items() if op not in NO_KERNEL}
    assert kernels_ops == {}, kernels_ops
    assert launches == ["moments_message_kernel", "normalize_kernel", "finalize_kernel",
                        "backward_reduce_kernel", "backward_elementwise_kernel"], launches


def check_sharded_equals_global() -> None:
    """Three participants, one of them empty (it takes the composed path): the fused ones' sums
    have the same layout, so they meet."""
    from fsyncbn.functional import triton_kernels

    for name in [n for n in dir(triton_kernels) if n.endswith("_kernel")]:
        setattr(triton_kernels, name, _OneLaunchAtATime(getattr(triton_kernels, name)))
    splits = [3, 0, 5]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, 3, generator=gen) * 2 + 1
    w, b = torch.rand(4, generator=gen) + 0.5, torch.randn(4, generator=gen)
    g = informative_grad(x.shape, torch.float32)
    xr, wr, br = _leaf(x), _leaf(w), _leaf(b)
    rm, rv = torch.zeros(4), torch.ones(4)
    (F.batch_norm(xr, rm, rv, wr, br, True, 0.1, 1e-5) * g).sum().backward()
    group = ThreadGroup(3)

    def participant(rank):
        xi, wi, bi = _leaf(x.split(splits)[rank]), _leaf(w), _leaf(b)
        y, state = sync_batch_norm(xi, init_state(4), wi, bi, reducer=group.reducer(rank))
        (y * g.split(splits)[rank]).sum().backward()
        return xi.grad, wi.grad, bi.grad, state

    results = raise_first(run_threads(3, participant))
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(torch.cat([r[0] for r in results]), xr.grad, **tol)
    torch.testing.assert_close(sum(r[1] for r in results), wr.grad, **tol)
    torch.testing.assert_close(sum(r[2] for r in results), br.grad, **tol)
    for r in results:
        torch.testing.assert_close(r[3]["running_mean"], rm, **tol)
        torch.testing.assert_close(r[3]["running_var"], rv, **tol)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("FSYNCBN_FUSED_ON_CPU") == "1"
    names = sys.argv[1:] or [n for n in dir() if n.startswith("check_")]
    for name in names:
        globals()[name]()
        print(f"{name}: ok", flush=True)
