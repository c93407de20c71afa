"""Ahead-of-time compilation of every Triton kernel in fsyncbn for real NVIDIA GPUs, no GPU needed.

Triton's interpreter (which runs the kernels in the other tests) accepts code the GPU compiler
rejects, so each launch the CUDA sync path can make is compiled here for sm_80 and sm_90:
the launches are recorded from the path's own launch code for every configuration it has
(statistics dtype, state or not, momentum or cumulative average, eps mode, a count past
int32), specialised by Triton's own binder as a CUDA launch would be, then compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``; ptxas (shipped with
Triton's nvidia backend) reports registers and spills. Needs the Triton version torch's CUDA
wheel pins (the [test] extra pins it): the binder is Triton's private API.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from fsyncbn.functional.paths import cuda_glue, cuda_sync  # noqa: E402

ARCHES = (80, 90)
KERNELS = [name for name in dir(cuda_glue) if name.endswith("_kernel")]


class _Recorder:
    def __init__(self, name: str, launches: list) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, args, kwargs))


def _recorded_launches(monkeypatch) -> list:
    """Every distinct launch of the glue, from cuda_sync's launch code on CPU tensors."""
    launches: list = []
    for name in KERNELS:
        monkeypatch.setattr(cuda_glue, name, _Recorder(name, launches))
    channels = 5
    for dtype in (torch.float32, torch.float64):
        mean, var = torch.zeros(channels, dtype=dtype), torch.ones(channels, dtype=dtype)
        for count in (7, 2**33):  # an int32 and an int64 count
            cuda_sync._pack(mean, var, count, channels)
        total = torch.zeros(8 + 2 * channels, dtype=torch.float64)
        for has_state, momentum, clamp, in_place in itertools.product(
            (True, False), (0.1, None), (False, True), (False, True)
        ):
            state = {
                "running_mean": torch.zeros(channels, dtype=dtype),
                "running_var": torch.ones(channels, dtype=dtype),
                "num_batches_tracked": torch.zeros((), dtype=torch.long),
            } if has_state else None
            cuda_sync._merge(total[: 4 + 2 * channels], state, momentum, 1e-5, clamp, dtype, in_place)
    return launches


def _specialise(name: str, args: tuple, kwargs: dict, target: GPUTarget) -> tuple:
    """What a CUDA launch of these arguments compiles: Triton's binder gives the signature,
    the constants and the attributes (alignment) from the actual arguments."""
    fn = getattr(cuda_glue, name)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**kwargs, "debug": False}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return fn, options, signature, constexprs, attrs


def _ptxas_report(compiled, arch: int) -> dict[str, int]:
    from triton.backends.nvidia import compiler as nvidia

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        result = subprocess.run(
            [nvidia.get_ptxas(arch).path, "-v", f"--gpu-name={nvidia.sm_arch_from_capability(arch)}",
             ptx, "-o", os.path.join(tmp, "kernel.o")],
            capture_output=True, text=True, check=True,
        )
    log = result.stdout + result.stderr

    def number(pattern: str) -> int:
        match = re.search(pattern, log)
        assert match, f"ptxas reported no {pattern!r}: {log}"
        return int(match.group(1))

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
    }


@pytest.mark.slow
def test_every_glue_kernel_compiles_for_sm80_and_sm90_without_spills(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    launches = _recorded_launches(monkeypatch)
    monkeypatch.undo()
    assert {name for name, _, _ in launches} == set(KERNELS) and len(KERNELS) == 2
    failures, reports, seen = [], [], set()
    for (name, args, kwargs), arch in itertools.product(launches, ARCHES):
        target = GPUTarget("cuda", arch, 32)
        fn, options, signature, constexprs, attrs = _specialise(name, args, kwargs, target)
        key = (name, arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())))
        if key in seen:
            continue
        seen.add(key)
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
        except Exception as exc:  # noqa: BLE001 - every failure is listed, then the test fails
            failures.append(f"{name} sm_{arch} {signature}: {type(exc).__name__}: {exc}")
            continue
        report = _ptxas_report(compiled, arch)
        reports.append((name, arch, signature, report))
        print(f"{name} sm_{arch} {dict(signature)}: {report}")
    assert not failures, "\n".join(failures)
    # 2 statistics dtypes x (pack: 2 count types; merge: 6 constant combinations) per arch.
    assert len(reports) == len(ARCHES) * 2 * (2 + 6), len(reports)
    spilling = [r for r in reports if r[3]["spill_stores"] or r[3]["spill_loads"]]
    assert not spilling, spilling
