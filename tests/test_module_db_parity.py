"""Parity with torch's own test table: every BatchNorm1d/2d/3d case of module_db."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing._internal.common_modules import module_db

from fsyncbn import SynchronizedBatchNorm1d, SynchronizedBatchNorm2d, SynchronizedBatchNorm3d

OURS = {
    nn.BatchNorm1d: SynchronizedBatchNorm1d,
    nn.BatchNorm2d: SynchronizedBatchNorm2d,
    nn.BatchNorm3d: SynchronizedBatchNorm3d,
}
INFOS = [info for info in module_db if info.module_cls in OURS]
# An empty table would make every test below pass with zero cases.
assert {info.module_cls for info in INFOS} == OURS.keys(), "module_db lost its BatchNorm1d/2d/3d entries"


def _cases(kind: str):
    for info in INFOS:
        for dtype in (torch.float32, torch.float64):
            for training in (True, False):
                make = info.module_inputs_func if kind == "inputs" else info.module_error_inputs_func
                if make is None:
                    continue
                entries = make(info, device="cpu", dtype=dtype, requires_grad=True, training=training)
                for i, entry in enumerate(entries):
                    inner = getattr(entry, "module_error_input", entry)
                    desc = getattr(inner, "desc", "")
                    yield pytest.param(
                        info,
                        entry,
                        dtype,
                        training,
                        id=f"{info.module_cls.__name__}-{desc or i}-{dtype}-{('eval', 'train')[training]}",
                    )


def _forward_backward(module, args, kwargs):
    args = [
        a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args
    ]
    out = module(*args, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    leaves += [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * g.to(out.dtype)).sum(), leaves, allow_unused=True)
    return out.detach(), grads


INPUT_CASES = list(_cases("inputs"))
ERROR_CASES = list(_cases("errors"))


def test_the_case_lists_cover_every_class():
    """Both tables hold cases for each of BatchNorm1d/2d/3d (an empty list would pass vacuously)."""
    for cases in (INPUT_CASES, ERROR_CASES):
        assert {case.values[0].module_cls for case in cases} == OURS.keys()


@pytest.mark.parametrize(("info", "entry", "dtype", "training"), INPUT_CASES)
def test_same_as_torch(info, entry, dtype, training):
    c_args, c_kwargs = entry.constructor_input.args, entry.constructor_input.kwargs
    torch_bn = info.module_cls(*c_args, **c_kwargs, dtype=dtype)
    ours = OURS[info.module_cls](*c_args, **c_kwargs, dtype=dtype)
    with torch.no_grad():
        for p in torch_bn.parameters():
            p.uniform_(0.5, 1.5)
        if torch_bn.running_mean is not None:
            torch_bn.running_mean.uniform_(-1, 1)
            torch_bn.running_var.uniform_(0.5, 2)
    ours.load_state_dict(torch_bn.state_dict())
    torch_bn.train(training)
    ours.train(training)
    f_args, f_kwargs = entry.forward_input.args, entry.forward_input.kwargs
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for _ in range(2):  # twice: the updated buffers feed the second step
        out_ref, grads_ref = _forward_backward(torch_bn, f_args, f_kwargs)
        out, grads = _forward_backward(ours, f_args, f_kwargs)
        torch.testing.assert_close(out, out_ref, **tol)
        assert len(grads) == len(grads_ref)
        for got, want in zip(grads, grads_ref, strict=True):
            if want is None:
                assert got is None or not got.any()
            else:
                torch.testing.assert_close(got, want, **tol)
        sd, sd_ref = ours.state_dict(), torch_bn.state_dict()
        assert sd.keys() == sd_ref.keys()
        for key in sd_ref:
            assert sd[key].dtype == sd_ref[key].dtype
            torch.testing.assert_close(sd[key], sd_ref[key], **tol)


@pytest.mark.parametrize(("info", "entry", "dtype", "training"), ERROR_CASES)
def test_same_errors_as_torch(info, entry, dtype, training):
    """The same error type as torch; a ValueError at construction counts (eps < 0 is rejected there).

    Where torch raises nothing (eps = 0 in eval mode: the table's error comes from training's
    check only), ours must raise nothing either and give torch's output: no case passes on two
    silences alone.
    """
    inp = entry.module_error_input
    c_args, c_kwargs = inp.constructor_input.args, inp.constructor_input.kwargs
    f_args = inp.forward_input.args

    def outcome(cls):
        try:
            module = cls(*c_args, **c_kwargs, dtype=dtype)
        except Exception as exc:  # noqa: BLE001
            return type(exc), None
        module.train(training)
        try:
            return None, module(*f_args).detach()
        except Exception as exc:  # noqa: BLE001
            return type(exc), None

    torch_error, torch_out = outcome(info.module_cls)
    our_error, our_out = outcome(OURS[info.module_cls])
    assert our_error == torch_error
    if torch_error is not None:
        assert issubclass(torch_error, entry.error_type), (torch_error, entry.error_type)
    else:
        assert not training and c_kwargs["eps"] == 0.0, "torch raised nothing where its table says it raises"
        torch.testing.assert_close(our_out, torch_out)
