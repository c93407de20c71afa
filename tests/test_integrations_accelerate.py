"""Accelerate: the docs' recipe (convert_model before ``accelerator.prepare``) under torchrun with
2 CPU processes; both ranks end with the weights and running statistics of a single process
trained on the union of their batches (tests/_support/fit_reference.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._support import fit_reference
from tests._support.distributed import free_port

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.distributed
@pytest.mark.slow
def test_accelerate_under_torchrun_equals_the_union_reference(tmp_path):
    env = {
        **os.environ, "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "-m", "tests._scripts.accelerate_fit", str(tmp_path),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-3000:]
    reference = fit_reference.reference()
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=1e-10, atol=1e-10, msg=f"rank {rank}: {key}")
