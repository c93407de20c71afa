"""ONNX: an eval-mode model with synchronized layers exports with torch.onnx.export (dynamo), directly
and after revert_model(to_plain=True), and runs in onnxruntime with torch's outputs."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import fsyncbn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.slow


class Net(nn.Module):
    """Conv + SynchronizedBatchNorm2d, conv + SyncBatchNorm in clamp mode, BN1d head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = fsyncbn.SynchronizedBatchNorm2d(6, eps=1e-3)
        self.conv2 = nn.Conv2d(6, 6, 3, bias=False)
        self.bn2 = fsyncbn.SyncBatchNorm(6, eps=0.76, eps_mode="clamp")  # eps above 4 of the 6 variances
        self.head_bn = fsyncbn.SynchronizedBatchNorm1d(6, affine=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.head_bn(x.mean((2, 3))))


EXAMPLE = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
BN_LAYERS = 3


@functools.cache
def _model(variant: str) -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    for step in range(3):  # running statistics away from 0 and 1
        model(EXAMPLE * (1 + step) + step)
    model.eval()
    if variant == "reverted":
        with pytest.warns(UserWarning, match="eps_mode='clamp'"):
            model = fsyncbn.revert_model(model, to_plain=True, example_input=EXAMPLE)
        assert not any(isinstance(m, fsyncbn.modules.SynchronizedBatchNormBase) for m in model.modules())
    return model


@functools.cache
def _exported(variant: str, batch: str):
    """(onnx model, torch model). The dynamic export is not optimised, so that its graph shows what
    each batch-norm layer became; the static one goes through the exporter's default optimiser."""
    model = _model(variant)
    dynamic = {"x": {0: torch.export.Dim("batch")}} if batch == "dynamic" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(copy.deepcopy(model), (EXAMPLE,), dynamo=True, dynamic_shapes=dynamic,
                                    optimize=batch == "static", verbose=False)
    return program.model_proto, model


@pytest.mark.parametrize("variant", ["direct", "reverted"])
@pytest.mark.parametrize("batch", ["static", "dynamic"])
def test_onnxruntime_matches_torch(variant, batch):
    proto, model = _exported(variant, batch)
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    sizes = [EXAMPLE.shape[0]] if batch == "static" else [1, 4, 7]
    gen = torch.Generator().manual_seed(1)
    for n in sizes:
        x = 2 * torch.randn(n, 3, 8, 8, generator=gen) + 1
        with torch.no_grad():
            expected = model(x)
        (got,) = session.run(None, {name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["direct", "reverted"])
def test_each_layer_is_one_batch_normalization_node(variant):
    proto, model = _exported(variant, "dynamic")
    nodes = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert len(nodes) == BN_LAYERS
    epsilons = [onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "epsilon"))
                for n in nodes]
    clips = [n for n in proto.graph.node if n.op_type == "Clip"]
    if variant == "direct":
        # Clamp mode, sqrt(max(var, eps)): Clip(running_var, min=eps), then BatchNormalization with epsilon 0.
        assert epsilons == pytest.approx([1e-3, 0.0, 1e-5]) and len(clips) == 1
        assert clips[0].output[0] in nodes[1].input
    else:
        assert epsilons == pytest.approx([1e-3, 0.76, 1e-5]) and not clips
