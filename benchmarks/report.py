"""Every published figure, made from the results files: benchmarks/README.md and README.md.

The results files are written by the runs themselves: ``python -m benchmarks`` writes
``benchmarks/results/<device>.json`` (cpu, cuda) and ``python examples/small_batch.py --results
docs/results/demo.json`` the demo's. This module turns them into benchmarks/README.md (the full
tables) and into the blocks of README.md between ``<!-- figures:NAME -->`` and
``<!-- /figures:NAME -->``. Nothing there is edited by hand: a test fails when they disagree.

    python -m benchmarks.report          # rewrite benchmarks/README.md and README.md's figures
    python -m benchmarks.report --check  # exit 1 where they differ from the results files
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEMO = ROOT / "docs" / "results" / "demo.json"
INPLACE_ABN = RESULTS / "inplace_abn_cpu.json"  # case g, written by python -m benchmarks.inplace_abn
README = ROOT / "README.md"
BENCHMARKS_README = ROOT / "benchmarks" / "README.md"
DEMO_QUICK = ROOT / "docs" / "results" / "demo_quick.json"
DEVICES = ("cpu", "cuda")  # the order of columns and sections
# How far a rerun of the demo's quick mode may be from docs/results/demo_quick.json (tests check it,
# the README states it); QUICK_STEPS as examples/small_batch.py --quick.
DEMO_TOLERANCE = {"test_accuracy": 0.01, "loss_last_50": 1e-3}
DEMO_BEHIND = 0.3  # run (i)'s loss stays at least this far above run (ii)'s in the quick mode
QUICK_STEPS = 40

_SPEED_KEYS = {"shape", "mode", "vs", "ours_us", "theirs_us", "ratio", "low", "high"}


# --- the full tables of one results file ------------------------------------------------


def _is_speed(row: dict) -> bool:
    return _SPEED_KEYS <= row.keys() and not row["case"].startswith("d ")


def _letter(row: dict) -> str:
    return row["case"].split()[0]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown(results: dict) -> str:
    """The full tables of one run (one results file), as markdown."""
    lines = [f"Measured on {results['machine']} ({'quick' if results['quick'] else 'full'} run, "
             f"{results['seconds']:.0f} s). Ratio = fsyncbn / torch: the median over interleaved "
             "rounds, with the lowest and highest round in brackets; below 1 fsyncbn is faster."]
    rows = results["rows"]
    speed = [r for r in rows if _is_speed(r) and r["case"] != "f layer"]
    if speed:
        lines += ["", "| case | shape | mode | against | fsyncbn us | torch us | ratio (spread) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['shape']} | {r['mode']} | {r['vs']} | {r['ours_us']:.0f} | "
                  f"{r['theirs_us']:.0f} | {r['ratio']:.2f} ({r['low']:.2f}-{r['high']:.2f}) |"
                  for r in speed]
    memory = [r for r in rows if _letter(r) == "c"]
    if memory:
        lines += ["", "| case | shape | torch saved bytes | fsyncbn saved bytes | extra |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['shape']} | {r['torch_bytes']} | {r['fsyncbn_bytes']} | "
                  f"{r['extra_bytes']} ({r['extra_bytes'] / max(r['channels'], 1):.0f} per channel) |"
                  for r in memory]
    ddp = [r for r in rows if _letter(r) == "d"]
    if ddp:
        lines += ["", "| case | against | fsyncbn ms | theirs ms | ratio (spread) | BN collectives/step | "
                  "BN bytes/step | one all_reduce ms | latency floor |", "|" + "---|" * 9]
        lines += [f"| {r['case']} | {r.get('vs', 'nn.BatchNorm2d')} | {r['ours_us'] / 1e3:.1f} | "
                  f"{r['theirs_us'] / 1e3:.1f} | {r['ratio']:.2f} ({r['low']:.2f}-{r['high']:.2f}) | "
                  f"{r['bn_collectives_per_step']} | {r['bn_bytes_per_step']} | "
                  f"{r['all_reduce_us'] / 1e3:.2f} | "
                  + (f"{r['latency_floor_ratio']:.2f} |" if "latency_floor_ratio" in r else "- |")
                  for r in ddp]
        lines += ["", "Latency floor: the step of nn.BatchNorm2d plus one idle all_reduce per BN collective, "
                  "over the step of nn.BatchNorm2d: the least ratio any synchronised layer could reach "
                  "against it here."]
    comm = [r for r in rows if _letter(r) == "e"]
    if comm:
        lines += ["", "Numbers per layer and step (a collective counts the numbers in its result: an "
                  "all_reduce of n numbers n, an all_gather of n from W participants W x n):", "",
                  "| world size | C | fsyncbn forward | fsyncbn backward | fsyncbn total (bytes) | "
                  "torch.nn.SyncBatchNorm forward | backward | total (bytes, float32) |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['world_size']} | {r['channels']} | {r['fsyncbn_forward']} | "
                  f"{r['fsyncbn_backward']} | {r['fsyncbn_total']} ({r['fsyncbn_bytes']}) | "
                  f"{r['torch_forward']} | {r['torch_backward']} | {r['torch_total']} ({r['torch_bytes']}) |"
                  for r in comm]
    sync_paths = [r for r in rows if r["case"] == "f layer" or r["case"].startswith("f ResNet")]
    lines += _case_f(sync_paths)
    known = {id(r) for r in speed + memory + ddp + comm + sync_paths}
    others: dict[str, list[dict]] = {}
    for row in rows:
        if id(row) not in known:
            others.setdefault(_letter(row), []).append(row)
    for group in others.values():  # cases this module has no layout for: every key a column
        keys = list(dict.fromkeys(k for r in group for k in r))
        lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in group]
    return "\n".join(lines) + "\n"


def _case_f(rows: list[dict]) -> list[str]:
    """Case f: the synchronised paths per layer (with kernel launches) and per model step."""
    lines: list[str] = []
    layer_rows = [r for r in rows if r["case"] == "f layer"]
    if layer_rows:
        lines += ["", "| f layer | mode | against | fsyncbn us | theirs us | ratio (spread) | kernels "
                  "(fsyncbn / theirs) |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['mode']} | {r['vs']} | {r['ours_us']:.0f} | {r['theirs_us']:.0f} | "
                  f"{r['ratio']:.2f} ({r['low']:.2f}-{r['high']:.2f}) | "
                  f"{r.get('fsyncbn_kernels', '-')} / {r.get('torch_kernels', '-')} |" for r in layer_rows]
    model_rows = [r for r in rows if r["case"].startswith("f ResNet")]
    if model_rows:
        lines += ["", f"| {model_rows[0]['case']} | mode | against | ours ms | theirs ms | ratio (spread) | "
                  "peak memory ratio |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['ours']} | {r['mode']} | {r['vs']} | {r['ours_us'] / 1e3:.1f} | "
                  f"{r['theirs_us'] / 1e3:.1f} | {r['ratio']:.2f} ({r['low']:.2f}-{r['high']:.2f}) | "
                  f"{'-' if r.get('peak_ratio') is None else format(r['peak_ratio'], '.3f')} |"
                  for r in model_rows]
    return lines


# --- the summaries in README.md -----------------------------------------------------------


def _span(values: list[float], digits: int = 2) -> str:
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low} to {high}"


def _speed_span(rows: list[dict], case: str, mode: str) -> str | None:
    ratios = [r["ratio"] for r in rows if _is_speed(r) and _letter(r) == case and r["mode"] == mode]
    return _span(ratios) if ratios else None


# The summary lines of README.md, each with the one plain line that says what it measures.
LOCAL_EAGER = "one layer, not synchronised (no process group), eager"
LOCAL_COMPILED = "the same, both compiled"
SYNC_EAGER = "one layer through the synchronised path, with one participant, eager"
SYNC_COMPILED = "the same, fsyncbn compiled, against eager nn.BatchNorm"
DDP_PLAIN = "a DDP training step (2 gloo processes, 7 BN layers) against nn.BatchNorm2d"
DDP_PEER = "the same step against a synchronised peer (detectron2's NaiveSyncBatchNorm algorithm)"
MEMORY = "memory kept for backward, against nn.BatchNorm's"
EXPLAINED = {
    LOCAL_EAGER: "a training step (forward + backward) of one layer outside any process group, "
                 "the case of a model converted but run in one process",
    LOCAL_COMPILED: "the same step, fsyncbn's layer and nn.BatchNorm both under torch.compile",
    SYNC_EAGER: "the code path of a real multi-process run, with a reducer that returns its input: "
                "the cost of fsyncbn's bookkeeping, without any communication",
    SYNC_COMPILED: "the same path under torch.compile, against the eager nn.BatchNorm it replaces",
    DDP_PLAIN: "nn.BatchNorm2d does not synchronise, so this is the price of synchronising: one "
               "all_reduce round trip per layer in forward and one in backward",
    DDP_PEER: "a layer that also synchronises, written in the benchmark: one all_reduce of [mean, "
              "E[x^2]] per layer forward and one backward, as fsyncbn; below 1 fsyncbn is faster",
    MEMORY: "the bytes that autograd keeps between forward and backward, per channel",
}


def _bytes_phrase(extras: list[float]) -> str:
    """Memory beyond torch's, in words: "the same", "up to 8 bytes less per channel", ..."""
    low, high = min(extras), max(extras)
    if low == high == 0:
        return "the same"
    if high <= 0:
        return f"the same or less (up to {-low:.0f} bytes less per channel)"
    return f"up to {high:.0f} bytes more per channel"


