"""Models holding fsyncbn layers under torch.compile, TorchScript and torch.export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fsyncbn import (
    SyncBatchNorm,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
    convert_model,
)
from tests._support.models import TinyResNet

pytestmark = pytest.mark.slow


def _model(dtype=torch.float32, **bn_kwargs):
    torch.manual_seed(0)
    return convert_model(nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, **bn_kwargs), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5, **bn_kwargs),
    )).to(dtype)


# Inductor's code generation runs where it differs (default, layout, float64, autocast); the layer
# options change only the traced graph, which "aot_eager" checks whole (Dynamo with fullgraph=True and
# AOTAutograd's forward and backward graphs) at a fraction of the compile time.
CONFIGS = {
    "default": ({}, torch.float32, torch.contiguous_format, None, "inductor"),
    "momentum-none": ({"momentum": None}, torch.float32, torch.contiguous_format, None, "aot_eager"),
    "no-running-stats": ({"track_running_stats": False}, torch.float32, torch.contiguous_format, None,
                         "aot_eager"),
    "not-affine": ({"affine": False}, torch.float32, torch.contiguous_format, None, "aot_eager"),
    "channels-last": ({}, torch.float32, torch.channels_last, None, "inductor"),
    "float64": ({"momentum": None}, torch.float64, torch.contiguous_format, None, "inductor"),
    "autocast-bfloat16": ({}, torch.float32, torch.contiguous_format, torch.bfloat16, "inductor"),
    "autocast-float16": ({}, torch.float32, torch.contiguous_format, torch.float16, "aot_eager"),
}


def _steps(model, inputs, grads, autocast):
    """Training steps (then one eval step): outputs, parameter grads, buffers after each."""
    record = []
    for i, (x, g) in enumerate(zip(inputs, grads, strict=True)):
        model.train(i < len(inputs) - 1)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = model(x)
        if model.training:
            model.zero_grad()
            (out.float() * g).sum().backward()
        record.append((out.detach().float(),
                       [p.grad.clone() for p in model.parameters() if p.grad is not None],
                       [b.clone() for b in model.buffers()]))
    return record


@pytest.mark.parametrize("config", CONFIGS)
def test_compiled_equals_eager_without_graph_breaks(config):
    bn_kwargs, dtype, layout, autocast, backend = CONFIGS[config]
    eager = _model(dtype, **bn_kwargs)
    compiled_model = copy.deepcopy(eager)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(6, 3, 8, 8, generator=gen, dtype=dtype).contiguous(memory_format=layout)
              for _ in range(4)]
    grads = [torch.randn(6, 5, generator=gen) for _ in range(4)]
    torch._dynamo.reset()
    for training in (True, False):
        probe = copy.deepcopy(eager).train(training)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            assert torch._dynamo.explain(probe)(inputs[0]).graph_break_count == 0
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for (out_e, g_e, b_e), (out_c, g_c, b_c) in zip(
        _steps(eager, inputs, grads, autocast), _steps(compiled, inputs, grads, autocast), strict=True
    ):
        for c, e in zip([out_c, *g_c, *b_c], [out_e, *g_e, *b_e], strict=True):
            if autocast is None:
                torch.testing.assert_close(c, e, **tol)
            else:  # reduced precision: compare the error to the tensor's size, not elementwise
                e = e.float()
                assert (c.float() - e).norm() <= 2e-2 * e.norm() + 1e-3


def test_a_compiled_model_compiles_once():
    """Training steps reuse the first graph: nothing the layer caches between calls (such as the
    configuration its argument checks validated) may fail a guard and recompile the model."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(_model(), backend=counter, fullgraph=True)
    for _ in range(3):
        out = compiled(torch.randn(6, 3, 8, 8))
        (out * torch.randn_like(out)).sum().backward()
    assert counter.frame_count == 1


SCRIPTABLE = [
    (SynchronizedBatchNorm1d, (6, 4, 5)),
    (SynchronizedBatchNorm2d, (6, 4, 3, 3)),
    (SynchronizedBatchNorm3d, (6, 4, 2, 3, 3)),
    (SyncBatchNorm, (6, 4, 3)),
]


