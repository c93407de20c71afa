"""fsyncbn.functional.batch_norm without a reducer equals torch.nn.functional.batch_norm."""

from __future__ import annotations

import pytest
import torch

from fsyncbn.functional import batch_norm, init_state
from tests._support.reference import float64_moments, informative_grad, input_grads, torch_batch_norm

SHAPES = [(6, 3), (5, 4, 7), (4, 3, 5, 6), (3, 2, 4, 3, 5)]


def _close(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}


def _run(x, state, w, b, g, **kwargs):
    x = x.detach().clone().requires_grad_()
    w = None if w is None else w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y, new_state = batch_norm(x, state, w, b, **kwargs)
    return y.detach(), input_grads(y, g, x, w, b), new_state


def _assert_same(ours, ref, dtype):
    y, grads, state = ours
    y_ref, grads_ref, state_ref = ref
    torch.testing.assert_close(y, y_ref, **_close(dtype))
    for got, want in zip(grads, grads_ref, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, **_close(dtype))
    if state_ref is None:
        assert state is None
    else:
        assert state.keys() == state_ref.keys()
        for key in state_ref:
            assert state[key].dtype == state_ref[key].dtype
            torch.testing.assert_close(state[key], state_ref[key], **_close(dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0])
@pytest.mark.parametrize("affine", [True, False])
def test_equals_torch(shape, dtype, training, momentum, affine):
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 2).to(dtype)
    w = torch.rand(c, generator=gen, dtype=torch.float64).to(dtype) + 0.5 if affine else None
    b = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype) if affine else None
    state = init_state(c, dtype=dtype)
    state["running_mean"] += torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    state["running_var"] += torch.rand(c, generator=gen, dtype=torch.float64).to(dtype)
    state["num_batches_tracked"] += 4
    g = informative_grad(shape, dtype)
    kwargs = {"training": training, "momentum": momentum}
    _assert_same(_run(x, state, w, b, g, **kwargs), torch_batch_norm(x, state, w, b, g, **kwargs), dtype)


@pytest.mark.parametrize("training", [True, False])
def test_without_state_uses_batch_statistics(training):
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    g = informative_grad(x.shape, x.dtype)
    ours = _run(x, None, w, b, g, training=training)
    _assert_same(ours, torch_batch_norm(x, None, w, b, g, training=True), torch.float64)


def test_channels_last_stays_channels_last():
    x = torch.randn(4, 3, 5, 6).to(memory_format=torch.channels_last)
    for training in (True, False):
        y, _ = batch_norm(x, init_state(3), training=training)
        assert y.is_contiguous(memory_format=torch.channels_last)
    x3 = torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d)
    y, _ = batch_norm(x3, init_state(3), training=True)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_keeps_float32_statistics(dtype):
    x64 = torch.randn(16, 4, 3, 3, dtype=torch.float64) * 2 + 1
    x = x64.to(dtype)
    state = init_state(4)
    y, new_state = batch_norm(x, state, training=True, momentum=1.0)
    assert y.dtype == dtype
    assert new_state["running_mean"].dtype == torch.float32
    mean, var, var_unbiased = float64_moments(x)
    torch.testing.assert_close(new_state["running_mean"].double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_state["running_var"].double(), var_unbiased, rtol=1e-4, atol=1e-5)
    expected = (x.double() - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)


def test_pure_never_mutates_arguments():
    x = torch.randn(6, 3, 4)
    w, b = torch.rand(3), torch.randn(3)
    state = init_state(3)
    before = [t.clone() for t in (x, w, b, *state.values())]
    for training in (True, False):
        for momentum in (0.1, None):
            for eps_mode in ("plus", "clamp"):
                y, new_state = batch_norm(
                    x, state, w, b, training=training, momentum=momentum, eps_mode=eps_mode
                )
                (y * torch.randn_like(y)).sum()
    for t, t_before in zip((x, w, b, *state.values()), before, strict=True):
        assert torch.equal(t, t_before)


def test_eval_returns_state_unchanged():
    state = init_state(3)
    state["running_mean"] += 1
    y, new_state = batch_norm(torch.randn(4, 3), state, training=False)
    for key in state:
        assert torch.equal(new_state[key], state[key])


def test_state_can_be_overwritten_before_backward():
    """A module copies the new state into its buffers before backward runs."""
    x = torch.randn(8, 3, 4, requires_grad=True)
    state = init_state(3)
    y, new_state = batch_norm(x, state, training=True)
    for key in state:
        state[key].copy_(new_state[key])
    (y * informative_grad(y.shape, y.dtype)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0)])
def test_empty_batch_like_torch(shape):
    x = torch.randn(shape, requires_grad=True)
    w = torch.rand(3, requires_grad=True)
    state = init_state(3)
    y, new_state = batch_norm(x, state, w, training=True)
    assert y.shape == x.shape
    (y * 2).sum().backward()
    assert torch.equal(w.grad, torch.zeros(3))
    assert torch.equal(new_state["running_mean"], state["running_mean"])
    assert torch.equal(new_state["running_var"], state["running_var"])
    assert int(new_state["num_batches_tracked"]) == 1  # nn.BatchNorm counts the step too


def test_one_value_per_channel_in_training_is_an_error():
    with pytest.raises(ValueError, match=r"batch_norm: expected more than 1 value per channel "
                                          r"when training, got input of shape \(1, 3\)"):
        batch_norm(torch.randn(1, 3), init_state(3), training=True)
    y, _ = batch_norm(torch.randn(1, 3), init_state(3), training=False)  # eval is fine
    assert y.shape == (1, 3)


@pytest.mark.parametrize("training", [True, False])
def test_clamp_mode_against_float64_formula(training):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, dtype=torch.float64) * torch.tensor([1e-4, 1.0, 3.0]).view(1, 3, 1).double()
    state = init_state(3, dtype=torch.float64)
    state["running_var"] = torch.tensor([1e-9, 2.0, 0.5], dtype=torch.float64)
    eps = 1e-5
    w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    y, _ = batch_norm(x, state, w, b, training=training, eps=eps, eps_mode="clamp")
    if training:
        mean, var, _ = float64_moments(x)
    else:
        mean, var = state["running_mean"], state["running_var"]
    expected = (x - mean.view(1, 3, 1)) / torch.sqrt(torch.clamp(var, min=eps)).view(1, 3, 1)
    expected = expected * w.view(1, 3, 1) + b.view(1, 3, 1)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)
    y_plus, _ = batch_norm(x, state, w, b, training=training, eps=eps)
    # Channel 0 has var << eps: the modes differ most there (clamp ignores var entirely).
    assert (y - y_plus)[:, 0].abs().max() > 1e-9


def test_init_state_matches_nn_batchnorm_buffers():
    bn = torch.nn.BatchNorm2d(5, dtype=torch.float64)
    state = init_state(5, dtype=torch.float64)
    ref = {k: v for k, v in bn.state_dict().items() if k in state}
    assert ref.keys() == state.keys()
    for key in state:
        assert state[key].dtype == ref[key].dtype and torch.equal(state[key], ref[key])


def test_init_state_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"init_state: expected num_features > 0, got 0"):
        init_state(0)
    with pytest.raises(TypeError, match=r"init_state: expected a floating dtype, got torch.int64"):
        init_state(3, dtype=torch.int64)
