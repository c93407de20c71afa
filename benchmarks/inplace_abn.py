"""Case g: fsyncbn.InPlaceABN against batch norm + activation: memory and time.

    python -m benchmarks.inplace_abn [--quick]

writes ``benchmarks/results/inplace_abn_cpu.json``, draws ``docs/inplace_abn.png`` from that
file, and regenerates the README's figures (:mod:`benchmarks.report`). Three variants of
``norm + LeakyReLU(0.01)``: torch's nn.BatchNorm2d + nn.LeakyReLU(inplace=True), fsyncbn's
out-of-place layer (``InPlaceABN(in_place=False)``: fsyncbn's batch norm, then the
activation in place on its output) and ``InPlaceABN``.

- Saved-for-backward bytes: distinct storages that autograd saves in one forward
  (``torch.autograd.graph.saved_tensors_hooks``) of a chain of ``depth`` conv -> norm ->
  LeakyReLU blocks, eager and compiled.
- Peak memory of one training step (forward, backward) of two DeepLab-style segmentation
  heads at 64x64 (:class:`SegmentationHead`: a decoder of 3x3 convs, and ASPP). Each variant
  runs in a fresh process with glibc's mmap threshold fixed at
  128 KiB (``MALLOC_MMAP_THRESHOLD_``), so that every tensor has pages of its own that go back
  to the system when it is freed; after a small warm-up step (libraries, parameter gradients)
  the kernel's high-water mark of resident memory is reset (``/proc/self/clear_refs``), and
  the high-water mark after the step (``VmHWM``) minus the resident memory just before it is
  the step's peak of live memory (tensors, convolution workspaces), to a page.
- Time: one layer's forward + backward (the input copied first, since the in-place layer
  overwrites it; both sides pay the copy), and the head's training step, InPlaceABN against
  the out-of-place layer in the same run, interleaved rounds, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.cases import saved_bytes
from benchmarks.timing import compare
from fsyncbn import InPlaceABN

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "inplace_abn_cpu.json"
FIGURE = ROOT / "docs" / "inplace_abn.png"
VARIANTS = ("torch BN + LeakyReLU(inplace)", "fsyncbn out-of-place", "fsyncbn InPlaceABN")
SLOPE = 0.01


def norm_act(variant: str, channels: int) -> list[nn.Module]:
    """The norm + activation of one block, as modules."""
    if variant == VARIANTS[0]:
        return [nn.BatchNorm2d(channels), nn.LeakyReLU(SLOPE, inplace=True)]
    return [InPlaceABN(channels, activation_param=SLOPE, in_place=variant == VARIANTS[2])]


def chain(variant: str, depth: int, channels: int = 32) -> nn.Sequential:
    """``depth`` blocks conv 3x3 -> norm -> LeakyReLU."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), *norm_act(variant, channels)]
    return nn.Sequential(*layers)


