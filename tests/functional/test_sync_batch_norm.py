"""Sharded equals global: sync_batch_norm over participants (threads) equals batch norm on
the concatenated batch."""

from __future__ import annotations

import pytest
import torch

from fsyncbn.functional import SynchronizationError, batch_norm, init_state, sync_batch_norm
from tests._support.reference import float64_moments, informative_grad, torch_batch_norm
from tests._support.threads import ThreadGroup, raise_first, run_threads


def _sharded(x, state, w, b, g, splits, *, group=None, **kwargs):
    """Run sync_batch_norm with one thread per slice; return per-rank (y, grads, state)."""
    group = group or ThreadGroup(len(splits))
    xs, gs = x.split(splits), g.split(splits)

    def participant(rank):
        xi = xs[rank].detach().clone().requires_grad_()
        wi = None if w is None else w.detach().clone().requires_grad_()
        bi = None if b is None else b.detach().clone().requires_grad_()
        y, new_state = sync_batch_norm(xi, state, wi, bi, reducer=group.reducer(rank), **kwargs)
        (y * gs[rank]).sum().backward()
        grads = (xi.grad, None if wi is None else wi.grad, None if bi is None else bi.grad)
        return y.detach(), grads, new_state

    return raise_first(run_threads(len(splits), participant)), group


def _check_sharded_equals_global(results, ref, splits, tol):
    y_ref, (dx_ref, dw_ref, db_ref), state_ref = ref
    close = {"rtol": tol, "atol": tol}
    for (y, (dx, _, _), state), y_want, dx_want in zip(
        results, y_ref.split(splits), dx_ref.split(splits), strict=True
    ):
        torch.testing.assert_close(y, y_want, **close)
        torch.testing.assert_close(dx, dx_want, **close)
        if state_ref is None:
            assert state is None
        else:
            for key in state_ref:
                torch.testing.assert_close(state[key], state_ref[key], **close)
    if dw_ref is not None:
        torch.testing.assert_close(sum(r[1][1] for r in results), dw_ref, **close)
        torch.testing.assert_close(sum(r[1][2] for r in results), db_ref, **close)


