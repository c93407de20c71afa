"""Every error a synchronized layer raises names the layer (its qualified name once it is in a
model) and says what to do: each check of the constructor, of the input rank, and of the
functional op the layer calls, walked one by one."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import fsyncbn
from fsyncbn import (
    ReplicaGroup,
    SyncBatchNorm,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
)

# (call, exception, what went wrong, the fix): the constructor, before any model holds the
# layer, so the layer is named by its class.
CONSTRUCTOR = {
    "num_features a float": (lambda: SynchronizedBatchNorm2d(3.0), TypeError,
                             r"expected num_features to be a positive int", r"pass int\(3\.0\)"),
    "num_features a string": (lambda: SynchronizedBatchNorm2d("3"), TypeError,
                              r"expected num_features to be a positive int",
                              r"pass the number of channels C of the input, an int"),
    "num_features 0": (lambda: SynchronizedBatchNorm1d(0), ValueError, r"expected num_features > 0",
                       r"pass the number of channels C of the input"),
    "momentum a string": (lambda: SynchronizedBatchNorm2d(3, momentum="0.1"), TypeError,
                          r"expected momentum to be a float or None",
                          r"set momentum to a float in \[0, 1\], or None"),
    "momentum above 1": (lambda: SynchronizedBatchNorm3d(3, momentum=2.0), ValueError,
                         r"expected momentum in \[0, 1\] or None, got 2\.0",
                         r"set momentum to a float in \[0, 1\], or None"),
    "eps a string": (lambda: SyncBatchNorm(3, eps="1e-5"), TypeError, r"expected eps to be a float",
                     r"set eps to a positive float"),
    "eps negative": (lambda: SynchronizedBatchNorm2d(3, eps=-1.0), ValueError, r"expected eps >= 0",
                     r"set eps to a positive float"),
    "eps_mode unknown": (lambda: SynchronizedBatchNorm2d(3, eps_mode="max"), ValueError,
                         r"expected eps_mode 'plus' or 'clamp', got 'max'",
                         r"set eps_mode to 'plus' \(torch's\), 'clamp'"),
    "process_group not a group": (lambda: SynchronizedBatchNorm2d(3, process_group=[0, 1]), TypeError,
                                  r"expected process_group to be a torch.distributed.ProcessGroup",
                                  r"for example from torch.distributed.new_group\(ranks\) or "
                                  r"fsyncbn.sync_groups"),
}


@pytest.mark.parametrize("case", CONSTRUCTOR)
def test_constructor_errors_name_the_class_and_the_fix(case):
    call, exc, what, fix = CONSTRUCTOR[case]
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert re.match(r"(SynchronizedBatchNorm[123]d|SyncBatchNorm): ", message), message
    assert re.search(what, message) and re.search(fix, message), message


def _model() -> nn.Module:
    """A model whose layers errors must name: 'features.1' (2d), 'head.1' (1d), 'volume' (3d),
    'any' (SyncBatchNorm)."""
    model = nn.Module()
    model.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    model.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    model.volume = nn.BatchNorm3d(8)
    model.any = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(8))
    return fsyncbn.convert_model(model)  # names every synchronized layer, this one too


def _set(name: str, value):
    def change(layer: nn.Module) -> None:
        setattr(layer, name, value)

    return change


_FEATURES = "SynchronizedBatchNorm2d 'features.1'"
_HEAD = "SynchronizedBatchNorm1d 'head.1'"
# (layer, input shape or tensor maker, change to the layer first, exception, what, fix).
FORWARD = {
    "3-D input to a 2d layer": ("features.1", (2, 8, 5), None, ValueError,
                                r"expected 4D input \(got 3D input\)",
                                r"for 3D input use SynchronizedBatchNorm1d"),
    "2-D input to a 2d layer": ("features.1", (4, 8), None, ValueError,
                                r"expected 4D input \(got 2D input\)",
                                r"for 2D input use SynchronizedBatchNorm1d"),
    "5-D input to a 2d layer": ("features.1", (2, 8, 3, 3, 3), None, ValueError,
                                r"expected 4D input \(got 5D input\)",
                                r"for 5D input use SynchronizedBatchNorm3d"),
    "4-D input to a 1d layer": ("head.1", (2, 8, 3, 3), None, ValueError,
                                r"expected 2D or 3D input \(got 4D input\)",
                                r"for 4D input use SynchronizedBatchNorm2d"),
    "6-D input to a 1d layer": ("head.1", (2, 8, 1, 1, 1, 2), None, ValueError,
                                r"expected 2D or 3D input \(got 6D input\)",
                                r"use SyncBatchNorm, which takes any rank from 2"),
    "4-D input to a 3d layer": ("volume", (2, 8, 3, 3), None, ValueError,
                                r"expected 5D input \(got 4D input\)",
                                r"for 4D input use SynchronizedBatchNorm2d"),
    "1-D input to SyncBatchNorm": ("any", (8,), None, ValueError,
                                   r"expected at least 2D input \(got 1D input\)",
                                   r"give it input of shape \(N, C, \*\)"),
    "not a tensor": ("features.1", lambda: [[1.0, 2.0]], None, TypeError,
                     r"expected input to be a torch.Tensor, got list", r"call the layer on a tensor"),
    "integer input": ("features.1", lambda: torch.ones(2, 8, 3, 3, dtype=torch.long), None, TypeError,
                      r"expected a floating-point input, got dtype torch.int64", r"pass input.float\(\)"),
    "wrong channel count": ("features.1", (4, 5, 3, 3), None, ValueError,
                            r"expected input with 8 channels \(from state\['running_mean'\]\), got shape "
                            r"\(4, 5, 3, 3\)", r"build it with num_features set to the input's C"),
    "batch of 1 in training": ("head.1", (1, 8), None, ValueError,
                               r"expected more than 1 value per channel when training, got input of "
                               r"shape \(1, 8\)", r"a batch of 2 or more\), or call model.eval\(\)"),
    "momentum set out of range": ("features.1", (2, 8, 3, 3), _set("momentum", 1.5), ValueError,
                                  r"expected momentum in \[0, 1\] or None, got 1.5",
                                  r"set momentum to a float in \[0, 1\]"),
    "momentum set to a string": ("features.1", (2, 8, 3, 3), _set("momentum", "0.1"), TypeError,
                                 r"expected momentum to be a float or None", r"set momentum to a float"),
    "eps set to 0 in training": ("features.1", (2, 8, 3, 3), _set("eps", 0.0), ValueError,
                                 r"expected eps > 0 when normalising with batch statistics",
                                 r"set eps to a positive float"),
    "eps_mode set to an unknown mode": ("features.1", (2, 8, 3, 3), _set("eps_mode", "max"), ValueError,
                                        r"expected eps_mode 'plus' or 'clamp'", r"set eps_mode to 'plus'"),
    "weight of the wrong shape": ("features.1", (2, 8, 3, 3),
                                  _set("weight", nn.Parameter(torch.ones(8, 1))), ValueError,
                                  r"expected weight of shape \(8,\), got shape \(8, 1\)",
                                  r"keep the layer's weight, bias and running statistics of shape"),
    "bias of the wrong length": ("features.1", (2, 8, 3, 3), _set("bias", nn.Parameter(torch.ones(4))),
                                 ValueError, r"expected input with 4 channels \(from bias\)",
                                 r"give the layer input with num_features channels"),
    "integer running statistics": ("features.1", (2, 8, 3, 3),
                                   _set("running_var", torch.ones(8, dtype=torch.long)),
                                   TypeError, r"expected state\['running_var'\] to be floating point",
                                   r"model.float\(\)"),
}


@pytest.mark.parametrize("case", FORWARD)
def test_forward_errors_name_the_layer_and_the_fix(case):
    name, shape, change, exc, what, fix = FORWARD[case]
    model = _model()
    layer = model.get_submodule(name)
    if change is not None:
        change(layer)
    x = torch.randn(*shape) if isinstance(shape, tuple) else shape()
    with pytest.raises(exc) as info:
        layer(x)
    message = str(info.value)
    label = f"{type(layer).__name__} '{name}'"
    assert message.startswith(f"{label}: "), message
    assert re.search(what, message) and re.search(fix, message), message
    assert "batch_norm:" not in message  # the layer's name in place of the op's


def test_a_batch_of_1_over_all_replicas_names_the_layer_and_the_fix():
    """The synchronised path counts over all participants (here one DataParallel replica)."""
    model = _model()
    layer = model.head[1]
    layer.attach_replica(ReplicaGroup(1, "replicas", timeout=5.0), 0)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(1, 8))
    message = str(info.value)
    assert message.startswith(f"{_HEAD}: expected more than 1 value per channel when training, got 1 over "
                              "all 1 participants"), message
    assert message.endswith("use a larger batch"), message


def test_the_scripted_layer_names_the_class_and_the_fix():
    scripted = torch.jit.script(SynchronizedBatchNorm2d(3))
    with pytest.raises(Exception, match=r"SynchronizedBatchNorm2d: expected 4D input \(got 3D input\); "
                                        r"for 3D input use SynchronizedBatchNorm1d"):
        scripted(torch.randn(2, 3, 4))
    clamped = SynchronizedBatchNorm2d(3, eps_mode="clamp")
    clamped.train()
    with pytest.raises(Exception, match=r"supports eps_mode 'plus' only; set layer.eps_mode = None"):
        torch.jit.script(clamped)(torch.randn(2, 3, 4, 4))


def test_a_layer_outside_any_model_is_named_by_class_and_size():
    with pytest.raises(ValueError, match=r"^SynchronizedBatchNorm2d\(8\): expected 4D input "
                                         r"\(got 3D input\); for 3D input use SynchronizedBatchNorm1d"):
        SynchronizedBatchNorm2d(8)(torch.randn(2, 8, 5))


def test_errors_in_eval_mode_name_the_layer_too():
    model = _model().eval()
    with pytest.raises(ValueError, match=rf"^{re.escape(_FEATURES)}: expected input with 8 channels"):
        model.features[1](torch.randn(2, 5, 3, 3))
