"""Conversion that never changes what a layer computes: exact classes, the registry, timm-style
norm + activation layers, the warning for unknown subclasses, lazy layers, and revert.

timm does not import on a CPU-only torch here, so its layers are mimicked: an nn.BatchNorm2d
subclass with ``act`` and ``drop`` whose forward is timm's (norm, then drop, then act). The
real timm model runs in tests/test_integrations_models.py wherever timm imports.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fsyncbn
from fsyncbn import (
    ConversionWarning,
    SynchronizedBatchNorm2d,
    convert_model,
    register_conversion,
    revert_model,
)
from fsyncbn.integrations.timm import SyncBatchNormAct, SynchronizedBatchNormAct2d, register_norm_act
from tests._support.reference import informative_grad
from tests._support.sync_check import replicas_train_like_one_model


class MimicBatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d in structure: the norm, then ``drop``, then ``act``."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 act_layer=nn.ReLU, inplace=True, drop_layer=None, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if act_layer is not None else nn.Identity()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, factor, self.eps)
        return self.act(self.drop(x))


class MimicSyncBatchNormAct(nn.SyncBatchNorm):
    """timm's SyncBatchNormAct in structure: nn.SyncBatchNorm, then drop and act if present."""

    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class MimicSynchronizedAct2d(SynchronizedBatchNormAct2d):
    """Our counterpart of the mimic (a subclass, so timm's own registration is untouched)."""


class MimicSyncAct(SyncBatchNormAct):
    pass


register_norm_act(MimicBatchNormAct2d, MimicSynchronizedAct2d)
register_norm_act(MimicSyncBatchNormAct, MimicSyncAct)


