"""Lightning: SyncBatchNormPlugin in a real Trainer, 2 CPU processes (strategy "ddp", gloo).

The trained weights and running statistics equal a single-process reference on the union of
the ranks' batches, the Trainer hands the model back with torch's classes, and the processes
exit with status 0 every time (they used to abort now and then at exit, "terminate called
without an active exception"). Each fit is a fresh pair of processes (tests/_scripts/lightning_fit.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests._support.distributed import free_port

pytest.importorskip("lightning")

from fsyncbn.integrations.lightning import SyncBatchNormPlugin  # noqa: E402
from tests._support import fit_reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Each way once (plugin, then a model the user converted). The exit race that once made some of
# these fits abort is forced, every run, by tests/test_exit_race.py; scripts/exit_soak.py repeats
# these fits under load (--runs N).
RUNS = 2


def _start_fit(out_dir: Path, how: str) -> subprocess.Popen:
    env = {
        **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests._scripts.lightning_fit", str(out_dir), how], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def test_plugin_converts_and_reverts():
    plugin = SyncBatchNormPlugin()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.SyncBatchNorm(4))
    synced = plugin.apply(model)
    assert [type(m).__name__ for m in synced] == ["Conv2d", "SynchronizedBatchNorm2d", "SyncBatchNorm"]
    assert type(synced[2]).__module__ == "fsyncbn.modules"
    assert [type(m) for m in plugin.revert(synced)] == [nn.Conv2d, nn.BatchNorm2d, nn.SyncBatchNorm]
    from lightning.pytorch.plugins import LayerSync

    assert isinstance(plugin, LayerSync)


@pytest.mark.distributed
@pytest.mark.slow
def test_fit_equals_the_union_reference_and_exits_cleanly_every_time(tmp_path):
    """RUNS fits, alternately with the plugin and with a model the user converted, one at a time
    (two at a time overloaded 2 cores with 4 processes, the load under which exits used to fail)."""
    reference = fit_reference.reference()
    failures = []
    for first in range(0, RUNS):
        runs = {}
        for run in (first,):
            how = "plugin" if run % 2 == 0 else "convert"
            (tmp_path / f"run{run}").mkdir()
            runs[run] = (how, _start_fit(tmp_path / f"run{run}", how))
        for run, (how, process) in runs.items():
            try:
                _, stderr = process.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                process.kill()
                _, stderr = process.communicate()
            # Lightning's second rank shares this stderr; its status is not the launcher's.
            if process.returncode != 0 or "terminate called" in stderr:
                failures.append(f"run {run} ({how}): exit status {process.returncode}\n{stderr[-2000:]}")
                continue
            for rank in range(2):
                saved = torch.load(tmp_path / f"run{run}" / f"rank{rank}.pt")
                for key, value in reference.items():
                    torch.testing.assert_close(saved["state"][key], value, rtol=1e-10, atol=1e-10,
                                               msg=f"run {run} ({how}) rank {rank}: {key}")
                expected = "BatchNorm1d" if how == "plugin" else "SynchronizedBatchNorm1d"
                assert saved["classes"].count(expected) == 2, saved["classes"]
    assert not failures, "\n".join(failures)
