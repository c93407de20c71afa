"""The torch.distributed path of the modules: DDP over gloo processes, process_group scoping."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from fsyncbn import SynchronizedBatchNorm1d, convert_model
from tests._support.distributed import spawn
from tests._support.models import TinyResNet
from tests._support.reference import informative_grad

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SPLITS = [3, 0, 5]


def _ddp_equals_global(rank, world_size):
    torch.manual_seed(0)
    model = convert_model(TinyResNet()).double()
    reference = TinyResNet().double()
    reference.load_state_dict(model.state_dict())
    ddp = DDP(model)
    x = torch.randn(sum(SPLITS), 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = informative_grad((sum(SPLITS), 5), torch.float64)
    for step in range(2):
        xs = (x + step).split(SPLITS)
        out = ddp(xs[rank])
        (out * g.split(SPLITS)[rank]).sum().backward()
        ref_out = reference(x + step)
        (ref_out * g).sum().backward()
        torch.testing.assert_close(out, ref_out.split(SPLITS)[rank], rtol=1e-9, atol=1e-9)
    # DDP averages gradients over ranks; the reference summed over the whole batch.
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad * world_size, p_ref.grad, rtol=1e-9, atol=1e-9, msg=name)
    for (name, b), b_ref in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, rtol=1e-9, atol=1e-9, msg=name)
        gathered = [torch.empty_like(b) for _ in range(world_size)]
        dist.all_gather(gathered, b)
        assert all(torch.equal(t, b) for t in gathered), f"{name} differs between ranks"

    # process_group scopes the synchronisation: ranks 0 and 1 together, rank 2 alone.
    pair, alone = dist.new_group([0, 1]), dist.new_group([2])
    bn = SynchronizedBatchNorm1d(4, process_group=pair if rank < 2 else alone).double()
    data = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    shards = [data[:2], data[2:6], data[:]]
    bn(shards[rank])
    expected = data if rank < 2 else shards[2]
    torch.testing.assert_close(bn.running_mean, 0.1 * expected.mean(0), rtol=1e-12, atol=1e-12)
    # Eval mode never synchronises: a rank may run it alone.
    if rank == 0:
        bn.eval()
        bn(torch.randn(3, 4, dtype=torch.float64))


def test_ddp_equals_one_process_on_the_whole_batch():
    spawn(3, _ddp_equals_global)


def _ddp_compiled(rank, world_size):
    import copy

    splits = [2, 3]
    torch.manual_seed(0)
    base = convert_model(TinyResNet()).double()
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(sum(splits), 3, 8, 8, dtype=torch.float64, generator=gen) for _ in range(2)]
    g = informative_grad((sum(splits), 5), torch.float64)

    def train(net, model):
        outs = []
        for x in batches:
            out = net(x.split(splits)[rank])
            net.zero_grad()
            (out * g.split(splits)[rank]).sum().backward()
            outs.append(out.detach())
        return outs, [p.grad for p in model.parameters()], list(model.buffers())

    eager_model = copy.deepcopy(base)
    eager = train(DDP(eager_model), eager_model)
    inner = copy.deepcopy(base)
    # What DDP adds to a compiled model is checked here on AOTAutograd's whole forward and
    # backward graphs ("aot_eager"): the layers' collectives inside them, and DDP's gradient
    # hooks on the compiled backward. Inductor's code for these layers is checked in
    # tests/test_compile_modules.py, and with a collective inside the graph over gloo in
    # tests/functional/test_distributed.py; compiling it again in both ranks here cost about
    # a minute of a cold suite.
    compiled_inner = torch.compile(inner, fullgraph=True, backend="aot_eager")
    assert torch._dynamo.explain(copy.deepcopy(base))(batches[0][:2]).graph_break_count == 0
    compiled = train(DDP(compiled_inner), inner)
    outer_model = copy.deepcopy(base)
    # Not fullgraph: DDP's logger breaks. DDP's graph splitting at bucket boundaries.
    outer = train(torch.compile(DDP(outer_model), backend="aot_eager"), outer_model)
    for result in (compiled, outer):
        for got, want in zip(result[0] + result[1] + result[2], eager[0] + eager[1] + eager[2], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_ddp_of_a_compiled_model_equals_eager():
    spawn(2, _ddp_compiled, timeout_s=400)
