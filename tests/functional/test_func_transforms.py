"""torch.func over the functional ops: vmap ensembles, grad/jacrev, functional_call."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap

from fsyncbn.functional import batch_norm, init_state, sync_batch_norm
from fsyncbn.reducers import LocalReducer
from tests._support.reference import informative_grad, torch_batch_norm


@pytest.mark.parametrize("momentum", [0.1, None])
def test_vmap_over_an_ensemble_of_states_in_training(momentum):
    members, c = 4, 3
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(members, 6, c, 5, generator=gen, dtype=torch.float64)
    weight = torch.rand(members, c, generator=gen, dtype=torch.float64)
    bias = torch.randn(members, c, generator=gen, dtype=torch.float64)
    states = [init_state(c, dtype=torch.float64) for _ in range(members)]
    for i, s in enumerate(states):
        s["running_mean"] += i
        s["num_batches_tracked"] += i
    stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}

    def member(state, w, b, xi):
        return batch_norm(xi, state, w, b, training=True, momentum=momentum)

    y, new_states = vmap(member)(stacked, weight, bias, x)
    for i in range(members):
        y_ref, new_ref = member(states[i], weight[i], bias[i], x[i])
        torch.testing.assert_close(y[i], y_ref, rtol=1e-12, atol=1e-12)
        for key in new_ref:
            torch.testing.assert_close(new_states[key][i], new_ref[key], rtol=1e-12, atol=1e-12)


def test_vmap_over_stacked_module_state():
    """An ensemble built with torch.func.stack_module_state drives the functional op."""
    models = [torch.nn.BatchNorm1d(3, dtype=torch.float64) for _ in range(3)]
    params, buffers = stack_module_state(models)
    x = torch.randn(3, 8, 3, dtype=torch.float64)

    def member(p, s, xi):
        return batch_norm(xi, s, p["weight"], p["bias"], training=True)

    y, new_states = vmap(member)(params, buffers, x)
    for i, m in enumerate(models):
        torch.testing.assert_close(y[i], m(x[i]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new_states["running_var"][i], m.running_var)


@pytest.mark.parametrize("reducer", [None, LocalReducer()], ids=["native", "sync"])
def test_grad_through_training_batch_norm(reducer):
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    g = informative_grad(x.shape, x.dtype)
    state = init_state(3, dtype=torch.float64)

    def loss(x, w, b):
        y, _ = batch_norm(x, state, w, b, training=True, reducer=reducer)
        return (y * g).sum()

    dx, dw, db = grad(loss, argnums=(0, 1, 2))(x, w, b)
    _, (dx_ref, dw_ref, db_ref), _ = torch_batch_norm(x, state, w, b, g, training=True)
    for got, want in ((dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_jacrev_through_training_batch_norm():
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    state = init_state(2, dtype=torch.float64)
    jac = jacrev(lambda x: batch_norm(x, state, training=True)[0])(x)
    assert jac.shape == (*x.shape, *x.shape)
    # Row i of the Jacobian is the gradient of output element i: compare a few with autograd.
    flat = jac.reshape(x.numel(), x.numel())
    for i in (0, 5, 17):
        xr = x.clone().requires_grad_()
        y = torch.nn.functional.batch_norm(xr, None, None, training=True)
        (row,) = torch.autograd.grad(y.reshape(-1)[i], xr)
        torch.testing.assert_close(flat[i], row.reshape(-1), rtol=1e-10, atol=1e-10)


def test_functional_call_state_dict_lines_up():
    """nn.BatchNorm's state_dict is a valid state for the functional op, and vice versa."""
    bn = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    sd = {k: v.clone() for k, v in bn.state_dict().items()}
    state = {k: sd[k].clone() for k in init_state(3)}
    y, new_state = batch_norm(x, state, sd["weight"], sd["bias"], training=True)
    y_ref = functional_call(bn, sd, (x,))  # updates the buffers in sd in place
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for key in new_state:
        torch.testing.assert_close(new_state[key], sd[key], rtol=1e-12, atol=1e-12)
    # And back: the functional new state drives the module in eval mode.
    bn.eval()
    y_eval, _ = batch_norm(x, new_state, sd["weight"], sd["bias"], training=False)
    torch.testing.assert_close(y_eval, functional_call(bn, sd, (x,)), rtol=1e-12, atol=1e-12)


def test_sync_path_under_grad_with_empty_and_full_state():
    x = torch.randn(5, 3, dtype=torch.float64)

    def loss(x):
        y, _ = sync_batch_norm(x, None, reducer=LocalReducer(), eps_mode="clamp")
        return (y * torch.arange(15, dtype=x.dtype).view(5, 3)).sum()

    dx = grad(loss)(x)
    xr = x.clone().requires_grad_()
    loss(xr).backward()
    torch.testing.assert_close(dx, xr.grad)
