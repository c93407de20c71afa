"""Exit soak: run the multi-process scenarios many times, two at once, and count unclean exits.

    PYTHONPATH=$PWD python scripts/exit_soak.py --runs 30 [--parallel 2] [--scenarios a,b]

A run is unclean if its launcher exits non-zero or "terminate called" appears in its output
(an abort at interpreter exit; Lightning's second rank shares the launcher's stderr). Prints a
Markdown table: scenario, runs, unclean, median seconds, and the first line of each failure.
Two at once on a 2-core machine is the load under which the exit race used to show.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests._support.distributed import free_port  # noqa: E402


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), *args]


def _join_recipe() -> str:
    """The docs' Join recipe (docs/distributed.md), written to a file once."""
    text = (ROOT / "docs" / "distributed.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "fsyncbn.Join([" in b)
    path = Path(tempfile.gettempdir()) / "fsyncbn_join_recipe.py"
    path.write_text(block)
    return str(path)


SCENARIOS = {
    "lightning": lambda out: [sys.executable, "-m", "tests._scripts.lightning_fit", out, "plugin"],
    "accelerate": lambda out: _torchrun("-m", "tests._scripts.accelerate_fit", out),
    "join-recipe": lambda out: [sys.executable, _join_recipe()],
    "benchmark-d": lambda out: [sys.executable, "-m", "benchmarks", "--cases", "d", "--quick", "--out", out],
    "ddp-torchrun": lambda out: _torchrun("examples/ddp_torchrun.py", "--timeout", "30", "--stats-dir", out),
}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_once(name: str) -> tuple[str, bool, float, str]:
    with tempfile.TemporaryDirectory() as out:
        env = {**_env(), "MASTER_PORT": str(free_port())}
        start = time.monotonic()
        try:
            done = subprocess.run(SCENARIOS[name](out), cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=300)
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            code, output = "timeout", f"{exc.stdout or ''}{exc.stderr or ''}"
        seconds = time.monotonic() - start
    unclean = code != 0 or "terminate called" in output
    detail = ""
    if unclean:
        lines = [ln for ln in str(output).splitlines() if "terminate called" in ln or "Error" in ln]
        detail = f"exit {code}: {(lines or ['?'])[0][:120]}"
    return name, unclean, seconds, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    names = args.scenarios.split(",")
    jobs = [n for _ in range(args.runs) for n in names]  # interleaved: each pair mixes scenarios
    results: dict[str, list[tuple[bool, float, str]]] = {n: [] for n in names}
    with ThreadPoolExecutor(args.parallel) as pool:
        for name, unclean, seconds, detail in pool.map(run_once, jobs):
            results[name].append((unclean, seconds, detail))
            print(f"{name}: {'UNCLEAN ' + detail if unclean else 'ok'} ({seconds:.1f} s)", flush=True)
    print("\n| scenario | runs | unclean | median s | failures |\n|---|---|---|---|---|")
    for name, rows in results.items():
        failures = "; ".join(d for u, _, d in rows if u)
        print(f"| {name} | {len(rows)} | {sum(u for u, _, _ in rows)} | "
              f"{statistics.median(s for _, s, _ in rows):.1f} | {failures} |")


if __name__ == "__main__":
    main()
