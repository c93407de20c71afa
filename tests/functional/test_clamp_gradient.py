"""eps_mode="clamp": a channel whose variance is below eps is divided by the constant sqrt(eps),
so its input gradient is weight * (dy - mean(dy)) / sqrt(eps), with no xhat term.

Checked with torch.autograd.gradcheck and against the float64 formula differentiated through
the clamp, locally, sharded over threads, and compiled. (Replicas and gloo: tests/test_parallel.py
and tests/functional/test_distributed.py.)"""

from __future__ import annotations

import pytest
import torch

from fsyncbn.functional import LocalReducer, batch_norm, init_state, sync_batch_norm
from tests._support.reference import float64_training_batch_norm, informative_grad, nearly_constant_channel
from tests._support.threads import ThreadGroup, raise_first, run_threads

EPS = 1e-5
SHAPE = (6, 3, 4)


def _op(reducer):
    def run(x, w, b):
        return batch_norm(x, None, w, b, training=True, eps=EPS, eps_mode="clamp", reducer=reducer)[0]

    return run


@pytest.mark.parametrize("reducer", [None, LocalReducer()], ids=["local", "local-reducer"])
def test_gradcheck_with_a_nearly_constant_channel(reducer):
    x = nearly_constant_channel(SHAPE).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(_op(reducer), (x, w, b))


def test_gradcheck_with_state_and_clamped_channel():
    x = nearly_constant_channel(SHAPE).requires_grad_()
    state = init_state(3, dtype=torch.float64)

    def run(x):
        return batch_norm(x, state, training=True, eps=EPS, eps_mode="clamp")[0]

    assert torch.autograd.gradcheck(run, (x,))


def _reference(x, w, b, g):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    y = float64_training_batch_norm(x, w, b, eps=EPS, eps_mode="clamp")
    (y * g).sum().backward()
    return y.detach(), x.grad, w.grad, b.grad


def test_clamped_channel_gradient_is_the_centred_one():
    """The formula itself, on the clamped channel: weight * (dy - mean(dy)) / sqrt(eps)."""
    x = nearly_constant_channel(SHAPE).requires_grad_()
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    g = informative_grad(SHAPE, torch.float64)
    y, _ = sync_batch_norm(x, None, w, reducer=LocalReducer(), eps=EPS, eps_mode="clamp")
    (y * g).sum().backward()
    dy = g[:, 1]
    expected = w[1] * (dy - dy.mean()) / EPS**0.5
    torch.testing.assert_close(x.grad[:, 1], expected, rtol=1e-9, atol=1e-9)


def test_sharded_equals_global_in_clamp_mode():
    splits = [2, 0, 4]
    x = nearly_constant_channel(SHAPE)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.randn(3, dtype=torch.float64)
    g = informative_grad(SHAPE, torch.float64)
    y_ref, dx_ref, dw_ref, db_ref = _reference(x, w, b, g)
    group = ThreadGroup(3)

    def participant(rank):
        xi = x.split(splits)[rank].clone().requires_grad_()
        wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
        y, _ = sync_batch_norm(xi, init_state(3, dtype=torch.float64), wi, bi,
                               reducer=group.reducer(rank), eps=EPS, eps_mode="clamp")
        (y * g.split(splits)[rank]).sum().backward()
        return y.detach(), xi.grad, wi.grad, bi.grad

    results = raise_first(run_threads(3, participant))
    torch.testing.assert_close(torch.cat([r[0] for r in results]), y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), dx_ref, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(sum(r[2] for r in results), dw_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sum(r[3] for r in results), db_ref, rtol=1e-9, atol=1e-9)


def test_compiled_clamp_gradient_equals_the_reference():
    x = nearly_constant_channel(SHAPE)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.randn(3, dtype=torch.float64)
    g = informative_grad(SHAPE, torch.float64)
    _, dx_ref, dw_ref, db_ref = _reference(x, w, b, g)
    # AOTAutograd's whole forward and backward graph ("aot_eager"): the clamp gradient is in the
    # graph, not in a kernel choice. Inductor compiles this op in clamp mode in
    # tests/functional/test_compile.py ("sync-cumulative-clamp"); the channel below eps here
    # runs the same graph on other data.
    compiled = torch.compile(_op(LocalReducer()), fullgraph=True, backend="aot_eager")
    xc, wc, bc = (t.clone().requires_grad_() for t in (x, w, b))
    (compiled(xc, wc, bc) * g).sum().backward()
    torch.testing.assert_close(xc.grad, dx_ref, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(wc.grad, dw_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bc.grad, db_ref, rtol=1e-9, atol=1e-9)