def _summary_rows(results: dict) -> dict[str, str]:
    rows = results["rows"]
    summary = {
        LOCAL_EAGER: _speed_span(rows, "a", "eager"),
        LOCAL_COMPILED: _speed_span(rows, "a", "compiled"),
        SYNC_EAGER: _speed_span(rows, "b", "eager"),
        SYNC_COMPILED: _speed_span(rows, "b", "compiled"),
    }
    # Timed cases without a summary line of their own (a new case): one line per case, mode and
    # reference, over its shapes.
    for row in rows:
        if _is_speed(row) and _letter(row) not in "ab":
            label = f"{row['case']}, {row['mode']}, against {row['vs']}"
            summary.setdefault(label, _span([r["ratio"] for r in rows if _is_speed(r) and (
                r["case"], r["mode"], r["vs"]) == (row["case"], row["mode"], row["vs"])]))
    ddp = [r for r in rows if _letter(r) == "d"]
    plain = [r["ratio"] for r in ddp if "latency_floor_ratio" in r or "vs" not in r]
    peer = [r["ratio"] for r in ddp if "latency_floor_ratio" not in r and "vs" in r]
    floors = [r["latency_floor_ratio"] for r in ddp if "latency_floor_ratio" in r]
    if plain:
        summary[DDP_PLAIN] = _span(plain) + (f" (floor {_span(floors)})" if floors else "")
    if peer:
        summary[DDP_PEER] = _span(peer)
    memory = [r["extra_bytes"] / max(r["channels"], 1) for r in rows if _letter(r) == "c"]
    if memory:
        summary[MEMORY] = _bytes_phrase(memory)
    return {k: v for k, v in summary.items() if v is not None}


