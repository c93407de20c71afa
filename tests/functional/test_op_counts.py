"""Deterministic work per layer: the aten ops dispatched by one forward and backward.

Counted with a dispatch mode on CPU, so CI guards the op budget of the synchronised path (each
op is a kernel launch on an accelerator). Not a timing test: the counts are exact.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fsyncbn import SynchronizedBatchNorm2d
from fsyncbn.functional import LocalReducer, init_state, sync_batch_norm
from fsyncbn.functional.ops import run_batch_norm

# The synchronised path with one participant (forward, then backward), measured; a change that
# adds ops must raise these on purpose.
SYNC_FORWARD_OPS = {"pure": 26, "layer buffers": 23}
# 3 of them are autograd's own (the leaves' gradients); 2 convert between sum dy * xhat (what
# torch's CPU kernel gives) and sum dy * (x - mean) (what the wire format sends, as CUDA's does).
SYNC_BACKWARD_OPS = 18


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _count(step, *, warm: bool = True) -> tuple[OpCounter, OpCounter]:
    if warm:
        step()  # first calls may build caches
    forward, backward = OpCounter(), OpCounter()
    with forward:
        y = step(run_backward=False)
    grad = torch.randn_like(y)
    with backward:
        y.backward(grad)
    return forward, backward


@pytest.mark.parametrize("in_place", [False, True], ids=["pure", "layer buffers"])
def test_sync_path_op_budget(in_place):
    x = torch.randn(16, 8, 3, 3, requires_grad=True)
    w, b = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    state = init_state(8)

    def step(run_backward: bool = True):
        x.grad = w.grad = b.grad = None
        y, _ = run_batch_norm("sync_batch_norm", x, state, w, b, training=True, momentum=0.1,
                              eps=1e-5, reducer=LocalReducer(), eps_mode="plus", in_place=in_place)
        if run_backward:
            y.backward(torch.randn_like(y))
        return y

    forward, backward = _count(step)
    # In place, the running statistics are blended into the buffers in one foreach op per
    # step for both (_foreach_mul_, _foreach_mul, _foreach_add_), and never copied back; the
    # pure op makes new tensors with plain ops (mul, mul, add each), which torch.func batches.
    assert forward.total == SYNC_FORWARD_OPS["layer buffers" if in_place else "pure"], forward.ops
    assert backward.total == SYNC_BACKWARD_OPS, backward.ops
    assert forward.ops["aten.copy_.default"] == 0, "the state is never copied in or out"


def test_the_pure_op_leaves_its_state_alone_while_counting():
    x = torch.randn(4, 3, requires_grad=True)
    state = init_state(3)
    before = {k: v.clone() for k, v in state.items()}
    y, new_state = sync_batch_norm(x, state, reducer=LocalReducer())
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert new_state is not state and int(new_state["num_batches_tracked"]) == 1
    assert y.shape == x.shape


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_local_layer_dispatches_exactly_what_nn_batchnorm_does(training):
    torch.manual_seed(0)
    ours, theirs = SynchronizedBatchNorm2d(8), nn.BatchNorm2d(8)
    ours.train(training)
    theirs.train(training)
    x = torch.randn(4, 8, 3, 3, requires_grad=True)

    def counts(layer):
        def step(run_backward: bool = True):
            x.grad = None
            y = layer(x)
            if run_backward:
                y.backward(torch.randn_like(y))
            return y

        forward, backward = _count(step)
        return forward.total, backward.total

    ours_forward, ours_backward = counts(ours)
    theirs_forward, theirs_backward = counts(theirs)
    assert ours_backward == theirs_backward
    # Training: torch's own kernel on the buffers, exactly nn.BatchNorm's ops. Eval: torch's
    # inference kernel directly, which nn.BatchNorm reaches through its composite batch_norm.
    assert ours_forward <= theirs_forward, (ours_forward, theirs_forward)
