"""The benchmark cases of the README: speed (a, b), memory (c), DDP (d), communication (e)."""

from __future__ import annotations

import copy
import datetime
import gc
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from benchmarks.timing import compare
from fsyncbn import SynchronizedBatchNorm1d, SynchronizedBatchNorm2d, convert_model
from fsyncbn.functional import sync_batch_norm
from fsyncbn.functional.ops import run_batch_norm

SHAPES = {
    "2d (32, 64, 28, 28)": ((32, 64, 28, 28), torch.contiguous_format),
    "2d (32, 64, 28, 28) channels_last": ((32, 64, 28, 28), torch.channels_last),
    "2d (64, 256, 7, 7)": ((64, 256, 7, 7), torch.contiguous_format),
    "1d (1024, 512)": ((1024, 512), torch.contiguous_format),
}


class ForcedSync(nn.Module):
    """A batch-norm layer forced through the synchronised path with one participant (an identity
    reducer), its buffers written in place as a synchronized layer does under DDP."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        state = {"running_mean": bn.running_mean, "running_var": bn.running_var,
                 "num_batches_tracked": bn.num_batches_tracked}
        y, _ = run_batch_norm("sync_batch_norm", x, state, bn.weight, bn.bias, training=True,
                              momentum=bn.momentum, eps=bn.eps, reducer=_identity, eps_mode="plus",
                              in_place=True)
        return y


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _layers(shape, device):
    c = shape[1]
    torch_cls = nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d
    ours_cls = SynchronizedBatchNorm1d if len(shape) == 2 else SynchronizedBatchNorm2d
    return torch_cls(c).to(device), ours_cls(c).to(device), ForcedSync(torch_cls(c)).to(device)


def _step(module: Callable, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        module(x).backward(g)

    return run


def speed(quick: bool, device: str = "cpu") -> list[dict]:
    """Cases a and b: forward+backward of one layer, ours / torch, eager and compiled."""
    rows = []
    rounds, iters = (5, 5) if quick else (9, 20)
    for name, (shape, layout) in SHAPES.items():
        if quick and "channels_last" in name:
            continue
        x = torch.randn(shape, device=device).contiguous(memory_format=layout).requires_grad_()
        g = torch.randn(shape, device=device).contiguous(memory_format=layout)
        theirs, ours, forced = _layers(shape, device)
        eager_ref = _step(theirs, x, g)
        for case, module in (("a local", ours), ("b sync, 1 participant", forced)):
            r = compare(_step(module, x, g), eager_ref, rounds=rounds, iters=iters, device=device)
            rows.append({"case": case, "shape": name, "mode": "eager", "vs": "eager nn.BatchNorm",
                         **r.__dict__})
        compiled_ref = _step(torch.compile(copy.deepcopy(theirs)), x, g)
        for case, module in (("a local", ours), ("b sync, 1 participant", forced)):
            compiled = _step(torch.compile(copy.deepcopy(module)), x, g)
            vs = (("compiled nn.BatchNorm", compiled_ref) if case.startswith("a")
                  else ("eager nn.BatchNorm", eager_ref))
            r = compare(compiled, vs[1], rounds=rounds, iters=iters, device=device)
            rows.append({"case": case, "shape": name, "mode": "compiled", "vs": vs[0], **r.__dict__})
    return rows


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd saves for backward in one forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def memory(device: str = "cpu") -> list[dict]:
    """Case c: what backward keeps, ours against torch's."""
    rows = []
    for name, (shape, layout) in SHAPES.items():
        x = torch.randn(shape, device=device).contiguous(memory_format=layout).requires_grad_()
        theirs, ours, forced = _layers(shape, device)
        base = saved_bytes(theirs, x)
        for case, module in (("c local", ours), ("c sync, 1 participant", forced)):
            b = saved_bytes(module, x)
            rows.append({"case": case, "shape": name, "torch_bytes": base, "fsyncbn_bytes": b,
                         "extra_bytes": b - base, "channels": shape[1]})
    return rows