def performance_block(results_by_device: dict[str, dict]) -> str:
    """README.md's performance summary: ranges over the shapes of each results file."""
    devices = [d for d in DEVICES if d in results_by_device]
    if not devices:
        return "No results file yet: run `python -m benchmarks`.\n"
    summaries = {d: _summary_rows(results_by_device[d]) for d in devices}
    labels = list(dict.fromkeys(label for d in devices for label in summaries[d]))
    header = [f"{d.upper()}: {results_by_device[d]['machine']}"
              + (" (quick run)" if results_by_device[d]["quick"] else "") for d in devices]
    sources = ", ".join(f"`benchmarks/results/{d}.json`" for d in devices)
    lines = ["Time of fsyncbn over time of torch (below 1: fsyncbn is faster; a range: the lowest and "
             f"highest over the benchmark's shapes), from {sources}.", "",
             "| | " + " | ".join(header) + " |", "|---|" + "---|" * len(devices)]
    lines += [f"| {label} | " + " | ".join(summaries[d].get(label, "-") for d in devices) + " |"
              for label in labels]
    explained = [label for label in labels if label in EXPLAINED]
    if explained:
        lines += ["", "What each line measures:", ""]
        lines += [f"- *{label}*: {EXPLAINED[label]}." for label in explained]
    if any(DDP_PLAIN in summaries[d] and "floor" in summaries[d][DDP_PLAIN] for d in devices):
        lines += ["- *floor*: the ratio the DDP step would have if each of those all_reduce round trips "
                  "cost its idle latency and nothing else: no synchronised layer can go below it."]
    timed = [r for d in devices for r in results_by_device[d]["rows"] if "low" in r and "high" in r]
    if timed:
        lines += ["", f"Single rounds ranged from {min(r['low'] for r in timed):.2f} to "
                  f"{max(r['high'] for r in timed):.2f} (a wide range means a busy machine)."]
    if "cuda" not in devices:
        lines += ["", "GPU: not timed yet. The CUDA path runs torch's own sync-BN kernels for every pass "
                  "over the data and fsyncbn's O(C) steps between them; its sequence of operations is proven "
                  "against references on CPU. `python -m benchmarks --device cuda --cases a,b,f` writes "
                  "`benchmarks/results/cuda.json`, and its figures appear here."]
    comm = [r for d in devices for r in results_by_device[d]["rows"] if _letter(r) == "e"]
    if comm:
        widest = max(comm, key=lambda r: r["world_size"])
        lines += ["", f"Communication per layer and step, {widest['world_size']} participants, "
                  f"C = {widest['channels']}: fsyncbn {widest['fsyncbn_total']} numbers "
                  f"({widest['fsyncbn_forward']} forward + {widest['fsyncbn_backward']} backward, "
                  f"{widest['fsyncbn_bytes']} bytes) at every world size; torch.nn.SyncBatchNorm "
                  f"{widest['torch_total']} ({widest['torch_forward']} + {widest['torch_backward']}, "
                  f"{widest['torch_bytes']} bytes in float32), growing with the world size."]
    return "\n".join(lines) + "\n"