class NormActNet(nn.Module):
    """A small CNN built from norm + activation layers, the way timm builds its models."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = MimicBatchNormAct2d(6)  # in-place ReLU, as timm's default
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = MimicBatchNormAct2d(8, act_layer=nn.SiLU)
        self.bn3 = nn.BatchNorm2d(8, momentum=None)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn3(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        return self.head(x.mean((2, 3)))


def _tensors(module):
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def test_norm_act_layer_keeps_act_drop_and_every_tensor():
    layer = MimicBatchNormAct2d(5, momentum=0.3, drop_layer=lambda: nn.Dropout(0.0)).double()
    layer(torch.randn(4, 5, 3, 3, dtype=torch.float64))
    before = _tensors(layer)
    act, drop = layer.act, layer.drop
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        synced = convert_model(nn.Sequential(layer))[0]
    assert type(synced) is MimicSynchronizedAct2d
    assert synced.act is act and synced.drop is drop
    assert synced.momentum == 0.3 and synced.training
    after = _tensors(synced)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    back = revert_model(nn.Sequential(synced))[0]
    assert type(back) is MimicBatchNormAct2d and back.act is act and back.drop is drop
    assert all(_tensors(back)[k] is before[k] for k in before)


@pytest.mark.parametrize("training", [True, False])
def test_norm_act_layer_computes_what_timm_computes(training):
    torch.manual_seed(0)
    plain = MimicBatchNormAct2d(4, act_layer=nn.ReLU).double().train(training)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2)
        plain.bias.uniform_(-1, 1)
        plain.running_mean.uniform_(-1, 1)
    synced = MimicSynchronizedAct2d.from_batchnorm(plain)
    synced._set_act_drop(act=nn.ReLU(inplace=True), drop=None)
    reference = MimicBatchNormAct2d(4).double().train(training)
    reference.load_state_dict(plain.state_dict())
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = informative_grad((6, 4, 3, 3), torch.float64)
    out, out_ref = synced(x), reference(x_ref)
    assert out.min() == 0.0  # the activation ran (the bug was a minimum of -1.46)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(synced.weight.grad, reference.weight.grad, rtol=1e-12, atol=1e-12)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(synced.state_dict()[key], value, rtol=0, atol=0)


def test_norm_act_model_replicas_train_like_one_model_on_the_whole_batch():
    torch.manual_seed(1)
    plain = NormActNet().double()
    x = torch.randn(7, 3, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        reverted = replicas_train_like_one_model(plain, x, [3, 4], steps=2)
    assert isinstance(reverted.bn1.act, nn.ReLU) and isinstance(reverted.bn2.act, nn.SiLU)


def test_sync_norm_act_converts_and_reverts_with_its_process_group():
    layer = MimicSyncBatchNormAct(3, momentum=0.2)
    layer.act = nn.ReLU()
    synced = convert_model(layer)
    assert type(synced) is MimicSyncAct and isinstance(synced.act, nn.ReLU)
    assert synced(torch.randn(4, 3, 5)).min() >= 0  # any rank, as nn.SyncBatchNorm
    back = revert_model(synced)
    assert type(back) is MimicSyncBatchNormAct and back.act is layer.act
    assert back.process_group is None and back.running_mean is layer.running_mean


def test_unknown_subclasses_stay_and_are_named_once():
    class Shifted(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) + 1

    class Other(nn.BatchNorm1d):
        pass

    model = nn.Sequential(
        nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.BatchNorm3d(3), nn.SyncBatchNorm(3),
        Shifted(3), nn.Sequential(Shifted(3), Other(3)), SynchronizedBatchNorm2d(3),
    )
    with pytest.warns(ConversionWarning) as record:
        converted = convert_model(model)
    assert len(record) == 1
    text = str(record[0].message)
    assert "convert_model: left these batch-norm subclasses unsynchronized" in text
    qualname = "tests.test_integrations_timm.test_unknown_subclasses_stay_and_are_named_once"
    assert f"{qualname}.<locals>.Shifted at '4', '5.0'" in text
    assert f"{qualname}.<locals>.Other at '5.1'" in text
    assert "fsyncbn.register_conversion" in text
    names = [type(m).__name__ for m in converted]
    assert names[:4] == ["SynchronizedBatchNorm1d", "SynchronizedBatchNorm2d", "SynchronizedBatchNorm3d",
                         "SyncBatchNorm"]
    assert type(converted[4]) is Shifted and type(converted[5][1]) is Other
    assert type(converted[6]) is SynchronizedBatchNorm2d
    reverted = revert_model(converted)
    assert [type(m) for m in reverted.modules()] == [
        nn.Sequential, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, Shifted,
        nn.Sequential, Shifted, Other, nn.BatchNorm2d,
    ]


def test_sync_batch_norm_convert_sync_batchnorm_leaves_norm_act_layers_alone():
    model = NormActNet()
    with pytest.warns(UserWarning, match=r"convert_sync_batchnorm: left tests.test_integrations_timm."
                                         r"MimicBatchNormAct2d unconverted"):
        converted = fsyncbn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted.bn1) is MimicBatchNormAct2d and type(converted.bn3) is fsyncbn.SyncBatchNorm


def test_lazy_layers_warn_until_initialised_then_convert():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d(), nn.LazyBatchNorm1d())
    with pytest.warns(ConversionWarning, match=r"left 2 lazy batch-norm layer\(s\) unsynchronized.*'1', '2'.*"
                      r"run one forward pass before convert_model"):
        convert_model(model)
    model[1](torch.randn(2, 4, 3, 3))
    model[2](torch.randn(2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = convert_model(model)
    assert type(converted[1]) is SynchronizedBatchNorm2d and converted[2].num_features == 5


def test_register_conversion_custom_functions_replace_and_refuse_bad_classes():
    class LibraryNorm(nn.BatchNorm1d):
        pass

    class LibrarySynchronized(fsyncbn.SynchronizedBatchNorm1d):
        pass

    calls = []

    def to_sync(layer, process_group):
        calls.append("sync")
        return LibrarySynchronized.from_batchnorm(layer, process_group)

    def to_plain(layer):
        calls.append("plain")
        from fsyncbn.conversions import transfer_batch_norm
        return transfer_batch_norm(layer, LibraryNorm)

    register_conversion(LibraryNorm, LibrarySynchronized, to_sync=to_sync, to_plain=to_plain)
    layer = LibraryNorm(3)
    synced = convert_model(layer)
    assert type(synced) is LibrarySynchronized and synced.weight is layer.weight
    assert type(revert_model(synced)) is LibraryNorm and calls == ["sync", "plain"]
    try:
        register_conversion(LibraryNorm, fsyncbn.SynchronizedBatchNorm1d)  # replaces, both ways
        assert type(convert_model(LibraryNorm(3))) is fsyncbn.SynchronizedBatchNorm1d
        assert type(revert_model(LibrarySynchronized(3))) is LibrarySynchronized
        assert type(revert_model(fsyncbn.SynchronizedBatchNorm1d(3))) is LibraryNorm
    finally:
        register_conversion(nn.BatchNorm1d, fsyncbn.SynchronizedBatchNorm1d)  # the built-in again
    assert type(revert_model(fsyncbn.SynchronizedBatchNorm1d(3))) is nn.BatchNorm1d
    with pytest.raises(TypeError, match=r"register_conversion: expected sync_cls to be an nn.Module "
                                        r"subclass, got 'SynchronizedBatchNorm1d'"):
        register_conversion(LibraryNorm, "SynchronizedBatchNorm1d")
    with pytest.raises(TypeError, match=r"register_conversion: Linear has no from_batchnorm.*pass to_sync="):
        register_conversion(LibraryNorm, nn.Linear)


def test_timm_registers_itself_when_it_imports():
    timm = pytest.importorskip("timm")
    BatchNormAct2d = timm.layers.BatchNormAct2d  # noqa: N806 - the class, by its name

    model = nn.Sequential(BatchNormAct2d(4, act_layer=nn.ReLU))
    synced = convert_model(model)
    assert type(synced[0]) is SynchronizedBatchNormAct2d and isinstance(synced[0].act, nn.ReLU)
    assert type(revert_model(synced)[0]) is BatchNormAct2d
    assert timm is not None
