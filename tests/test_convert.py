"""convert_model / revert_model / patch_sync_batchnorm on a ResNet-shaped model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fsyncbn
from fsyncbn import (
    DataParallelWithCallback,
    SyncBatchNorm,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    convert_model,
    patch_sync_batchnorm,
    revert_model,
)
from tests._support.models import TinyResNet


def _customised_model():
    torch.manual_seed(0)
    model = TinyResNet().double()
    model.layer1.bn1 = nn.BatchNorm2d(8, eps=1e-3, momentum=None, dtype=torch.float64)
    model.layer2.bn2 = nn.BatchNorm2d(16, affine=False, track_running_stats=False, dtype=torch.float64)
    model.extra = nn.SyncBatchNorm(16, momentum=0.3, bias=False, dtype=torch.float64)
    model.stem[1].weight.requires_grad_(False)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    model(x)  # some statistics and num_batches_tracked
    model.head_bn.eval()
    return model


def _layers(model):
    return {
        name: m for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }


HYPER = ("num_features", "eps", "momentum", "affine", "track_running_stats", "training")


def test_convert_keeps_every_tensor_flag_and_hyperparameter():
    model = _customised_model()
    before = {
        name: (
            type(m),
            {k: getattr(m, k) for k in HYPER},
            dict(m.named_parameters()),
            dict(m.named_buffers()),
            m.bias is None,
        )
        for name, m in _layers(model).items()
    }
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_model(model)
    expected_cls = {
        nn.BatchNorm1d: SynchronizedBatchNorm1d,
        nn.BatchNorm2d: SynchronizedBatchNorm2d,
        nn.SyncBatchNorm: SyncBatchNorm,
    }
    layers = _layers(converted)
    assert layers.keys() == before.keys()
    for name, m in layers.items():
        cls, hyper, params, buffers, no_bias = before[name]
        assert type(m) is expected_cls[cls], name
        assert {k: getattr(m, k) for k in HYPER} == hyper, name
        assert (m.bias is None) == no_bias
        for key, p in params.items():
            assert getattr(m, key) is p and p.requires_grad == getattr(m, key).requires_grad
        for key, b in buffers.items():
            assert getattr(m, key) is b
    assert converted.stem[1].weight.requires_grad is False
    for key, value in converted.state_dict().items():
        assert torch.equal(value, tensors[key]) and value.dtype == tensors[key].dtype


def test_converted_model_computes_the_same_and_reverts_exactly():
    model = _customised_model()
    reference = _customised_model()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    converted = convert_model(model)
    torch.testing.assert_close(converted(x), reference(x), rtol=1e-12, atol=1e-12)
    classes = {name: type(m) for name, m in _layers(reference).items()}
    reverted = revert_model(converted)
    assert {name: type(m) for name, m in _layers(reverted).items()} == classes
    torch.testing.assert_close(reverted(x), reference(x), rtol=1e-12, atol=1e-12)
    for key, value in reverted.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[key])


def test_data_parallel_anywhere_becomes_data_parallel_with_callback():
    inner = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model = nn.Sequential(nn.DataParallel(inner), nn.ReLU())
    converted = convert_model(model)
    assert type(converted[0]) is DataParallelWithCallback
    assert type(converted[0].module[1]) is SynchronizedBatchNorm1d
    assert converted[0].device_ids == model[0].device_ids
    for attr in ("output_device", "dim"):
        assert hasattr(converted[0], attr) == hasattr(model[0], attr)
    top = convert_model(nn.DataParallel(inner))
    assert type(top) is DataParallelWithCallback
    back = revert_model(top)
    assert type(back) is nn.DataParallel and type(back.module[1]) is nn.BatchNorm1d


def test_revert_warns_about_clamp_mode():
    model = nn.Sequential(SynchronizedBatchNorm2d(3, eps_mode="clamp"))
    with pytest.warns(UserWarning, match="eps_mode='clamp' becomes BatchNorm2d"):
        reverted = revert_model(model)
    assert type(reverted[0]) is nn.BatchNorm2d


def test_convert_passes_the_process_group_and_keeps_user_subclasses():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(MyBN(3), nn.BatchNorm2d(3))
    with pytest.warns(fsyncbn.ConversionWarning, match="MyBN at '0'"):
        converted = convert_model(model)
    assert type(converted[0]) is MyBN and type(converted[1]) is SynchronizedBatchNorm2d


def test_patch_sync_batchnorm_restores_even_on_error():
    originals = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    with pytest.raises(RuntimeError, match="inside"):
        with patch_sync_batchnorm():
            model = TinyResNet()
            raise RuntimeError("inside")
    assert (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) == originals
    with patch_sync_batchnorm():
        model = TinyResNet()
    assert type(model.stem[1]) is SynchronizedBatchNorm2d
    assert type(model.head_bn) is SynchronizedBatchNorm1d
    assert type(TinyResNet().stem[1]) is nn.BatchNorm2d


def test_everything_is_exported():
    for name in (
        "SynchronizedBatchNorm1d",
        "SynchronizedBatchNorm2d",
        "SynchronizedBatchNorm3d",
        "SyncBatchNorm",
        "DataParallelWithCallback",
        "patch_replication_callback",
        "convert_model",
        "revert_model",
        "patch_sync_batchnorm",
        "set_sbn_eps_mode",
    ):
        assert name in fsyncbn.__all__ and hasattr(fsyncbn, name)
