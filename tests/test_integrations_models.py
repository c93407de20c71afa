"""Real models end to end: torchvision's resnet18 and timm's efficientnet_b0 (49 BatchNormAct2d).

Convert, train a few steps as 2 synchronized DataParallel-style replicas (CPU threads, float64),
revert, and compare with the unsynchronized model trained on the whole batch
(tests/_support/sync_check.py). torchvision and timm need a torch build that matches their wheels: on
a CPU-only torch they do not import, and these tests skip; wherever they import (a CUDA build
of torch), they run, on the CPU.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from fsyncbn import ConversionWarning, convert_model
from tests._support.sync_check import replicas_train_like_one_model


def _import_or_skip(name: str):  # type: ignore[no-untyped-def]
    """The module, or a skip: a wheel built for another torch fails with other errors than ImportError."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any failure to import means "not usable here"
        pytest.skip(f"{name} does not import here: {type(exc).__name__}: {exc}")


def test_torchvision_resnet18_trains_like_one_model_on_the_whole_batch():
    torchvision = _import_or_skip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        reverted = replicas_train_like_one_model(model, x, [2, 4], steps=2, tol=1e-8)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in reverted.modules()) == 20


def test_timm_efficientnet_b0_trains_like_one_model_on_the_whole_batch():
    timm = _import_or_skip("timm")
    BatchNormAct2d = timm.layers.BatchNormAct2d  # noqa: N806 - the class, by its name

    from fsyncbn.integrations.timm import SynchronizedBatchNormAct2d

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", num_classes=10, drop_rate=0.0, drop_path_rate=0.0).double()
    assert sum(type(m) is BatchNormAct2d for m in model.modules()) == 49
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        converted = convert_model(timm.create_model("efficientnet_b0"))
    assert sum(type(m) is SynchronizedBatchNormAct2d for m in converted.modules()) == 49
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    reverted = replicas_train_like_one_model(model, x, [1, 3], steps=2, tol=1e-8)
    acts = [type(m.act) for m in reverted.modules() if isinstance(m, BatchNormAct2d)]
    assert acts == [type(m.act) for m in model.modules() if isinstance(m, BatchNormAct2d)]
