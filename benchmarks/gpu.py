"""Case f: the synchronised path against torch.nn.SyncBatchNorm's, per layer and per model step.

Both sync paths run their real collectives on a 1-rank process group (NCCL on CUDA, gloo as a
CPU dry run): torch's SyncBatchNorm autograd Function (what nn.SyncBatchNorm runs at any world
size above 1) against fsyncbn's op with ProcessGroupReducer on the layer's buffers; cuDNN's
(or the CPU's) local batch norm is the floor. Rows: per-layer eager and compiled times, kernel
launches per layer step (CUDA), and a ResNet-50-shaped training step (eager, compiled, CUDA
graphs) with its peak memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from benchmarks.resnet import resnet50
from benchmarks.timing import compare
from fsyncbn import convert_model
from fsyncbn.functional.ops import run_batch_norm
from fsyncbn.reducers import ProcessGroupReducer

try:
    from torch.nn.modules._functions import SyncBatchNorm as _TorchSyncFunction
except ImportError:  # pragma: no cover - older or newer torch
    _TorchSyncFunction = None

LAYER_SHAPES = [
    ("2d (32, 64, 56, 56) fp32", (32, 64, 56, 56), torch.float32, torch.contiguous_format),
    ("2d (64, 256, 14, 14) fp32", (64, 256, 14, 14), torch.float32, torch.contiguous_format),
    ("2d (32, 64, 56, 56) bf16 channels_last", (32, 64, 56, 56), torch.bfloat16, torch.channels_last),
    ("2d (256, 2048, 7, 7) bf16", (256, 2048, 7, 7), torch.bfloat16, torch.contiguous_format),
    ("1d (1024, 512) fp32", (1024, 512), torch.float32, torch.contiguous_format),
    ("2d (8, 32, 8, 8) fp32", (8, 32, 8, 8), torch.float32, torch.contiguous_format),
]
CPU_SHAPES = [("2d (8, 16, 8, 8) fp32", (8, 16, 8, 8), torch.float32, torch.contiguous_format),
              ("1d (64, 32) fp32", (64, 32), torch.float32, torch.contiguous_format)]


class FsyncbnSync(nn.Module):
    """fsyncbn's synchronised path on a batch-norm layer's buffers, at any world size (a layer
    synchronises only above 1; this is the same op, route and in-place commit)."""

    def __init__(self, bn: nn.Module, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.bn = bn
        self.reducer = ProcessGroupReducer(group, name=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        state = {k: getattr(bn, k) for k in ("running_mean", "running_var", "num_batches_tracked")}
        return run_batch_norm("batch_norm", x, state, bn.weight, bn.bias, training=self.training,
                              momentum=bn.momentum, eps=bn.eps, reducer=self.reducer,
                              eps_mode="plus", in_place=True)[0]


class TorchSync(nn.Module):
    """torch.nn.SyncBatchNorm's synchronised branch (its autograd Function), at any world size."""

    def __init__(self, bn: nn.Module, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.bn, self.group = bn, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        bn.num_batches_tracked.add_(1)
        return _TorchSyncFunction.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                        bn.eps, bn.momentum, self.group, 1)


def _swap(model: nn.Module, wrap: Callable[[nn.Module], nn.Module]) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, wrap(child))
        else:
            _swap(child, wrap)
    return model