def demo_block(demo: dict) -> str:
    """README.md's demo table, from the demo's results file."""
    s = demo["settings"]
    names = [run["name"] for run in demo["runs"]]
    lines = [f"Measured on {demo['machine']}: {s['epochs']} epochs, {s['steps']} steps, float64, "
             f"{demo['seconds']:.0f} s for the three runs (from `docs/results/demo.json`).", "",
             "| run | test accuracy | training loss (mean of the last 50 steps) |", "|---|---|---|"]
    lines += [f"| {run['name']} | {run['test_accuracy']:.3f} | {run['loss_last_50']:.3f} |"
              for run in demo["runs"]]
    lines += ["", f"The loss curves of {names[1].split(' ')[0]} and {names[2].split(' ')[0]} differ by at "
              f"most {demo['largest_loss_gap_ii_iii']:.1e} over the {s['steps']} steps."]
    spread = demo.get("spread_i")
    if spread:
        acc, loss = spread["test_accuracy"], spread["loss_last_50"]
        lines += ["", f"Run {names[0].split(' ')[0]} barely learns, and where it ends is chaotic: changing "
                  "its initial weights by one part in 10^12 moves it, and so does the rounding of another "
                  f"machine's kernels. Over {spread['runs']} runs with initial weights that far apart, its "
                  f"test accuracy ranged from {acc[0]:.3f} to {acc[1]:.3f} and its loss from {loss[0]:.3f} "
                  f"to {loss[1]:.3f}: expect yours in about that range. {names[1].split(' ')[0]} and "
                  f"{names[2].split(' ')[0]} learn steadily: theirs are the figures to reproduce."]
    tolerance = (f"test accuracy within {DEMO_TOLERANCE['test_accuracy']:g} and training loss within "
                 f"{DEMO_TOLERANCE['loss_last_50']:g}")
    first, second, third = (name.split(" ")[0] for name in names)
    lines += ["", "Every process runs one thread with deterministic kernels and the same data order, so "
              "a rerun on the same machine repeats every figure. The tests rerun the quick mode "
              f"(`--quick`: the first {QUICK_STEPS} steps) and check {second} and {third} against "
              f"`docs/results/demo_quick.json`: {tolerance}; {first}, chaotic already there, only "
              f"to end with a training loss at least {DEMO_BEHIND:g} above {second}'s."]
    return "\n".join(lines) + "\n"


