"""The fused Triton path (fsyncbn.functional.fused), checked on CPU under Triton's interpreter.

The kernels serve eager CUDA training; Triton's interpreter runs the same kernels on CPU tensors,
so their numerics are tested here without a GPU (their speed only on one: benchmark case f).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

CHECKS = ["check_equals_torch", "check_in_place_and_no_state", "check_reduced_precision",
          "check_clamp_gradient", "check_offset_data", "check_sharded_equals_global",
          "check_launch_budget"]


@pytest.mark.parametrize("check", CHECKS)
def test_fused_path_under_the_triton_interpreter(check):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "FSYNCBN_FUSED_ON_CPU": "1",
           "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "tests.functional.fused_checks", check],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{check}: ok" in result.stdout


def test_the_fused_path_stays_off_the_cpu_by_default():
    import torch

    from fsyncbn.functional import kernels

    assert not kernels.runs_fused(torch.randn(4, 3))