def _layer_step(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        module(x).backward(g)

    return run


def _kernels_per_step(step: Callable[[], None]) -> int:
    """CUDA kernels (and copies) launched by one call of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def layers(quick: bool, device: str, group: dist.ProcessGroup) -> list[dict]:
    rows = []
    rounds, iters = (5, 10) if quick else (9, 20)
    torch_sync = device == "cuda" and _TorchSyncFunction is not None
    for name, shape, dtype, layout in LAYER_SHAPES if device == "cuda" else CPU_SHAPES:
        c = shape[1]
        cls = nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d
        x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=layout).requires_grad_()
        g = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=layout)
        native, ours = cls(c).to(device), FsyncbnSync(cls(c).to(device), group)
        steps = {"fsyncbn": _layer_step(ours, x, g), "native": _layer_step(native, x, g)}
        if torch_sync:
            steps["torch"] = _layer_step(TorchSync(cls(c).to(device), group), x, g)
        against = "torch" if torch_sync else "native"
        r = compare(steps["fsyncbn"], steps[against], rounds=rounds, iters=iters, device=device)
        floor = compare(steps["native"], steps[against], rounds=rounds, iters=iters, device=device)
        row = {"case": "f layer", "shape": name, "mode": "eager", "vs": f"{against} sync path"
               if against == "torch" else "local batch norm", **r.__dict__,
               "native_us": floor.ours_us}
        if device == "cuda":
            row["fsyncbn_kernels"] = _kernels_per_step(steps["fsyncbn"])
            row["torch_kernels"] = _kernels_per_step(steps[against])
        rows.append(row)
        if device != "cuda":
            continue  # the CPU dry run checks that the case runs; compiling is case a/b's job
        compiled_ours = _layer_step(torch.compile(FsyncbnSync(cls(c).to(device), group)), x, g)
        compiled_theirs = _layer_step(torch.compile(
            TorchSync(cls(c).to(device), group) if torch_sync else cls(c).to(device)), x, g)
        r = compare(compiled_ours, compiled_theirs, rounds=rounds, iters=iters, device=device)
        rows.append({"case": "f layer", "shape": name, "mode": "compiled",
                     "vs": f"compiled {'torch sync path' if torch_sync else 'local batch norm'}",
                     **r.__dict__})
    return rows


def _peak_bytes(step: Callable[[], None], device: str) -> int:
    if device != "cuda":
        return 0
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def model_step(quick: bool, device: str, group: dist.ProcessGroup, compile_model: bool) -> list[dict]:
    """A ResNet-50-shaped training step (SGD), bf16 autocast on CUDA, channels_last."""
    batch, size, width = (64, 160, 64) if device == "cuda" and not quick else (
        (32, 96, 64) if device == "cuda" else (4, 32, 8))
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=device)
    autocast_dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def build(kind: str) -> nn.Module:
        torch.manual_seed(0)
        model = resnet50(width=width).to(device).to(memory_format=torch.channels_last)
        if kind == "fsyncbn local":
            return convert_model(model)  # world size 1: each layer is torch's kernel
        if kind == "fsyncbn sync":
            return _swap(model, lambda bn: FsyncbnSync(bn, group))
        if kind == "torch sync":
            return _swap(model, lambda bn: TorchSync(bn, group))
        return model

    def train(model: nn.Module, compile_mode: str | None = None) -> Callable[[], None]:
        net = torch.compile(model, mode=compile_mode) if compile_mode is not None else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def run() -> None:
            with torch.autocast(device, dtype=autocast_dtype, enabled=device == "cuda"):
                loss = nn.functional.cross_entropy(net(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    rounds, iters = (3, 3) if quick else (5, 5)
    kinds = ["fsyncbn local", "fsyncbn sync"] + (["torch sync"] if _TorchSyncFunction and device == "cuda"
                                                 else [])
    steps = {kind: train(build(kind)) for kind in ["nn.BatchNorm2d", *kinds]}
    base_peak = _peak_bytes(steps["nn.BatchNorm2d"], device)
    rows = []
    label = f"f ResNet-50-shaped step, batch {batch} at {size}x{size}, width {width}"
    for kind in kinds:
        against = "torch sync" if kind == "fsyncbn sync" and "torch sync" in steps else "nn.BatchNorm2d"
        r = compare(steps[kind], steps[against], rounds=rounds, iters=iters, device=device)
        rows.append({"case": label, "mode": "eager", "ours": kind, "vs": against, **r.__dict__,
                     "peak_ratio": _peak_bytes(steps[kind], device) / base_peak if base_peak else None})
    if compile_model and device == "cuda":
        modes = [None] if quick else [None, "reduce-overhead"]
        for mode in modes:
            start = time.monotonic()
            theirs = train(build("nn.BatchNorm2d"), mode or "default")
            ours = train(build("fsyncbn sync"), mode or "default")
            theirs(), ours()
            r = compare(ours, theirs, rounds=rounds, iters=iters, device=device)
            rows.append({"case": label, "mode": f"compiled ({mode or 'default'})", "ours": "fsyncbn sync",
                         "vs": "compiled nn.BatchNorm2d", **r.__dict__,
                         "compile_s": time.monotonic() - start})
    return rows


def gpu_case(quick: bool, device: str, compile_model: bool = True) -> list[dict]:
    """Case f on ``device`` (``cuda``; ``cpu`` is a dry run over gloo)."""
    import socket

    own_group = not dist.is_initialized()
    if own_group:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        if device == "cuda":
            torch.backends.cudnn.benchmark = True
        return layers(quick, device, group) + model_step(quick, device, group, compile_model)
    finally:
        if own_group:
            dist.destroy_process_group()