@pytest.mark.parametrize(("cls", "shape"), SCRIPTABLE, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torchscript_equals_eager(cls, shape, momentum):
    eager = cls(4, momentum=momentum, dtype=torch.float64)
    scripted = torch.jit.script(copy.deepcopy(eager))
    x = torch.randn(shape, dtype=torch.float64)
    for training in (True, True, False):
        eager.train(training)
        scripted.train(training)
        torch.testing.assert_close(scripted(x), eager(x), rtol=1e-12, atol=1e-12)
        for b_s, b_e in zip(scripted.buffers(), eager.buffers(), strict=True):
            torch.testing.assert_close(b_s, b_e, rtol=1e-12, atol=1e-12)


def test_torchscript_of_a_converted_model_and_clamp_mode():
    eager = convert_model(TinyResNet()).double()
    scripted = torch.jit.script(copy.deepcopy(eager))
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for training in (True, False):
        eager.train(training)
        scripted.train(training)
        torch.testing.assert_close(scripted(x), eager(x), rtol=1e-12, atol=1e-12)
    clamp = torch.jit.script(SynchronizedBatchNorm1d(3, eps_mode="clamp"))
    with pytest.raises(torch.jit.Error, match="supports eps_mode .plus. only"):
        clamp(torch.randn(4, 3))


@pytest.mark.parametrize("training", [True, False])
def test_export_equals_eager(training):
    eager = convert_model(TinyResNet()).train(training)
    exported_source = copy.deepcopy(eager)
    x = torch.randn(4, 3, 8, 8)
    program = torch.export.export(exported_source, (x,))
    module = program.module()
    for _ in range(2):
        torch.testing.assert_close(module(x), eager(x), rtol=1e-5, atol=1e-5)
    eager_buffers = dict(eager.named_buffers())
    for name, value in module.named_buffers():
        torch.testing.assert_close(value, eager_buffers[name], rtol=1e-5, atol=1e-5)


def test_compiled_replicas_equal_eager_replicas_without_graph_breaks():
    """Compiling inside the replicas: the replica exchange is one opaque op in the graph."""
    from fsyncbn import DataParallelWithCallback
    from tests._support.replica_threads import replicate, run_replicas
    from tests._support.threads import raise_first

    splits = [2, 4]
    eager_model = _model(torch.float64)
    compiled_model = copy.deepcopy(eager_model)
    eager_replicas = replicate(eager_model, 2)
    compiled_replicas = replicate(compiled_model, 2)
    # The graph is what this checks (the exchange one opaque op, no break, the same numbers),
    # which "aot_eager" runs whole; Inductor lowers fsyncbn's opaque ops in the tests above and
    # in tests/test_inplace_abn.py.
    compiled = [torch.compile(r, fullgraph=True, backend="aot_eager") for r in compiled_replicas]
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):  # the second step reuses the graphs: new groups, same compiled code
        x = torch.randn(sum(splits), 3, 8, 8, dtype=torch.float64, generator=gen)
        g = torch.randn(sum(splits), 5, dtype=torch.float64, generator=gen)

        def backward(i, out, g=g):
            (out * g.split(splits)[i]).sum().backward()
            return out.detach()

        eager = raise_first(run_replicas(eager_replicas, x.split(splits), backward, timeout=120))
        comp = raise_first(run_replicas(compiled_replicas, x.split(splits), backward, timeout=120,
                                        callables=compiled))
        torch.testing.assert_close(torch.cat(comp), torch.cat(eager), rtol=1e-9, atol=1e-9)
        for r_c, r_e in zip(compiled_replicas, eager_replicas, strict=True):
            for p_c, p_e in zip(r_c.parameters(), r_e.parameters(), strict=True):
                torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-9, atol=1e-9)
        for b_c, b_e in zip(compiled_model.buffers(), eager_model.buffers(), strict=True):
            torch.testing.assert_close(b_c, b_e, rtol=1e-9, atol=1e-9)
    # And DataParallelWithCallback around a compiled model (with fewer than 2 devices:
    # the module itself, on the first GPU if there is one).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dp = DataParallelWithCallback(torch.compile(copy.deepcopy(eager_model).to(device), fullgraph=True))
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, device=device)
    torch.testing.assert_close(dp(x), copy.deepcopy(eager_model).to(device)(x), rtol=1e-9, atol=1e-9)
