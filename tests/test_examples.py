"""Every example runs as written (tiny settings); torchrun on one and on two "nodes"."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._support.distributed import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _run(*args: str, timeout: float = 300) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0 and "terminate called" not in result.stderr, (
        result.stdout[-3000:] + result.stderr[-3000:])
    return result.stdout


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_batch_demo_reproduces_the_published_quick_figures(tmp_path):
    """The demo's quick mode, rerun, gives the figures of docs/results/demo_quick.json within the
    tolerance the README states (benchmarks.report.DEMO_TOLERANCE) for runs (ii) and (iii); run (i)
    is chaotic (scalar kernels instead of AVX2 moved its accuracy from 0.181 to 0.097 in 40 steps,
    while (ii) moved by 5e-9), so it is held only to stay behind."""
    from benchmarks import report

    source = (EXAMPLES / "small_batch.py").read_text()
    assert re.search(r"^QUICK_STEPS = (\d+)$", source, re.M)[1] == str(report.QUICK_STEPS)
    out = _run("examples/small_batch.py", "--quick", "--out", str(tmp_path / "plot.png"),
               "--results", str(tmp_path / "demo.json"))
    steps = report.QUICK_STEPS
    gap = float(re.search(rf"largest \|loss \(ii\) - loss \(iii\)\| over {steps} steps: (\S+)", out)[1])
    assert gap < 1e-9, out
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    figures = json.loads((tmp_path / "demo.json").read_text())
    published = json.loads(report.DEMO_QUICK.read_text())
    assert figures["settings"] == published["settings"] and figures["settings"]["steps"] == steps
    assert f"{figures['largest_loss_gap_ii_iii']:.2e}" in out
    for index, (run, ref) in enumerate(zip(figures["runs"], published["runs"], strict=True)):
        assert run["name"] == ref["name"]
        # The results file holds the printed figures.
        row = rf"{re.escape(run['name'])}\s+{run['test_accuracy']:.3f}\s+{run['loss_last_50']:.4f}"
        assert re.search(row, out), (run, out)
        if index > 0:
            for key, tolerance in report.DEMO_TOLERANCE.items():
                assert abs(run[key] - ref[key]) <= tolerance, (key, run, ref)
    plain, synced = figures["runs"][:2]
    assert plain["loss_last_50"] >= synced["loss_last_50"] + report.DEMO_BEHIND, figures["runs"]
    assert published["largest_loss_gap_ii_iii"] < 1e-9


def test_functional_example():
    out = _run("examples/functional.py")
    gap = float(re.search(r"batch norm on all 10: max difference (\S+)", out)[1])
    assert gap < 1e-12
    ensemble_gap = float(re.search(r"vmap vs a loop over the members: max difference (\S+)", out)[1])
    assert ensemble_gap < 1e-6, out


def test_dataparallel_example():
    assert "replica(s); running_mean" in _run("examples/dataparallel.py")


def test_compile_example():
    out = _run("examples/compile.py")
    assert "graph breaks: 0" in out and "running stats equal: True" in out


def _reference_stats(world_size: int, steps: int = 5, per_process_batch: int = 2):
    """One process, no synchronisation, the whole global batch: what DDP + fsyncbn must give."""
    example = _load("ddp_torchrun")
    model = example.make_model()
    example.train(model, example.global_batches(steps, per_process_batch * world_size), 0, 1)
    return {k: v for k, v in model.state_dict().items() if "running" in k}


def _check_stats(stats_dir: Path, world_size: int) -> None:
    per_rank = [torch.load(stats_dir / f"rank{r}.pt") for r in range(world_size)]
    reference = _reference_stats(world_size)
    for stats in per_rank:
        assert stats.keys() == reference.keys()
        for key in reference:
            assert torch.equal(stats[key], per_rank[0][key]), f"{key} differs between ranks"
            torch.testing.assert_close(stats[key], reference[key], rtol=1e-10, atol=1e-10)


def test_ddp_torchrun_runs_alone_as_a_group_of_one(tmp_path):
    """Plain ``python``, no torchrun: one process whose statistics are its own batch's."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in __import__("os").environ.items() if k not in launcher}
    result = subprocess.run([sys.executable, "examples/ddp_torchrun.py", "--stats-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**env, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 0/1: running_mean of the first BN" in result.stdout
    _check_stats(tmp_path, 1)


@pytest.mark.distributed
def test_ddp_torchrun_one_node(tmp_path):
    _run("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), "examples/ddp_torchrun.py", "--timeout", "30",
         "--stats-dir", str(tmp_path))
    _check_stats(tmp_path, 2)


@pytest.mark.distributed
def test_ddp_torchrun_two_nodes(tmp_path):
    port = str(free_port())
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
             str(node), "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "examples/ddp_torchrun.py", "--timeout", "30", "--stats-dir", str(tmp_path)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    for launch in launches:
        out, _ = launch.communicate(timeout=300)
        assert launch.returncode == 0 and "terminate called" not in out, out[-3000:]
    _check_stats(tmp_path, 2)
