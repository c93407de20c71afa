"""Run the benchmarks: ``python -m benchmarks [--quick] [--device cuda] [--cases a,c,e]``.

Prints a table and writes ``results.json`` and ``results.md`` to ``--out`` (default
``benchmarks/results``). Every figure is a ratio against torch measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks import cases, gpu


def _machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def markdown(results: dict) -> str:
    lines = [f"Measured on {results['machine']} ({'quick' if results['quick'] else 'full'} run, "
             f"{results['seconds']:.0f} s). Ratio = fsyncbn / torch, median of interleaved rounds "
             "(spread: lowest-highest round)."]
    speed = [r for r in results["rows"] if "ratio" in r and "shape" in r]
    if speed:
        lines += ["", "| case | shape | mode | against | fsyncbn us | torch us | ratio (spread) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['shape']} | {r['mode']} | {r['vs']} | {r['ours_us']:.0f} | "
                  f"{r['theirs_us']:.0f} | {r['ratio']:.2f} ({r['low']:.2f}-{r['high']:.2f}) |"
                  for r in speed]
    memory = [r for r in results["rows"] if "torch_bytes" in r]
    if memory:
        lines += ["", "| case | shape | torch saved bytes | fsyncbn saved bytes | extra |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['shape']} | {r['torch_bytes']} | {r['fsyncbn_bytes']} | "
                  f"{r['extra_bytes']} ({r['extra_bytes'] / max(r['channels'], 1):.0f} per channel) |"
                  for r in memory]
    ddp = [r for r in results["rows"] if r["case"].startswith("d ")]
    if ddp:
        lines += ["", "| case | fsyncbn ms | nn.BatchNorm2d ms | ratio (spread) | BN collectives/step | "
                  "BN bytes/step | one all_reduce ms | latency floor |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['ours_us'] / 1e3:.1f} | {r['theirs_us'] / 1e3:.1f} | "
                  f"{r['ratio']:.2f} ({r['low']:.2f}-{r['high']:.2f}) | {r['bn_collectives_per_step']} | "
                  f"{r['bn_bytes_per_step']} | {r['all_reduce_us'] / 1e3:.2f} | "
                  f"{r['latency_floor_ratio']:.2f} |" for r in ddp]
    comm = [r for r in results["rows"] if r["case"].startswith("e ")]
    if comm:
        lines += ["", "| world size | C | fsyncbn numbers/layer/step | torch.nn.SyncBatchNorm all_gather |",
                  "|---|---|---|---|"]
        lines += [f"| {r['world_size']} | {r['channels']} | {r['fsyncbn']} | "
                  f"{r['torch.nn.SyncBatchNorm (forward all_gather)']} |" for r in comm]
    lines += gpu.markdown(results["rows"])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shapes (< 2 min)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cases", default="a,c,d,e",
                        help="which of a/b (speed), c, d, e, f (sync paths against torch's) to run")
    parser.add_argument("--no-model-compile", action="store_true", help="case f: skip compiling the model")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    wanted = set(args.cases.split(","))
    start = time.monotonic()
    rows: list[dict] = []
    if wanted & {"a", "b"}:
        rows += cases.speed(args.quick, args.device)
    if "c" in wanted:
        rows += cases.memory(args.device)
    if "d" in wanted and args.device == "cpu":
        rows += cases.ddp_step(args.quick)
    if "e" in wanted:
        rows += cases.communication()
    if "f" in wanted:
        rows += gpu.gpu_case(args.quick, args.device, compile_model=not args.no_model_compile)
    results = {"machine": _machine(args.device), "quick": args.quick,
               "seconds": time.monotonic() - start, "rows": rows}
    table = markdown(results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(table)
    print(f"written: {args.out / 'results.json'}, {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