class SegmentationHead(nn.Module):
    """DeepLab-style heads at 64x64, every conv followed by norm + LeakyReLU.

    ``"decoder"``: four 3x3 convs in a row, then a 1x1 classifier (DeepLabV3+'s decoder, deeper).
    ``"aspp"``: DeepLabV3's ASPP: parallel 3x3 convs of dilation 1, 6, 12, 18, concatenated, a
    1x1 projection, a 3x3 conv, the classifier. Its concatenation (saved by the projection)
    and that tensor's gradient are the same size in every variant.
    """

    def __init__(self, variant: str, kind: str = "decoder", channels: int = 128, classes: int = 21) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind

        def block(c_in: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, channels, kernel, padding=dilation * (kernel // 2),
                                           dilation=dilation, bias=False), *norm_act(variant, channels))

        if kind == "aspp":
            self.branches = nn.ModuleList(block(channels, dilation=d) for d in (1, 6, 12, 18))
            self.body = nn.Sequential(block(4 * channels, kernel=1), block(channels))
        else:
            self.body = nn.Sequential(*(block(channels) for _ in range(4)))
        self.classify = nn.Conv2d(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "aspp":
            x = torch.cat([branch(x) for branch in self.branches], 1)
        return self.classify(self.body(x))


HEADS = {"decoder": "4 x (3x3 conv -> norm -> LeakyReLU), 1x1 classifier",
         "aspp": "ASPP (3x3 convs, dilations 1/6/12/18, concatenated), projection, 3x3 conv, classifier"}
HEAD_INPUT = (2, 128, 64, 64)


def saved_over_depth(depths: tuple[int, ...], compiled: bool) -> list[dict]:
    rows = []
    for depth in depths:
        x = torch.randn(8, 32, 32, 32, requires_grad=True)
        row = {"case": "g saved bytes", "depth": depth, "mode": "compiled" if compiled else "eager"}
        for variant in VARIANTS:
            model = chain(variant, depth)
            if compiled:
                torch._dynamo.reset()
                model = torch.compile(model, fullgraph=True)
                model(x.detach().clone())  # compile first: count one ordinary call
            row[variant] = saved_bytes(model, x)
        row["ratio vs torch"] = row[VARIANTS[2]] / row[VARIANTS[0]]
        row["ratio vs out-of-place"] = row[VARIANTS[2]] / row[VARIANTS[1]]
        rows.append(row)
    return rows


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_step(variant: str, kind: str) -> dict:
    """In this (fresh) process: the peak memory of one training step of the head, above
    the memory before it."""
    torch.set_num_threads(1)
    model = SegmentationHead(variant, kind)
    small = torch.randn(2, HEAD_INPUT[1], 8, 8)
    loss = nn.functional.cross_entropy(model(small), torch.zeros(2, 8, 8, dtype=torch.long))
    loss.backward()  # libraries and parameter gradients set up outside the measured step
    x = torch.randn(HEAD_INPUT)
    target = torch.randint(0, 21, (HEAD_INPUT[0], *HEAD_INPUT[2:]))
    before = _rss_bytes()
    # Reset the kernel's high-water mark of resident memory (VmHWM) to the current size: a
    # process started by a large one inherits its ru_maxrss.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    return {"variant": variant, "peak_bytes": _high_water_bytes() - before}


def _high_water_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def peak_memory() -> list[dict]:
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for kind, description in HEADS.items():
        peaks = {}
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.inplace_abn", "--peak-step", variant, "--head", kind],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=True,
            )
            peaks[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
        rows.append({"case": "g peak memory of a training step", "head": kind, "model": description,
                     "input": str(HEAD_INPUT), **peaks,
                     "ratio vs torch": peaks[VARIANTS[2]] / peaks[VARIANTS[0]],
                     "ratio vs out-of-place": peaks[VARIANTS[2]] / peaks[VARIANTS[1]]})
    return rows


def timing(quick: bool) -> list[dict]:
    rounds, iters = (5, 3) if quick else (9, 10)
    rows = []
    shape = (32, 64, 28, 28)
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)
    layers = {v: nn.Sequential(*norm_act(v, shape[1])) for v in VARIANTS}

    def layer_step(layer: nn.Module):
        def run() -> None:
            x.grad = None
            layer(x.clone()).backward(g)  # a fresh input every call: the in-place layer overwrites it
        return run

    for vs in VARIANTS[:2]:
        r = compare(layer_step(layers[VARIANTS[2]]), layer_step(layers[vs]), rounds=rounds, iters=iters)
        rows.append({"case": "g InPlaceABN layer", "shape": str(shape), "mode": "eager", "vs": vs,
                     **r.__dict__})
    head_rounds, head_iters = (3, 1) if quick else (7, 2)
    hx = torch.randn(HEAD_INPUT)
    target = torch.randint(0, 21, (HEAD_INPUT[0], *HEAD_INPUT[2:]))
    heads = {v: SegmentationHead(v, "decoder") for v in VARIANTS[1:]}

    def head_step(model: nn.Module):
        def run() -> None:
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(hx), target).backward()
        return run

    r = compare(head_step(heads[VARIANTS[2]]), head_step(heads[VARIANTS[1]]), rounds=head_rounds,
                iters=head_iters)
    rows.append({"case": "g InPlaceABN decoder head step", "shape": str(HEAD_INPUT), "mode": "eager",
                 "vs": VARIANTS[1],
                 **r.__dict__})
    return rows


def case_g(quick: bool) -> list[dict]:
    depths = (1, 2, 5, 10) if quick else (1, 2, 3, 5, 7, 10)
    rows = saved_over_depth(depths, compiled=False)
    rows += saved_over_depth((3,), compiled=True)
    rows += peak_memory()
    rows += timing(quick)
    return rows


def plot(results_path: Path = RESULTS, figure: Path = FIGURE) -> None:
    """The figure of the README, drawn from the results file alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(results_path.read_text())
    rows = [r for r in results["rows"] if r["case"] == "g saved bytes" and r["mode"] == "eager"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    depths = [r["depth"] for r in rows]
    for variant, marker in zip(VARIANTS, "osD", strict=True):
        left.plot(depths, [r[variant] / 2**20 for r in rows], marker=marker, label=variant)
    left.set_xlabel("conv -> norm -> LeakyReLU blocks")
    left.set_ylabel("saved for backward (MiB)")
    left.set_title("Saved-for-backward bytes, (8, 32, 32, 32) activations")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    peaks = [r for r in results["rows"] if r["case"].startswith("g peak memory")]
    width = 0.27
    for i, (variant, color) in enumerate(zip(VARIANTS, ("C0", "C1", "C2"), strict=True)):
        values = [r[variant] / 2**20 for r in peaks]
        xs = [k + (i - 1) * width for k in range(len(peaks))]
        right.bar(xs, values, width, color=color)
        for x, v in zip(xs, values, strict=True):
            right.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    right.set_xticks(range(len(peaks)), [f"{r['head']} head\n(InPlaceABN {r['ratio vs torch']:.2f}x torch)"
                                         for r in peaks], fontsize=8)
    right.set_ylabel("peak memory of one step (MiB)")
    right.set_title("DeepLab-style heads, (2, 128, 64, 64), CPU")
    fig.suptitle(f"fsyncbn.InPlaceABN ({results['machine']})", fontsize=9)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer depths and rounds")
    parser.add_argument("--peak-step", help=argparse.SUPPRESS)  # the measuring subprocess
    parser.add_argument("--head", default="decoder", help=argparse.SUPPRESS)
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from the results file")
    args = parser.parse_args()
    if args.peak_step:
        print(json.dumps(_peak_step(args.peak_step, args.head)))
        return
    if not args.plot_only:
        start = time.monotonic()
        rows = case_g(args.quick)
        processor = platform.processor() or platform.machine()
        machine = f"{processor}, {os.cpu_count()} cores, torch {torch.__version__}"
        results = {"machine": machine, "device": "cpu", "quick": args.quick,
                   "seconds": time.monotonic() - start, "rows": rows}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(f"written: {RESULTS}")
    plot()
    print(f"written: {FIGURE}")
    from benchmarks import report

    report.main([])


if __name__ == "__main__":
    main()
