"""The stateful layers: constructor, checkpoints, eps modes, SyncBatchNorm drop-in."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from fsyncbn import (
    DataParallelWithCallback,
    SyncBatchNorm,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
    convert_model,
    get_sbn_eps_mode,
    patch_replication_callback,
    revert_model,
    routing,
    set_sbn_eps_mode,
)
from tests._support.reference import float64_moments

PAIRS = [
    (nn.BatchNorm1d, SynchronizedBatchNorm1d, (6, 4, 5)),
    (nn.BatchNorm2d, SynchronizedBatchNorm2d, (6, 4, 3, 3)),
    (nn.BatchNorm3d, SynchronizedBatchNorm3d, (6, 4, 2, 3, 3)),
    (nn.SyncBatchNorm, SyncBatchNorm, (6, 4, 3)),
]


@pytest.mark.parametrize(("torch_cls", "cls", "shape"), PAIRS)
def test_checkpoints_load_both_ways(torch_cls, cls, shape):
    theirs = torch_cls(4)
    with torch.no_grad():
        theirs.weight.uniform_()
        theirs.running_mean.uniform_()
        theirs.num_batches_tracked += 7
    ours = cls(4)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    back = torch_cls(4)
    back.load_state_dict(ours.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)


@pytest.mark.parametrize(
    ("cls", "bad_dims", "message"),
    [
        (SynchronizedBatchNorm1d, 4, r"expected 2D or 3D input \(got 4D input\)"),
        (SynchronizedBatchNorm2d, 3, r"expected 4D input \(got 3D input\)"),
        (SynchronizedBatchNorm3d, 4, r"expected 5D input \(got 4D input\)"),
        (SyncBatchNorm, 1, r"expected at least 2D input \(got 1D input\)"),
    ],
)
def test_input_dimension_checks_as_torch(cls, bad_dims, message):
    with pytest.raises(ValueError, match=message):
        cls(3)(torch.randn(*([3] * bad_dims)))


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_sync_batchnorm_takes_any_rank_and_equals_torch_locally(rank):
    x = torch.randn(4, 3, *([3] * (rank - 2)), dtype=torch.float64)
    ours = SyncBatchNorm(3, dtype=torch.float64)
    ref = nn.BatchNorm1d(3, dtype=torch.float64) if rank <= 3 else None
    out = ours(x)
    mean, var, var_unbiased = float64_moments(x)
    shape = (1, 3) + (1,) * (rank - 2)
    torch.testing.assert_close(out, (x - mean.view(shape)) / torch.sqrt(var.view(shape) + 1e-5))
    torch.testing.assert_close(ours.running_var, 0.9 + 0.1 * var_unbiased)
    if ref is not None:
        torch.testing.assert_close(out, ref(x))


def test_sync_batchnorm_constructor_matches_torch():
    group = None
    ours = SyncBatchNorm(5, 1e-3, 0.2, True, True, group, None, torch.float64, bias=False)
    assert (ours.eps, ours.momentum, ours.affine, ours.bias, ours.running_mean.dtype) == (
        1e-3,
        0.2,
        True,
        None,
        torch.float64,
    )
    assert ours.process_group is None


def test_convert_sync_batchnorm_classmethod():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.BatchNorm2d(4)))
    weight = net[1].weight
    converted = SyncBatchNorm.convert_sync_batchnorm(net)
    assert type(converted[1]) is SyncBatchNorm and type(converted[2][0]) is SyncBatchNorm
    assert converted[1].weight is weight
    single = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm3d(2))
    assert type(single) is SyncBatchNorm


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"num_features": 0}, ValueError, r"SynchronizedBatchNorm2d: expected num_features > 0, got 0"),
        ({"num_features": 2.5}, TypeError,
         r"SynchronizedBatchNorm2d: expected num_features to be a positive int \(the number of channels "
         r"C\), got float 2.5; pass int\(2.5\)"),
        ({"num_features": "3"}, TypeError,
         r"SynchronizedBatchNorm2d: expected num_features to be a positive int \(the number of channels "
         r"C\), got str '3'"),
        ({"eps": -1.0}, ValueError, r"SynchronizedBatchNorm2d: expected eps >= 0, got -1.0"),
        (
            {"momentum": 2.0},
            ValueError,
            r"SynchronizedBatchNorm2d: expected momentum in \[0, 1\] or None, got 2.0",
        ),
        (
            {"eps_mode": "max"},
            ValueError,
            r"SynchronizedBatchNorm2d: expected eps_mode 'plus' or 'clamp', got 'max'",
        ),
        (
            {"process_group": "world"},
            TypeError,
            r"SynchronizedBatchNorm2d: expected process_group to be a torch.distributed.ProcessGroup "
            r"\(for example from torch.distributed.new_group\(ranks\) or fsyncbn.sync_groups\) or None "
            r"for WORLD, got str 'world'",
        ),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, message):
    kwargs = {"num_features": 3, **kwargs}
    with pytest.raises(exc, match=message):
        SynchronizedBatchNorm2d(**kwargs)


def test_eps_mode_explicit_and_global():
    x = torch.randn(5, 2, 4, dtype=torch.float64) * torch.tensor([1e-4, 1.0], dtype=torch.float64).view(
        1, 2, 1
    )
    eps = 1e-5
    _, var, _ = float64_moments(x)

    def expected(mode):
        denom = torch.sqrt(torch.clamp(var, min=eps)) if mode == "clamp" else torch.sqrt(var + eps)
        return (x - x.mean((0, 2), keepdim=True)) / denom.view(1, 2, 1)

    explicit = SynchronizedBatchNorm1d(2, eps=eps, affine=False, eps_mode="clamp").double()
    follows = SynchronizedBatchNorm1d(2, eps=eps, affine=False).double()
    assert get_sbn_eps_mode() == "plus"
    torch.testing.assert_close(follows(x), expected("plus"))
    try:
        set_sbn_eps_mode("clamp")  # applies at forward time to layers built without eps_mode
        torch.testing.assert_close(follows(x), expected("clamp"))
        pinned = SynchronizedBatchNorm1d(2, eps=eps, affine=False, eps_mode="plus").double()
        torch.testing.assert_close(pinned(x), expected("plus"))
    finally:
        set_sbn_eps_mode("plus")
    torch.testing.assert_close(explicit(x), expected("clamp"))
    assert "eps_mode='clamp'" in repr(explicit)
    with pytest.raises(ValueError, match=r"set_sbn_eps_mode: expected 'plus' or 'clamp', got 'x'"):
        set_sbn_eps_mode("x")


def test_forward_writes_buffers_only_from_the_returned_state_and_backward_still_works():
    bn = SynchronizedBatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = bn(x)
    y2 = bn(x)  # a second forward overwrites the buffers before the first backward
    ((y + y2) * torch.randn_like(y)).sum().backward()
    assert int(bn.num_batches_tracked) == 2 and x.grad.abs().sum() > 0


def test_modules_pick_no_reducer_without_context():
    bn = SynchronizedBatchNorm2d(3)
    assert routing.route(bn).reducer is None
    bn.eval()
    assert routing.route(bn).reducer is None


@pytest.mark.parametrize(
    ("make_input", "exc", "message"),
    [
        (lambda: torch.randn(4, 5, 3, 3), ValueError,
         r"SynchronizedBatchNorm2d\(3\): expected input with 3 channels \(from state\['running_mean'\]\), "
         r"got shape \(4, 5, 3, 3\)"),
        (lambda: torch.ones(4, 3, 3, 3, dtype=torch.long), TypeError,
         r"SynchronizedBatchNorm2d\(3\): expected a floating-point input, got dtype torch.int64"),
        (lambda: torch.randn(3, 3, 3), ValueError, r"expected 4D input \(got 3D input\)"),
        (lambda: torch.randn(1, 3, 1, 1), ValueError,
         r"SynchronizedBatchNorm2d\(3\): expected more than 1 value per channel when training, got input "
         r"of shape "
         r"\(1, 3, 1, 1\)"),
    ],
)
def test_bad_inputs_to_a_module(make_input, exc, message):
    with pytest.raises(exc, match=message):
        SynchronizedBatchNorm2d(3)(make_input())


def test_bad_arguments_to_the_replication_callback():
    from fsyncbn import execute_replication_callbacks

    with pytest.raises(ValueError, match=r"execute_replication_callbacks: expected copies of one module, "
                                         r"got replicas with \[1, 2\] synchronized batch-norm layers"):
        execute_replication_callbacks([SynchronizedBatchNorm2d(3),
                                       nn.Sequential(SynchronizedBatchNorm2d(3), SynchronizedBatchNorm2d(3))])


def _dp_claiming_devices(device_ids):
    """An nn.DataParallel as torch builds it on a machine with GPUs: device_ids kept as given."""
    dp = nn.DataParallel(SynchronizedBatchNorm1d(3))
    dp.device_ids = list(device_ids)
    return dp


# Mistakes a user can make at the public calls: (description, call, exception, message regex).
USER_MISTAKES = [
    ("num_features a float", lambda: SynchronizedBatchNorm2d(3.0), TypeError,
     r"SynchronizedBatchNorm2d: expected num_features to be a positive int \(the number of channels C\), "
     r"got float 3.0; pass int\(3.0\)"),
    ("process_group a list of ranks", lambda: SyncBatchNorm(3, process_group=[0, 1]), TypeError,
     r"SyncBatchNorm: expected process_group to be a torch.distributed.ProcessGroup \(for example from "
     r"torch.distributed.new_group\(ranks\) or fsyncbn.sync_groups\) or None for WORLD, got list \[0, 1\]"),
    ("convert_model given a name", lambda: convert_model("resnet"), TypeError,
     r"convert_model: expected module to be a torch.nn.Module, got str 'resnet'; pass the model object "
     r"itself \(for example torchvision.models.resnet50\(\)\), not its name or class"),
    ("convert_model given a class", lambda: convert_model(nn.BatchNorm2d), TypeError,
     r"convert_model: expected module to be a torch.nn.Module, got the class BatchNorm2d; pass the model"),
    ("revert_model given None", lambda: revert_model(None), TypeError,
     r"revert_model: expected module to be a torch.nn.Module, got NoneType; pass the model object"),
    ("the same device twice", lambda: DataParallelWithCallback(SynchronizedBatchNorm1d(3), device_ids=[0, 0]),
     ValueError,
     r"DataParallelWithCallback: expected distinct device_ids, got \[0, 0\] \(device 0 repeated\); replicas "
     r"on one device share that device's autograd thread in backward, so they would run one after the "
     r"other and never meet at a synchronized batch-norm layer. Give each replica its own device"),
    ("the same device twice, as strings",
     lambda: DataParallelWithCallback(SynchronizedBatchNorm1d(3), device_ids=["cuda:1", 0, "cuda:1"]),
     ValueError, r"DataParallelWithCallback: expected distinct device_ids, got \['cuda:1', 0, 'cuda:1'\] "
                 r"\(device 1 repeated\)"),
    ("patching a DataParallel that repeats a device",
     lambda: patch_replication_callback(_dp_claiming_devices([1, 1])), ValueError,
     r"patch_replication_callback: expected distinct device_ids, got \[1, 1\] \(device 1 repeated\); "
     r"replicas on one device share that device's autograd thread"),
]


@pytest.mark.parametrize(("call", "exc", "message"), [case[1:] for case in USER_MISTAKES],
                         ids=[case[0] for case in USER_MISTAKES])
def test_user_mistakes_are_named_at_the_call(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine must see no GPU")
@pytest.mark.parametrize("device_ids", [[0, 1], [0], ["cuda:0", "cuda:1"]])
def test_gpus_named_on_a_machine_without_gpus_are_refused(device_ids):
    with pytest.raises(ValueError, match=(
            rf"DataParallelWithCallback: device_ids={re.escape(repr(device_ids))} names {len(device_ids)} "
            r"GPU\(s\), but this machine sees none \(torch.cuda.is_available\(\) is False\), and "
            r"DataParallel would silently run a single copy of the module on the CPU; pass "
            r"device_ids=None to run on the CPU")):
        DataParallelWithCallback(SynchronizedBatchNorm1d(3), device_ids=device_ids)
    # What the message recommends works.
    dp = DataParallelWithCallback(SynchronizedBatchNorm1d(3), device_ids=None)
    assert dp(torch.randn(4, 3)).shape == (4, 3)


def test_gpus_beyond_those_visible_are_refused(monkeypatch):
    import fsyncbn.parallel as parallel

    visible = torch.cuda.device_count()
    if not visible:  # play a machine with one GPU: the check asks what DataParallel asks
        monkeypatch.setattr(parallel, "_visible_accelerators", lambda: ("cuda", 1))
        visible = 1
    with pytest.raises(ValueError, match=(
            rf"DataParallelWithCallback: device_ids=\[0, {visible}\] names cuda device\(s\) \[{visible}\], "
            rf"but this machine sees {visible} \(indices 0 to {visible - 1}\); pass device_ids=None to use "
            rf"all of them, or indices below {visible}")):
        DataParallelWithCallback(SynchronizedBatchNorm1d(3), device_ids=[0, visible])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_repeated_gpu_is_refused_before_any_forward():
    model = SynchronizedBatchNorm1d(3).cuda()
    with pytest.raises(ValueError, match="device 0 repeated"):
        DataParallelWithCallback(model, device_ids=[0, 0])
    with pytest.raises(ValueError, match="device 0 repeated"):
        patch_replication_callback(nn.DataParallel(model, device_ids=[0, 0]))
