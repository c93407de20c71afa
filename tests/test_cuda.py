"""CUDA: parity with cuDNN batch norm, no host synchronisation in the sync path, CUDA graphs.

Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsyncbn import SynchronizedBatchNorm2d
from fsyncbn.functional import batch_norm, init_state, sync_batch_norm
from fsyncbn.reducers import LocalReducer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("reducer", [None, LocalReducer()], ids=["native", "sync"])
def test_equals_cudnn(dtype, layout, reducer):
    x = (torch.randn(8, 16, 7, 7, device="cuda") * 3 + 1).to(dtype).contiguous(memory_format=layout)
    w = torch.rand(16, device="cuda") + 0.5
    b = torch.randn(16, device="cuda")
    g = torch.randn_like(x)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [w.clone().requires_grad_() for _ in range(2)]
    state = init_state(16, device="cuda")
    y, new_state = batch_norm(xs[0], state, ws[0], b, training=True, reducer=reducer)
    rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
    y_ref = F.batch_norm(xs[1], rm, rv, ws[1], b, training=True)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert y.dtype == dtype and y.is_contiguous(memory_format=layout)
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    torch.testing.assert_close(xs[0].grad.float(), xs[1].grad.float(), **tol)
    torch.testing.assert_close(ws[0].grad, ws[1].grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(new_state["running_mean"], rm, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_state["running_var"], rv, rtol=1e-3, atol=1e-3)


def test_sync_path_never_synchronises_the_host():
    x = torch.randn(8, 16, 7, 7, device="cuda", requires_grad=True)
    state = init_state(16, device="cuda")
    sync_batch_norm(x, state, reducer=LocalReducer())  # warm-up (allocations, lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for momentum in (0.1, None):
            y, state = sync_batch_norm(x, state, reducer=LocalReducer(), momentum=momentum)
            (y * y).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_captures_a_synchronised_training_step():
    x_static = torch.randn(8, 16, 5, 5, device="cuda")
    w = torch.rand(16, device="cuda", requires_grad=True)
    g_static = torch.randn(8, 16, 5, 5, device="cuda")
    state = init_state(16, device="cuda")
    buffers = {k: v.clone() for k, v in state.items()}

    def step():
        x = x_static.clone().requires_grad_()
        y, new_state = sync_batch_norm(x, buffers, w, reducer=LocalReducer(), momentum=None)
        (y * g_static).sum().backward()
        for key, value in new_state.items():
            buffers[key].copy_(value)
        return y, x.grad

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up outside the graph
            w.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for key in buffers:
        buffers[key].copy_(state[key])
    graph = torch.cuda.CUDAGraph()
    w.grad = None
    with torch.cuda.graph(graph):
        y_static, dx_static = step()
    for key in buffers:
        buffers[key].copy_(state[key])
    reference_state = {k: v.clone() for k, v in state.items()}
    for _ in range(3):
        x_static.copy_(torch.randn_like(x_static))
        graph.replay()
        xr = x_static.clone().requires_grad_()
        y_ref, reference_state = sync_batch_norm(
            xr, reference_state, w.detach(), reducer=LocalReducer(), momentum=None
        )
        (y_ref * g_static).sum().backward()
        torch.testing.assert_close(y_static, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx_static, xr.grad, rtol=1e-5, atol=1e-5)
        for key in buffers:
            torch.testing.assert_close(buffers[key], reference_state[key], rtol=1e-5, atol=1e-5)


def test_module_on_cuda_equals_nn_batchnorm_and_compiles():
    torch.manual_seed(0)
    ours = SynchronizedBatchNorm2d(16).cuda()
    ref = torch.nn.BatchNorm2d(16).cuda()
    x = torch.randn(8, 16, 7, 7, device="cuda")
    for _ in range(2):
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(SynchronizedBatchNorm2d(16).cuda(), fullgraph=True)
    torch.testing.assert_close(compiled(x), torch.nn.BatchNorm2d(16).cuda()(x), rtol=1e-4, atol=1e-4)


def test_header_check_on_cuda_is_an_async_assert():
    y, _ = sync_batch_norm(torch.randn(4, 3, device="cuda"), None, reducer=LocalReducer())
    assert y.shape == (4, 3)


def test_replicas_on_cuda_equal_one_model_on_the_whole_batch():
    import copy

    from tests._support.replica_threads import replicate, run_replicas
    from tests._support.threads import raise_first

    torch.manual_seed(0)
    model = SynchronizedBatchNorm2d(4).cuda()
    reference = copy.deepcopy(model)
    x = torch.randn(6, 4, 3, 3, device="cuda")
    outs = raise_first(run_replicas(replicate(model, 2), list(x.split([2, 4]))))
    torch.testing.assert_close(torch.cat(outs), torch.nn.functional.batch_norm(
        x, reference.running_mean.clone(), reference.running_var.clone(), training=True
    ) * model.weight.detach().view(1, -1, 1, 1) + model.bias.detach().view(1, -1, 1, 1),
        rtol=1e-4, atol=1e-4)
    assert int(model.num_batches_tracked) == 1


@pytest.fixture(autouse=True)
def no_fallback():
    """On a GPU a fallback from the CUDA sync path is a failure, not a warning."""
    import warnings

    from fsyncbn.functional.paths import cuda_sync

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*CUDA sync path.*", category=RuntimeWarning)
        yield
    assert not cuda_sync._failed, cuda_sync._failed


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("eps_mode", ["plus", "clamp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sync_path_equals_the_composed_path(layout, eps_mode, dtype, monkeypatch):
    """torch's CUDA sync kernels with the Triton glue against the composed path, same data."""
    from fsyncbn.functional.ops import choose_path

    x = (torch.randn(16, 32, 9, 9, device="cuda") * 2 + 5).to(dtype).contiguous(memory_format=layout)
    x[:, 3] = 1 + 1e-4 * x[:, 3]  # a nearly constant channel: clamped in clamp mode
    w, b, g = torch.rand(32, device="cuda") + 0.5, torch.randn(32, device="cuda"), torch.randn_like(x)
    results = []
    for path in ("cuda_sync", "composed"):
        if path == "composed":
            monkeypatch.setenv("FSYNCBN_FUSED", "0")
        state = init_state(32, device="cuda")
        assert choose_path(x, state, w, b, training=True, momentum=None, reducer=LocalReducer(),
                           eps_mode=eps_mode) == path
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y, state = sync_batch_norm(xs, state, ws, bs, reducer=LocalReducer(), eps_mode=eps_mode,
                                   momentum=None)
        (y.float() * g.float()).sum().backward()
        assert y.dtype == dtype and y.is_contiguous(memory_format=layout)
        results.append((y, xs.grad, ws.grad, bs.grad, state["running_mean"], state["running_var"]))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 10)


def test_one_synchronised_layer_step_launches_at_most_16_kernels():
    """Every CUDA kernel of one forward and backward on a 1-rank NCCL group, collectives and
    gradient accumulation included (torch.nn.SyncBatchNorm's path: about 30)."""
    import os

    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from fsyncbn.reducers import ProcessGroupReducer
    from tests._support.distributed import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        x = torch.randn(32, 64, 14, 14, device="cuda", requires_grad=True)
        w = torch.ones(64, device="cuda", requires_grad=True)
        b = torch.zeros(64, device="cuda", requires_grad=True)
        state = init_state(64, device="cuda")
        reducer = ProcessGroupReducer()
        g = torch.randn_like(x)

        def step():
            y, _ = batch_norm(x, state, w, b, training=True, reducer=reducer)
            y.backward(g)

        for _ in range(3):
            step()  # size checks, autotuning, gradient buffers
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert len(kernels) <= 16, [e.name for e in kernels]
    finally:
        dist.destroy_process_group()
