"""revert_model(to_plain=True): every synchronized layer becomes nn.BatchNormXd, keeping every tensor
and flag; the result TorchScripts and computes what the synchronized model computed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fsyncbn
from fsyncbn import SynchronizedBatchNorm1d, SynchronizedBatchNorm2d, SynchronizedBatchNorm3d, revert_model

FLAGS = ("num_features", "eps", "momentum", "affine", "track_running_stats", "training")


class Mixed(nn.Module):
    """Every synchronized class, with unusual flags; the two SyncBatchNorm see 4D and 2D input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = SynchronizedBatchNorm2d(4)
        self.sync2 = fsyncbn.SyncBatchNorm(4, momentum=None)
        self.conv3 = nn.Conv3d(4, 4, 1)
        self.bn3 = SynchronizedBatchNorm3d(4, affine=False)
        self.torch_sync = nn.SyncBatchNorm(4, eps=1e-3, momentum=0.3)
        self.bn1 = SynchronizedBatchNorm1d(4, track_running_stats=False)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sync2(self.bn2(self.conv(x)))
        y = self.bn3(self.conv3(x.unsqueeze(2))).mean((2, 3, 4))
        return self.fc(self.bn1(self.torch_sync(y)))


def _trained_model() -> tuple[Mixed, torch.Tensor]:
    torch.manual_seed(0)
    model = Mixed().double()
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    for step in range(3):
        model(x + step)  # running statistics away from their initial values
    model.bn2.weight.requires_grad_(False)
    model.bn3.eval()
    return model, x


def test_to_plain_keeps_every_tensor_and_flag_and_computes_the_same():
    model, x = _trained_model()
    original = copy.deepcopy(model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    before = {name: ({k: getattr(m, k) for k in FLAGS}, dict(m.named_parameters()), dict(m.named_buffers()))
              for name, m in layers.items()}
    training = {name: m.training for name, m in model.named_modules()}
    plain = revert_model(model, to_plain=True, example_input=x)
    expected = {"bn2": nn.BatchNorm2d, "sync2": nn.BatchNorm2d, "bn3": nn.BatchNorm3d,
                "torch_sync": nn.BatchNorm1d, "bn1": nn.BatchNorm1d}
    assert {name: type(plain.get_submodule(name)) for name in expected} == expected
    for name, (flags, params, buffers) in before.items():
        layer = plain.get_submodule(name)
        assert {k: getattr(layer, k) for k in FLAGS} == flags, name
        assert all(getattr(layer, k) is p for k, p in params.items()), name
        assert all(getattr(layer, k) is b for k, b in buffers.items()), name
    assert plain.bn2.weight.requires_grad is False
    assert {name: m.training for name, m in plain.named_modules()} == training  # the dry run left no trace
    for mode in (False, True):  # eval, then a training step that updates the statistics
        original.train(mode)
        plain.train(mode)
        torch.testing.assert_close(plain(x), original(x), rtol=1e-12, atol=1e-12)
        for (key, value), ref in zip(plain.state_dict().items(), original.state_dict().values(), strict=True):
            torch.testing.assert_close(value, ref, rtol=1e-12, atol=1e-12, msg=key)


def test_the_plain_model_torchscripts_and_matches_in_eval_and_training():
    model, x = _trained_model()
    with pytest.raises(Exception):  # noqa: B017 - torch's SyncBatchNorm does not script
        torch.jit.script(copy.deepcopy(model).torch_sync)
    plain = revert_model(model, to_plain=True, example_input=x)
    scripted = torch.jit.script(copy.deepcopy(plain))
    for mode in (False, True):
        plain.train(mode)
        scripted.train(mode)
        torch.testing.assert_close(scripted(x + 0.5), plain(x + 0.5), rtol=1e-12, atol=1e-12)
        for (key, value), ref in zip(scripted.state_dict().items(), plain.state_dict().values(), strict=True):
            torch.testing.assert_close(value, ref, rtol=1e-12, atol=1e-12, msg=key)


def test_dimension_from_input_dims_and_clear_errors():
    model, x = _trained_model()
    with pytest.raises(ValueError, match=r"revert_model: cannot tell whether SyncBatchNorm 'sync2' is 1d, 2d "
                                         r"or 3d; pass example_input=.* or input_dims="):
        revert_model(copy.deepcopy(model), to_plain=True)
    with pytest.raises(ValueError, match=r"expected input_dims to give an input rank from 2 to 5 .* got 6 "
                                         r"for layer 'sync2'"):
        revert_model(copy.deepcopy(model), to_plain=True, input_dims={"sync2": 6})
    with pytest.raises(ValueError, match="the example input did not reach it"):
        unused = _with_bn(nn.SyncBatchNorm(3))
        unused.forward = lambda x: x  # the layer is never called
        revert_model(unused, to_plain=True, example_input=torch.randn(2, 3))
    plain = revert_model(model, to_plain=True, input_dims={"sync2": 4, "torch_sync": 2})
    assert type(plain.sync2) is nn.BatchNorm2d and type(plain.torch_sync) is nn.BatchNorm1d
    assert type(revert_model(fsyncbn.SyncBatchNorm(3), to_plain=True, input_dims=5)) is nn.BatchNorm3d


def test_clamp_mode_reverts_with_a_warning():
    with pytest.warns(UserWarning, match=r"SynchronizedBatchNorm2d 'bn' with eps_mode='clamp' becomes "
                                         r"BatchNorm2d"):
        plain = revert_model(_with_bn(SynchronizedBatchNorm2d(3, eps_mode="clamp")), to_plain=True)
    assert type(plain.bn) is nn.BatchNorm2d


def _with_bn(layer: nn.Module) -> nn.Module:
    holder = nn.Module()
    holder.bn = layer
    return holder
