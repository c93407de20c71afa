"""The functional ops under torch.compile(fullgraph=True): no graph break, same results."""

from __future__ import annotations

import pytest
import torch

from fsyncbn.functional import batch_norm, init_state, sync_batch_norm
from fsyncbn.reducers import LocalReducer
from tests._support.reference import informative_grad, nearly_constant_channel

pytestmark = pytest.mark.slow

CASES = {
    "local": {"reducer": None},
    "local-cumulative": {"reducer": None, "momentum": None},
    "sync": {"reducer": LocalReducer()},
    "sync-cumulative-clamp": {"reducer": LocalReducer(), "momentum": None, "eps_mode": "clamp"},
}


@pytest.mark.parametrize("case", CASES)
def test_compiled_equals_eager_without_graph_breaks(case):
    kwargs = CASES[case]

    def step(x, state, w, b):
        return batch_norm(x, state, w, b, training=True, **kwargs)

    # Channel 1's variance is far below eps: in clamp mode Inductor's code runs the branch where
    # the normalising variance is the constant eps (and its gradient term drops out).
    x = nearly_constant_channel((6, 3, 4, 4))
    w = torch.rand(3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    state = init_state(3, dtype=torch.float64)
    torch._dynamo.reset()
    assert torch._dynamo.explain(step)(x, state, w, b).graph_break_count == 0
    compiled = torch.compile(step, fullgraph=True)
    g = informative_grad(x.shape, x.dtype)
    eager_state = compiled_state = state
    for _ in range(3):
        results = []
        for fn, st in ((step, eager_state), (compiled, compiled_state)):
            xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
            y, new_state = fn(xi, st, wi, bi)
            (y * g).sum().backward()
            results.append((y.detach(), xi.grad, wi.grad, bi.grad, new_state))
        (*eager, eager_state), (*comp, compiled_state) = results
        for e, c in zip(eager, comp, strict=True):
            torch.testing.assert_close(c, e, rtol=1e-9, atol=1e-9)
        for key in eager_state:
            torch.testing.assert_close(compiled_state[key], eager_state[key], rtol=1e-9, atol=1e-9)


def test_header_check_is_an_async_assert_under_compile():
    compiled = torch.compile(
        lambda x: sync_batch_norm(x, None, reducer=LocalReducer())[0], fullgraph=True
    )
    assert compiled(torch.randn(4, 3)).shape == (4, 3)
    with pytest.raises(RuntimeError, match="expected more than 1 value per channel when training"):
        compiled(torch.randn(1, 3))


LAYOUTS = {
    "(N, C)": ((8, 3), torch.contiguous_format),
    "(N, C, H, W)": ((6, 3, 4, 4), torch.contiguous_format),
    "channels_last": ((6, 3, 4, 4), torch.channels_last),
    "channels_last_3d": ((4, 3, 2, 3, 3), torch.channels_last_3d),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_sync_path_equals_eager_in_every_layout(layout):
    """Channels-innermost layouts take torch's kernels as opaque ops when compiled on CPU."""
    shape, memory_format = LAYOUTS[layout]
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=memory_format)
    w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    state = init_state(3, dtype=torch.float64)
    g = informative_grad(shape, torch.float64).contiguous(memory_format=memory_format)

    def step(x, w, b):
        return sync_batch_norm(x, state, w, b, reducer=LocalReducer())

    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        y, new_state = fn(xi, wi, bi)
        (y * g).sum().backward()
        results.append((y.detach(), xi.grad, wi.grad, bi.grad, *new_state.values()))
    assert results[1][0].stride() == results[0][0].stride()  # the layout is kept
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=1e-9)