# --- d: DDP step over gloo ------------------------------------------------------------


def conv_net() -> nn.Module:
    """A small conv net with 7 batch-norm layers."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    channels = [3, 16, 16, 32, 32, 64, 64, 64]
    for i in range(7):
        layers += [nn.Conv2d(channels[i], channels[i + 1], 3, padding=1, stride=2 if i in (2, 4) else 1,
                             bias=False), nn.BatchNorm2d(channels[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


class NaiveSyncBatchNorm2d(nn.BatchNorm2d):
    """The synchronised peer of case d: detectron2's NaiveSyncBatchNorm algorithm, written here.

    In training, each layer all-reduces one vector ``[mean, E[x^2]]`` (2C numbers, the input's
    dtype) over the ranks, averages it, takes ``var = E[x^2] - mean^2`` and normalises; backward
    all-reduces the gradient of that vector (a differentiable all_reduce). Equal batches per rank
    only, as detectron2's default mode. Running statistics follow its update (biased variance).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or dist.get_world_size() == 1:
            return super().forward(input)
        channels = input.shape[1]
        moments = torch.cat([input.mean(dim=(0, 2, 3)), (input * input).mean(dim=(0, 2, 3))])
        mean, mean_square = (_AllReduceSum.apply(moments) / dist.get_world_size()).split(channels)
        var = mean_square - mean * mean
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        return input * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class _AllReduceSum(torch.autograd.Function):
    """A sum over the ranks whose backward is the sum of the incoming gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def naive_sync(model: nn.Module) -> nn.Module:
    """``model`` with every nn.BatchNorm2d replaced by a NaiveSyncBatchNorm2d holding its tensors."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            peer = NaiveSyncBatchNorm2d(child.num_features, child.eps, child.momentum,
                                        dtype=child.running_mean.dtype)
            peer.load_state_dict(child.state_dict())
            setattr(model, name, peer)
        else:
            naive_sync(child)
    return model


class CountingAllReduce:
    """Counts fsyncbn's collectives (calls and bytes) by wrapping its all_reduce."""

    def __init__(self) -> None:
        import fsyncbn.reducers as reducers

        self.module = reducers
        self.original = reducers.all_reduce_sum
        self.calls = 0
        self.bytes = 0

    def __enter__(self) -> CountingAllReduce:
        def counted(t, *args, **kwargs):
            self.calls += 1
            self.bytes += t.numel() * t.element_size()
            return self.original(t, *args, **kwargs)

        self.module.all_reduce_sum = counted
        return self

    def __exit__(self, *exc) -> None:
        self.module.all_reduce_sum = self.original


PEER = "NaiveSyncBatchNorm algorithm (synchronised)"