def inplace_abn_block(results: dict) -> str:
    """README.md's InPlaceABN figures (case g), from its results file."""
    rows = results["rows"]
    variants = ("torch BN + LeakyReLU(inplace)", "fsyncbn out-of-place", "fsyncbn InPlaceABN")
    lines = [f"Measured on {results['machine']} ({'quick' if results['quick'] else 'full'} run, from "
             "`benchmarks/results/inplace_abn_cpu.json`; the figure `docs/inplace_abn.png` is drawn from "
             "the same file).", "",
             "| what | torch BN + LeakyReLU(inplace) | fsyncbn out-of-place | InPlaceABN | "
             "InPlaceABN / torch |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r["case"] == "g saved bytes":
            label = f"saved for backward, {r['depth']} conv-norm-act blocks, {r['mode']} (MiB)"
        elif r["case"].startswith("g peak memory"):
            label = f"peak memory of a training step, {r['head']} head (MiB)"
        else:
            continue
        lines.append(f"| {label} | " + " | ".join(f"{r[v] / 2**20:.1f}" for v in variants)
                     + f" | {r['ratio vs torch']:.3f} |")
    timed = [r for r in rows if "ratio" in r]
    if timed:
        lines += ["", "| time, InPlaceABN against | shape | ratio (spread) |", "|---|---|---|"]
        lines += [f"| {r['vs']}, {r['case'][2:]} | {r['shape']} | "
                  f"{r['ratio']:.2f} ({r['low']:.2f}-{r['high']:.2f}) |"
                  for r in timed]
    return "\n".join(lines) + "\n"


# --- the files ---------------------------------------------------------------------------


def load_results() -> dict[str, dict]:
    """The benchmark results files present, by device."""
    return {d: json.loads((RESULTS / f"{d}.json").read_text())
            for d in DEVICES if (RESULTS / f"{d}.json").is_file()}


def benchmarks_readme(results_by_device: dict[str, dict]) -> str:
    parts = [
        "# Benchmarks\n",
        "Generated by `python -m benchmarks.report` from `benchmarks/results/*.json`, which "
        "`python -m benchmarks` writes; do not edit by hand. The same command fills the figures in "
        "the top-level README, also from `docs/results/demo.json`, which `python examples/small_batch.py "
        "--out docs/small_batch.png --results docs/results/demo.json` writes.\n",
        "`python -m benchmarks` (`--quick` for fewer rounds and shapes, `--device cuda` on a GPU, "
        "`--cases a,c` to choose) times each case against torch in the same run, interleaved. "
        "Cases: (a) one layer's forward + backward against nn.BatchNorm, eager and compiled; "
        "(b) the synchronised path with one participant against eager nn.BatchNorm; (c) bytes "
        "saved for backward; (d) a DDP training step, 2 gloo processes, a conv net with 7 BN "
        "layers, against nn.BatchNorm2d (not synchronised) and against a synchronised peer (detectron2's "
        "NaiveSyncBatchNorm algorithm, written in benchmarks/cases.py); (e) numbers sent per layer and "
        "step against the world size.\n",
    ]
    for device in DEVICES:
        if device in results_by_device:
            parts += [f"## {device.upper()}\n", markdown(results_by_device[device])]
    return "\n".join(parts)


def fill_blocks(text: str, blocks: dict[str, str]) -> str:
    """``text`` with each ``<!-- figures:NAME -->`` ... ``<!-- /figures:NAME -->`` refilled."""
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- figures:{name} -->\n).*?(<!-- /figures:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"fill_blocks: no <!-- figures:{name} --> ... <!-- /figures:{name} --> block")
        text = pattern.sub(lambda m, body=body: m[1] + body + m[2], text)
    return text


def expected_files() -> dict[Path, str]:
    """What benchmarks/README.md and README.md must read, given the results files."""
    results = load_results()
    blocks = {"performance": performance_block(results)}
    if DEMO.is_file():
        blocks["demo"] = demo_block(json.loads(DEMO.read_text()))
    if INPLACE_ABN.is_file():
        blocks["inplace_abn"] = inplace_abn_block(json.loads(INPLACE_ABN.read_text()))
    return {BENCHMARKS_README: benchmarks_readme(results),
            README: fill_blocks(README.read_text(), blocks)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that are out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        current = path.read_text() if path.is_file() else ""
        if current != text:
            stale.append(path)
            if not args.check:
                path.write_text(text)
    for path in stale:
        print(f"{'out of date' if args.check else 'rewritten'}: {path.relative_to(ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
