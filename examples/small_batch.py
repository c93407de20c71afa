"""Why synchronized batch norm: 2 images per process is noise, 4 x 2 synchronized is a batch of 8.

Trains a small CNN with batch norm on scikit-learn's 8x8 digits (1,797 images, shipped with
the package; nothing is downloaded) three ways, with the same seed and data order:

  (i)   4 CPU processes (torch.distributed, gloo) x 2 images, plain nn.BatchNorm2d
  (ii)  the same 4 x 2 with fsyncbn (convert_model): statistics over all 8 images
  (iii) 1 process with batches of 8 and nn.BatchNorm2d: the reference for (ii)

It prints a table (test accuracy, final loss, the largest gap between the loss curves of
(ii) and (iii), which is ~0 because sync BN over 4 x 2 *is* batch norm over 8) and writes a
plot of the three loss curves. With ``--results`` it also writes the figures as JSON; the
README's demo table is generated from docs/results/demo.json (``python -m benchmarks.report``).

    python examples/small_batch.py [--world-size 4] [--per-process-batch 2] [--epochs 2]
    python examples/small_batch.py --out docs/small_batch.png --results docs/results/demo.json --spread 4
    python examples/small_batch.py --quick --out /tmp/quick.png --results docs/results/demo_quick.json

Every process runs one thread with deterministic kernels and the same data order, so a rerun on
the same kind of machine gives the same figures; run (i) is chaotic (it barely learns, and
rounding-sized changes move it), so ``--spread`` measures its range (the README gives it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fsyncbn import convert_model


@dataclass(frozen=True)
class Config:
    world_size: int = 4
    per_process_batch: int = 2
    epochs: int = 2
    lr: float = 0.05
    seed: int = 0
    out: str = "small_batch.png"
    show_progress: bool = True
    max_steps: int | None = None
    results: str | None = None
    perturbation: float = 0.0  # initial weights scaled by (1 + perturbation): see --spread
    spread: int = 0


def load_digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as (N, 1, 8, 8) float64 in [0, 1]; a fixed 80/20 train/test split.

    float64 so that the (ii) - (iii) comparison shows the method, not float32 rounding
    amplified over hundreds of SGD steps.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float64).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    return images[train], labels[train], images[test], labels[test]


def make_model(seed: int, perturbation: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        # A batch-normalised head, as in detection and MLP heads: here every channel has one
        # value per image, so 2 images per process give 2 values per channel.
        nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10),
    ).double()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1 + perturbation)
    return model


def fix_threads() -> None:
    """One thread per process and deterministic kernels: the figures then depend on the data
    and the seed, not on the machine's core count or load (which change the order of sums)."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def global_batches(n_train: int, global_batch: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The same sequence of global batches (indices) for every run."""
    gen = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(epochs):
        order = torch.randperm(n_train, generator=gen)
        batches += list(order[: n_train - n_train % global_batch].split(global_batch))
    return batches


def run_name(cfg: Config, sync: bool, distributed: bool) -> str:
    if not distributed:
        return f"(iii) 1x{cfg.per_process_batch} nn.BatchNorm"
    shape = f"{cfg.world_size}x{cfg.per_process_batch}"
    return f"(ii) {shape} fsyncbn" if sync else f"(i) {shape} nn.BatchNorm"


def train(rank: int, world_size: int, cfg: Config, sync: bool, distributed: bool) -> dict:
    """Train on this rank's share of every global batch; return loss curve and accuracy."""
    x_train, y_train, x_test, y_test = load_digits_split(cfg.seed)
    per = cfg.per_process_batch
    model = make_model(cfg.seed, cfg.perturbation)
    if sync:
        model = convert_model(model)
    net = DDP(model) if distributed else model
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9)
    batches = global_batches(len(y_train), per * world_size, cfg.epochs, cfg.seed)
    batches = batches[: cfg.max_steps]
    losses = []
    progress = None
    if cfg.show_progress and rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=len(batches), desc=run_name(cfg, sync, distributed), ncols=90)
    for batch in batches:
        mine = batch[rank * per:(rank + 1) * per]
        loss = F.cross_entropy(net(x_train[mine]), y_train[mine])
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean_loss = loss.detach().clone()
        if distributed:  # the global batch's loss: mean of the equal-sized shares
            dist.all_reduce(mean_loss)
            mean_loss /= world_size
        losses.append(float(mean_loss))
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.close()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return {"losses": losses, "accuracy": accuracy}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, cfg: Config, sync: bool, port: int, results) -> None:
    fix_threads()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cfg.world_size,
        timeout=datetime.timedelta(seconds=60),  # a lost peer fails the run, never hangs it
    )
    try:
        result = train(rank, cfg.world_size, cfg, sync=sync, distributed=True)
        if rank == 0:
            results.put(result)
    finally:
        dist.destroy_process_group()


def run_distributed(cfg: Config, sync: bool) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.spawn(_worker, args=(cfg, sync, _free_port(), results), nprocs=cfg.world_size)
    return results.get()


