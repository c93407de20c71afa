"""Run the benchmarks: ``python -m benchmarks [--quick] [--device cuda] [--cases a,c,e]``.

Prints the tables and writes ``<device>.json`` to ``--out``. The default is the committed
``benchmarks/results``; a run written there also regenerates benchmarks/README.md and the
figures in README.md (:mod:`benchmarks.report`). Every figure is a ratio against torch
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks import cases, gpu, report


def _machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shapes")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cases", default="a,c,d,e",
                        help="which of a/b (speed), c, d, e, f (sync paths against torch's) to run")
    parser.add_argument("--no-model-compile", action="store_true", help="case f: skip compiling the model")
    parser.add_argument("--out", type=Path, default=report.RESULTS,
                        help="folder for <device>.json (default: the committed results, and the READMEs "
                             "are regenerated from them)")
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
    results = {"machine": _machine(args.device), "device": args.device, "quick": args.quick,
               "seconds": time.monotonic() - start, "rows": rows}
    print(report.markdown(results))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.device}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written: {path}")
    if args.out.resolve() == report.RESULTS.resolve():
        report.main([])

if __name__ == "__main__":
    main()
