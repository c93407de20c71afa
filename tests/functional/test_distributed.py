"""Sharded equals global over real gloo processes with ProcessGroupReducer."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fsyncbn.functional import init_state, sync_batch_norm
from fsyncbn.reducers import ProcessGroupReducer
from tests._support.distributed import spawn
from tests._support.reference import (
    float64_training_batch_norm,
    informative_grad,
    nearly_constant_channel,
    torch_batch_norm,
)

pytestmark = pytest.mark.distributed

SPLITS = [3, 0, 5]


class CountingReducer:
    def __init__(self, inner):
        self.inner, self.sizes = inner, []

    def __call__(self, t):
        self.sizes.append(t.numel())
        return self.inner(t)


def _sharded_equals_global(rank, world_size):
    for dtype, layout, momentum in ((torch.float64, torch.contiguous_format, 0.1),
                                    (torch.float64, torch.contiguous_format, None),
                                    (torch.float32, torch.channels_last, 0.1)):
        gen = torch.Generator().manual_seed(11)
        c = 4
        x = (torch.randn(sum(SPLITS), c, 3, 5, generator=gen, dtype=torch.float64) * 2 + 1)
        x = x.to(dtype).contiguous(memory_format=layout)
        w = torch.rand(c, generator=gen, dtype=torch.float64).to(dtype) + 0.5
        b = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
        g = informative_grad(x.shape, dtype)
        state = init_state(c, dtype=dtype)
        state["num_batches_tracked"] += 3
        y_ref, (dx_ref, dw_ref, db_ref), state_ref = torch_batch_norm(
            x, state, w, b, g, training=True, momentum=momentum)

        xi = x.split(SPLITS)[rank].clone().requires_grad_()
        wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
        reducer = CountingReducer(ProcessGroupReducer())
        y, new_state = sync_batch_norm(xi, state, wi, bi, reducer=reducer, momentum=momentum)
        (y * g.split(SPLITS)[rank]).sum().backward()

        tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(y, y_ref.split(SPLITS)[rank], **tol)
        torch.testing.assert_close(xi.grad, dx_ref.split(SPLITS)[rank], **tol)
        for key in state_ref:
            torch.testing.assert_close(new_state[key], state_ref[key], **tol)
        grads = torch.cat([wi.grad, bi.grad])
        dist.all_reduce(grads)
        torch.testing.assert_close(grads, torch.cat([dw_ref, db_ref]), **tol)
        assert reducer.sizes == [2 * c + 4, 2 * c], reducer.sizes


@pytest.mark.slow
def test_sharded_equals_global_over_gloo():
    spawn(3, _sharded_equals_global)


def _global_errors(rank, world_size):
    # One value in total while training: every rank raises, none hangs.
    x = torch.randn(1 if rank == 0 else 0, 3)
    with pytest.raises(ValueError, match=r"sync_batch_norm: expected more than 1 value per "
                                         r"channel when training, got 1 over all 2 participants"):
        sync_batch_norm(x, init_state(3), reducer=ProcessGroupReducer())
    # The reducer is differentiable: its backward sums the gradients over the ranks.
    t = torch.full((3,), float(rank + 1), requires_grad=True)
    total = ProcessGroupReducer()(t)
    torch.testing.assert_close(total, torch.full((3,), 3.0))
    (total * (rank + 1)).sum().backward()
    torch.testing.assert_close(t.grad, torch.full((3,), 3.0))
    # eps_mode="clamp", sharded over the ranks: the float64 formula differentiated through the
    # clamp, on the whole batch, with a nearly constant channel.
    x = nearly_constant_channel((7, 3, 2))
    w, g = torch.rand(3, dtype=torch.float64) + 0.5, informative_grad((7, 3, 2), torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = float64_training_batch_norm(xr, wr, None, eps=1e-5, eps_mode="clamp")
    (y_ref * g).sum().backward()
    splits = [4, 3]
    xi, wi = x.split(splits)[rank].clone().requires_grad_(), w.clone().requires_grad_()
    y, _ = sync_batch_norm(xi, None, wi, reducer=ProcessGroupReducer(), eps_mode="clamp")
    (y * g.split(splits)[rank]).sum().backward()
    torch.testing.assert_close(y, y_ref.detach().split(splits)[rank], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(xi.grad, xr.grad.split(splits)[rank], rtol=1e-7, atol=1e-7)
    dw = wi.grad.clone()
    dist.all_reduce(dw)
    torch.testing.assert_close(dw, wr.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_global_errors_and_reducer_gradient_over_gloo():
    spawn(2, _global_errors)


def _compiled_over_gloo(rank, world_size):
    """sync_batch_norm with ProcessGroupReducer under torch.compile(fullgraph=True)."""

    def step(x, state, w, b):
        return sync_batch_norm(x, state, w, b, reducer=ProcessGroupReducer())

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(sum(SPLITS), 4, 3, generator=gen, dtype=torch.float64)
    w, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    g = informative_grad(x.shape, x.dtype)
    state = init_state(4, dtype=torch.float64)
    assert torch._dynamo.explain(step)(x.split(SPLITS)[rank], state, w, b).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    y_ref, (dx_ref, _, _), state_ref = torch_batch_norm(x, state, w, b, g, training=True)
    xi = x.split(SPLITS)[rank].clone().requires_grad_()
    y, new_state = compiled(xi, state, w, b)
    (y * g.split(SPLITS)[rank]).sum().backward()
    torch.testing.assert_close(y, y_ref.split(SPLITS)[rank], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(xi.grad, dx_ref.split(SPLITS)[rank], rtol=1e-9, atol=1e-9)
    for key in state_ref:
        torch.testing.assert_close(new_state[key], state_ref[key], rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_compiled_sync_batch_norm_over_gloo():
    spawn(3, _compiled_over_gloo, timeout_s=300)