def run_all(cfg: Config) -> dict[str, dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    fix_threads()
    runs = {}
    start = time.monotonic()
    runs[run_name(cfg, False, True)] = run_distributed(cfg, sync=False)
    runs[run_name(cfg, True, True)] = run_distributed(cfg, sync=True)
    single = Config(**{**cfg.__dict__, "world_size": 1,
                       "per_process_batch": cfg.per_process_batch * cfg.world_size})
    runs[run_name(single, False, False)] = train(0, 1, single, sync=False, distributed=False)
    seconds = time.monotonic() - start  # the three runs
    # Run (i) barely learns, and how far it gets is chaotic: rounding-sized changes move it. Rerun
    # it with the initial weights scaled by 1 + k * 1e-12: the spread of those runs is what a
    # different machine (other kernels, other rounding) may show.
    runs["spread"] = [run_distributed(Config(**{**cfg.__dict__, "perturbation": k * 1e-12}), sync=False)
                      for k in range(1, cfg.spread + 1)]  # type: ignore[assignment]
    runs["seconds"] = seconds  # type: ignore[assignment]
    return runs


def summary(runs: dict, cfg: Config) -> dict:
    """The figures of a run, as written to ``--results``: settings, machine, and per run the
    test accuracy and the mean training loss of the last 50 steps."""
    names = [k for k in runs if k not in ("seconds", "spread")]
    gap = max(abs(a - b) for a, b in zip(runs[names[1]]["losses"], runs[names[2]]["losses"],
                                         strict=True))
    return {
        "settings": {"world_size": cfg.world_size, "per_process_batch": cfg.per_process_batch,
                     "epochs": cfg.epochs, "lr": cfg.lr, "seed": cfg.seed,
                     "steps": len(runs[names[0]]["losses"])},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "seconds": runs["seconds"],
        "runs": [{"name": name, "test_accuracy": runs[name]["accuracy"],
                  "loss_last_50": sum(runs[name]["losses"][-50:]) / len(runs[name]["losses"][-50:])}
                 for name in names],
        "largest_loss_gap_ii_iii": gap,
        **({"spread_i": _spread(names[0], [runs[names[0]], *runs["spread"]])} if runs.get("spread") else {}),
    }


def _spread(name: str, runs: list[dict]) -> dict:
    """The range of run (i)'s figures over itself and its reruns with perturbed initial weights."""
    accuracy = [run["accuracy"] for run in runs]
    loss = [sum(run["losses"][-50:]) / len(run["losses"][-50:]) for run in runs]
    return {"name": name, "runs": len(runs), "perturbation": "initial weights x (1 + k * 1e-12)",
            "test_accuracy": [min(accuracy), max(accuracy)], "loss_last_50": [min(loss), max(loss)]}


def report(runs: dict, cfg: Config) -> float:
    """Print the table, write the plot (and ``cfg.results``); return the largest (ii) - (iii)
    loss gap."""
    names = [k for k in runs if k not in ("seconds", "spread")]
    figures = summary(runs, cfg)
    gap = figures["largest_loss_gap_ii_iii"]
    if cfg.results:
        os.makedirs(os.path.dirname(cfg.results) or ".", exist_ok=True)
        with open(cfg.results, "w") as f:
            json.dump(figures, f, indent=1)
            f.write("\n")
    g = cfg.per_process_batch * cfg.world_size
    print(f"\ndigits, {cfg.epochs} epochs, global batch {g} "
          f"({cfg.world_size} x {cfg.per_process_batch}), {runs['seconds']:.0f} s")
    print(f"{'run':<26}{'test accuracy':>15}{'final loss (avg last 50)':>27}")
    for name in names:
        tail = runs[name]["losses"][-50:]
        print(f"{name:<26}{runs[name]['accuracy']:>15.3f}{sum(tail) / len(tail):>27.4f}")
    print(f"largest |loss (ii) - loss (iii)| over {len(runs[names[1]]['losses'])} steps: {gap:.2e}")
    if "spread_i" in figures:
        sp = figures["spread_i"]
        print(f"{names[0]} over {sp['runs']} runs, initial weights x (1 + k * 1e-12): test accuracy "
              f"{sp['test_accuracy'][0]:.3f} to {sp['test_accuracy'][1]:.3f}, loss "
              f"{sp['loss_last_50'][0]:.3f} to {sp['loss_last_50'][1]:.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, style in zip(names, ("-", "-", "--"), strict=True):
        losses = torch.tensor(runs[name]["losses"])
        window = 20
        smooth = losses.unfold(0, window, 1).mean(1) if len(losses) > window else losses
        ax.plot(smooth.numpy(), style, label=f"{name} (acc {runs[name]['accuracy']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving average of {window})")
    ax.set_title("Batch norm with 2 images per process: local vs synchronized")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    fig.savefig(cfg.out, dpi=120)
    print(f"plot: {cfg.out}")
    if cfg.results:
        print(f"figures: {cfg.results} (python -m benchmarks.report puts them in the README)")
    return gap


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=4, help="processes (default 4)")
    p.add_argument("--per-process-batch", type=int, default=2, help="images per process (default 2)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training set (default 2)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="small_batch.png", help="where to write the plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--results", default=None, help="also write the figures as JSON here")
    p.add_argument("--spread", type=int, default=0,
                   help="rerun (i) this many times with initial weights x (1 + k * 1e-12): its range")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_STEPS} steps, no progress bars: the figures of docs/results/demo_quick.json")
    a = p.parse_args(argv)
    return Config(a.world_size, a.per_process_batch, a.epochs, a.lr, a.seed, a.out,
                  not (a.no_progress or a.quick), QUICK_STEPS if a.quick else a.max_steps, a.results,
                  spread=a.spread)


QUICK_STEPS = 40


if __name__ == "__main__":
    config = parse_args()
    report(run_all(config), config)