@pytest.mark.parametrize(
    "splits", [[5, 3], [4, 0, 3], [1, 6, 0, 2], [0, 2, 2, 5]], ids=lambda s: "-".join(map(str, s))
)
@pytest.mark.parametrize("shape_tail", [(3,), (3, 5), (3, 4, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_sharded_equals_global_float64(splits, shape_tail, momentum):
    gen = torch.Generator().manual_seed(sum(splits) + len(shape_tail))
    shape = (sum(splits), *shape_tail)
    c = shape_tail[0]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 - 1
    w = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=gen, dtype=torch.float64)
    state = init_state(c, dtype=torch.float64)
    state["num_batches_tracked"] += 2
    g = informative_grad(shape, torch.float64)
    results, _ = _sharded(x, state, w, b, g, splits, momentum=momentum)
    ref = torch_batch_norm(x, state, w, b, g, training=True, momentum=momentum)
    _check_sharded_equals_global(results, ref, splits, 1e-9)


def test_sharded_equals_global_float32_channels_last_no_affine():
    splits = [3, 0, 4]
    x = torch.randn(7, 4, 5, 5).to(memory_format=torch.channels_last)
    g = informative_grad(x.shape, x.dtype)
    state = init_state(4)
    results, _ = _sharded(x, state, None, None, g, splits)
    ref = torch_batch_norm(x, state, None, None, g, training=True)
    _check_sharded_equals_global(results, ref, splits, 1e-5)
    for y, _, _ in results:
        if y.numel():  # an empty slice has no layout to keep
            assert y.is_contiguous(memory_format=torch.channels_last)


def test_sharded_without_state():
    splits = [2, 5]
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    g = informative_grad(x.shape, x.dtype)
    w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    results, _ = _sharded(x, None, w, b, g, splits)
    _check_sharded_equals_global(results, torch_batch_norm(x, None, w, b, g, training=True),
                                 splits, 1e-9)


def test_clamp_mode_sharded_equals_local_clamp():
    splits = [3, 2, 0]
    x = torch.randn(5, 3, 4, dtype=torch.float64) * torch.tensor([1e-4, 1, 2]).view(1, 3, 1).double()
    w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    g = informative_grad(x.shape, x.dtype)
    state = init_state(3, dtype=torch.float64)
    results, _ = _sharded(x, state, w, b, g, splits, eps_mode="clamp")
    # Reference: the same op on one participant holding all the data (no reducer at all).
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y_ref, state_ref = batch_norm(xr, state, wr, br, training=True, eps_mode="clamp")
    (y_ref * g).sum().backward()
    ref = (y_ref.detach(), (xr.grad, wr.grad, br.grad), state_ref)
    _check_sharded_equals_global(results, ref, splits, 1e-9)


def test_one_sum_forward_one_backward_independent_of_world_size():
    c = 6
    sizes = {}
    for world in (2, 3, 4):
        x = torch.randn(2 * world, c, 3)
        g = informative_grad(x.shape, x.dtype)
        _, group = _sharded(x, init_state(c), torch.ones(c), torch.zeros(c), g, [2] * world)
        for rank in range(world):
            assert group.sums[rank] == [(2 * c + 4,), (2 * c,)], group.sums[rank]
        sizes[world] = group.sums[0]
    assert sizes[2] == sizes[3] == sizes[4]


def test_empty_participant_still_takes_part_in_both_sums():
    x = torch.randn(4, 3, 2)
    g = informative_grad(x.shape, x.dtype)
    _, group = _sharded(x, init_state(3), None, None, g, [0, 4, 0])
    assert [len(s) for s in group.sums] == [2, 2, 2]


def test_every_participant_empty_gives_empty_outputs_and_keeps_running_stats():
    state = init_state(3)
    state["running_mean"] += 0.5
    group = ThreadGroup(3)

    def participant(rank):
        x = torch.randn(0, 3, 4, requires_grad=True)
        w = torch.ones(3, requires_grad=True)
        y, new_state = sync_batch_norm(x, state, w, reducer=group.reducer(rank))
        (y * 2).sum().backward()
        return y, new_state, w.grad

    for y, new_state, w_grad in raise_first(run_threads(3, participant)):
        assert y.shape == (0, 3, 4)
        assert torch.equal(new_state["running_mean"], state["running_mean"])
        assert torch.equal(new_state["running_var"], state["running_var"])
        assert torch.equal(w_grad, torch.zeros(3))
        assert torch.isfinite(new_state["running_var"]).all()


def test_one_value_in_total_while_training_raises_everywhere():
    group = ThreadGroup(3)

    def participant(rank):
        x = torch.randn(1 if rank == 1 else 0, 3)
        return sync_batch_norm(x, init_state(3), reducer=group.reducer(rank))

    results = run_threads(3, participant)
    for r in results:
        assert isinstance(r, ValueError)
        assert "sync_batch_norm: expected more than 1 value per channel when training, got 1 over " \
               "all 3 participants" in str(r)


def test_disagreeing_channel_counts_are_caught_by_the_header():
    # A gloo-like transport sums the overlap of unequal tensors without complaint; with
    # channels (2, 4, 3) the middle participant's C equals the mean, so only C*C reveals it.
    group = ThreadGroup(3, overlap=True)
    channels = [2, 4, 3]

    def participant(rank):
        c = channels[rank]
        return sync_batch_norm(torch.randn(4, c), init_state(c), reducer=group.reducer(rank))

    for rank, r in enumerate(run_threads(3, participant)):
        assert isinstance(r, SynchronizationError), r
        assert f"sync_batch_norm: participants disagree on the number of channels: this one " \
               f"has {channels[rank]}" in str(r)


def test_offset_data_keeps_its_variance():
    """Float32 data with mean 1e4 and std 1 over 3 uneven participants."""
    splits = [7, 2, 11]
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(sum(splits), 4, 8, 8, generator=gen, dtype=torch.float64) + 1e4).float()
    group = ThreadGroup(3)
    xs = x.split(splits)

    def participant(rank):
        return sync_batch_norm(xs[rank], init_state(4), reducer=group.reducer(rank), momentum=1.0)

    _, _, var_unbiased = float64_moments(x)
    for _, state in raise_first(run_threads(3, participant)):
        rel = ((state["running_var"].double() - var_unbiased).abs() / var_unbiased).max()
        assert rel < 1e-3, rel
    # The naive float32 E[x^2] - E[x]^2 would have lost it all:
    naive = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2
    assert ((naive.double() - var_unbiased).abs() / var_unbiased).max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_sums_in_float32_or_wider(dtype):
    splits = [3, 5]
    x = (torch.randn(8, 3, 4, dtype=torch.float64) * 4 + 3)
    seen = []
    group = ThreadGroup(2)
    xs = x.to(dtype).split(splits)

    def participant(rank):
        inner = group.reducer(rank)

        def reducer(t):
            seen.append(t.dtype)
            return inner(t)

        xi = xs[rank].clone().requires_grad_()
        y, state = sync_batch_norm(xi, init_state(3), reducer=reducer, momentum=1.0)
        (y.float() * g.split(splits)[rank]).sum().backward()
        return y, state, xi.grad

    g = informative_grad(x.shape, torch.float32)
    results = raise_first(run_threads(2, participant))
    assert set(seen) <= {torch.float32, torch.float64}
    _, _, var_unbiased = float64_moments(x.to(dtype))
    # Reference: float64 batch norm on the same (rounded) values.
    y_ref, (dx_ref, _, _), _ = torch_batch_norm(x.to(dtype).double(), None, None, None, g.double(),
                                                training=True)
    for (y, state, dx), y_want, dx_want in zip(results, y_ref.split(splits), dx_ref.split(splits),
                                               strict=True):
        assert y.dtype == dtype and dx.dtype == dtype
        torch.testing.assert_close(state["running_var"].double(), var_unbiased, rtol=1e-4, atol=1e-4)
        tol = 1e-2 if dtype == torch.float16 else 4e-2  # the rounding of the output dtype
        assert (y.double() - y_want).abs().max() <= tol * y_want.abs().max()
        assert (dx.double() - dx_want).abs().max() <= tol * dx_want.abs().max()


def test_batch_norm_with_reducer_is_sync_batch_norm():
    x = torch.randn(6, 3, 2, dtype=torch.float64)
    splits = [4, 2]
    outs = {}
    for name, op in (("batch_norm", batch_norm), ("sync_batch_norm", sync_batch_norm)):
        group = ThreadGroup(2)
        xs = x.split(splits)
        outs[name] = raise_first(run_threads(2, lambda r, op=op, group=group, xs=xs: op(
            xs[r], init_state(3, dtype=torch.float64), training=True, reducer=group.reducer(r))))
    for (y1, s1), (y2, s2) in zip(outs["batch_norm"], outs["sync_batch_norm"], strict=True):
        assert torch.equal(y1, y2)
        assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_eval_mode_performs_no_sum():
    calls = []

    def reducer(t):
        calls.append(t.shape)
        return t

    state = init_state(3)
    sync_batch_norm(torch.randn(4, 3), state, reducer=reducer, training=False)
    assert calls == []