def _ddp_worker(rank: int, world_size: int, port: int, quick: bool, results) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(8, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    nets = {"fsyncbn": DDP(convert_model(conv_net())), "nn.BatchNorm2d": DDP(conv_net()),
            PEER: DDP(naive_sync(conv_net()))}
    opts = {k: torch.optim.SGD(v.parameters(), lr=0.01) for k, v in nets.items()}

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            loss = nn.functional.cross_entropy(nets[name](x), y)
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()

        return run

    step("fsyncbn")()  # first step: each layer's one-time size check
    with CountingAllReduce() as counter:
        step("fsyncbn")()
    step(PEER)()
    rounds, iters = (5, 3) if quick else (9, 10)
    r = compare(step("fsyncbn"), step("nn.BatchNorm2d"), rounds=rounds, iters=iters)
    peer = compare(step("fsyncbn"), step(PEER), rounds=rounds, iters=iters)
    latency = _all_reduce_latency_us(counter.bytes // max(counter.calls, 1) // 8)
    if rank == 0:
        # The floor: torch's step plus the BN collectives at this latency, with no compute.
        floor = (r.theirs_us + counter.calls * latency) / r.theirs_us
        common = {"case": "d DDP step, 2 gloo processes, 7 BN layers",
                  "bn_collectives_per_step": counter.calls, "bn_bytes_per_step": counter.bytes,
                  "all_reduce_us": latency}
        results.put([{**common, "vs": "nn.BatchNorm2d (not synchronised)", **r.__dict__,
                      "latency_floor_ratio": floor},
                     {**common, "vs": PEER, **peer.__dict__}])
    # DDP models destroyed after their process group made gloo abort at interpreter exit
    # ("terminate called without an active exception") in 3 of 4 runs: free them first.
    nets.clear()
    opts.clear()
    gc.collect()
    dist.destroy_process_group()


def _all_reduce_latency_us(numel: int, iters: int = 200) -> float:
    """Median time of one blocking all_reduce of ``numel`` float64 numbers, nothing else."""
    import statistics
    import time

    t = torch.zeros(numel, dtype=torch.float64)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        dist.all_reduce(t)
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times[iters // 10:])


def ddp_step(quick: bool) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(2, port, quick, results), nprocs=2)
    return results.get()


# --- e: communication per layer against world size -----------------------------------


def _numbers_sent(world: int, channels: int) -> dict[str, int]:
    """Numbers and bytes one participant sums over one layer's forward and backward.

    Each participant is a thread whose reducer counts what it is given, then sums with the
    others; forward and backward are told apart by when the reducer is called.
    """
    import threading

    barrier = threading.Barrier(world)
    slots: list = [None] * world
    counts = [{"forward": 0, "backward": 0, "forward_bytes": 0, "backward_bytes": 0} for _ in range(world)]
    phase = ["forward"] * world

    def reducer_for(rank: int):
        def total(t: torch.Tensor) -> torch.Tensor:
            counts[rank][phase[rank]] += t.numel()
            counts[rank][f"{phase[rank]}_bytes"] += t.numel() * t.element_size()
            slots[rank] = t
            barrier.wait()
            out = torch.stack(slots).sum(0)
            barrier.wait()
            return out

        return total

    def participant(rank: int) -> None:
        x = torch.randn(2, channels, 4, 4, requires_grad=True)
        y, _ = sync_batch_norm(x, None, reducer=reducer_for(rank))
        phase[rank] = "backward"
        y.backward(torch.randn_like(y))

    threads = [threading.Thread(target=participant, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return counts[0]


def communication(channels: int = 256) -> list[dict]:
    """Case e: numbers each participant's collectives carry per layer and step, by world size.

    fsyncbn's are measured: sync_batch_norm runs with a counting reducer per participant
    (threads, float32 input). A collective's size is the numbers in its result buffer: an
    all_reduce of n numbers counts n, an all_gather of n from each of W participants W x n.
    torch.nn.SyncBatchNorm's come from its source (torch/nn/modules/_functions.py): forward
    all_gathers [mean, invstd, count] (2C + 1 numbers) from every participant, backward
    all_reduces [sum_dy, sum_dy_xmu] (2C numbers), both in the input's dtype (4 bytes here);
    it runs only on accelerators, so it cannot be counted on a CPU machine.
    """
    rows = []
    for world in (2, 4, 8):
        ours = _numbers_sent(world, channels)
        torch_forward, torch_backward = world * (2 * channels + 1), 2 * channels
        rows.append({
            "case": "e numbers per layer and step", "world_size": world, "channels": channels,
            "fsyncbn_forward": ours["forward"], "fsyncbn_backward": ours["backward"],
            "fsyncbn_total": ours["forward"] + ours["backward"],
            "fsyncbn_bytes": ours["forward_bytes"] + ours["backward_bytes"],
            "torch_forward": torch_forward, "torch_backward": torch_backward,
            "torch_total": torch_forward + torch_backward,
            "torch_bytes": 4 * (torch_forward + torch_backward),
        })
    return rows
