"""The DataParallel replica path, with replicas as CPU threads wired by the same callback."""

from __future__ import annotations

import re
import time

import pytest
import torch
from torch import nn

from fsyncbn import (
    DataParallelWithCallback,
    SynchronizationError,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    convert_model,
    patch_replication_callback,
)
from tests._support.faultlog import record_fault
from tests._support.models import SharedBN, TinyResNet
from tests._support.reference import float64_training_batch_norm, informative_grad, nearly_constant_channel
from tests._support.replica_threads import replicate, run_replicas
from tests._support.threads import raise_first


def _model_and_batch(splits):
    torch.manual_seed(0)
    model = convert_model(TinyResNet()).double()
    x = torch.randn(sum(splits), 3, 8, 8, dtype=torch.float64)
    return model, x


def _global_reference(model, x, g):
    """The same model, unsynchronised, on the whole batch in one process."""
    ref = TinyResNet().double()
    ref.load_state_dict(model.state_dict())
    out = ref(x)
    (out * g).sum().backward()
    return ref, out.detach()


@pytest.mark.parametrize("splits", [[3, 5], [4, 1, 3], [2, 2, 2, 3]], ids=lambda s: "-".join(map(str, s)))
def test_replicas_equal_one_model_on_the_whole_batch(splits):
    model, x = _model_and_batch(splits)
    g = informative_grad((x.shape[0], 5), x.dtype)
    ref, out_ref = _global_reference(model, x, g)
    replicas = replicate(model, len(splits))
    xs, gs = x.split(splits), g.split(splits)

    def backward(i, out):
        (out * gs[i]).sum().backward()
        return out.detach()

    outs = raise_first(run_replicas(replicas, xs, backward))
    torch.testing.assert_close(torch.cat(outs), out_ref, rtol=1e-9, atol=1e-9)
    # Parameter gradients summed over replicas (DataParallel's reduction) equal the global ones.
    for name, p_ref in ref.named_parameters():
        total = sum(dict(r.named_parameters())[name].grad for r in replicas)
        torch.testing.assert_close(total, p_ref.grad, rtol=1e-9, atol=1e-9, msg=name)
    # The first replica's buffers are the module's: they hold the global running stats.
    for name, b_ref in ref.named_buffers():
        torch.testing.assert_close(dict(model.named_buffers())[name], b_ref, rtol=1e-9, atol=1e-9)


def test_replicas_in_clamp_mode_equal_the_float64_formula():
    """eps_mode="clamp" with a nearly constant channel: outputs and input gradients of the
    replicas equal the float64 formula differentiated through the clamp, on the whole batch."""
    splits = [3, 0, 4]
    x = nearly_constant_channel((7, 3, 5))
    g = informative_grad(x.shape, x.dtype)
    bn = SynchronizedBatchNorm1d(3, eps_mode="clamp").double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    xr, wr = x.clone().requires_grad_(), bn.weight.detach().clone().requires_grad_()
    y_ref = float64_training_batch_norm(xr, wr, bn.bias.detach(), eps=bn.eps, eps_mode="clamp")
    (y_ref * g).sum().backward()
    xs = [part.clone().requires_grad_() for part in x.split(splits)]
    gs = g.split(splits)

    def backward(i, out):
        (out * gs[i]).sum().backward()
        return out.detach()

    outs = raise_first(run_replicas(replicate(bn, len(splits)), xs, backward))
    torch.testing.assert_close(torch.cat(outs), y_ref.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.cat([xi.grad for xi in xs]), xr.grad, rtol=1e-7, atol=1e-7)


def test_layer_called_twice_per_forward():
    splits = [3, 4]
    torch.manual_seed(1)
    model = SharedBN(SynchronizedBatchNorm1d(4)).double()
    ref = SharedBN(nn.BatchNorm1d(4)).double()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(7, 4, dtype=torch.float64)
    g = informative_grad((7, 4), x.dtype)
    out_ref = ref(x)
    (out_ref * g).sum().backward()
    replicas = replicate(model, 2)

    def backward(i, out):
        (out * g.split(splits)[i]).sum().backward()
        return out.detach()

    outs = raise_first(run_replicas(replicas, x.split(splits), backward))
    torch.testing.assert_close(torch.cat(outs), out_ref.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(model.bn.running_var, ref.bn.running_var, rtol=1e-9, atol=1e-9)
    total = sum(r.lin.weight.grad for r in replicas)
    torch.testing.assert_close(total, ref.lin.weight.grad, rtol=1e-9, atol=1e-9)


class Faulty(nn.Module):
    """A BN layer called per ``mode``: normally, raising first, skipping, twice, with other C."""

    def __init__(self, timeout_probe: float = 0.0) -> None:
        super().__init__()
        self.bn = SynchronizedBatchNorm2d(3)
        self.other = SynchronizedBatchNorm2d(3)
        self.mode = "ok"
        self.sleep_s = timeout_probe

    def forward(self, x):
        if self.mode == "raise":
            raise RuntimeError("boom in replica")
        if self.mode == "hang":
            time.sleep(self.sleep_s)
        if self.mode == "skip":
            return self.other(x)
        y = self.bn(x)
        if self.mode == "extra":
            y = self.bn(y)
        if self.mode == "channels":
            y = self.bn(torch.cat([y, y], 1)[:, :4])
        return self.other(y)


def _fault_run(mode, *, timeout=10.0, replicas=3, faulty=1, sleep_s=0.0):
    model = Faulty(sleep_s)
    rs = replicate(model, replicas)
    rs[faulty].mode = mode
    xs = [torch.randn(2, 3, 4, 4) for _ in rs]
    start = time.monotonic()
    results = run_replicas(rs, xs, timeout=timeout)
    return results, time.monotonic() - start, model


@pytest.mark.faults
@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("raise", r"replica 1 raised RuntimeError\(boom in replica\) and will not reach sum 1"),
        (
            "skip",
            r"the replicas wait for each other at different layers \(.*replica 1 at "
            r"SynchronizedBatchNorm2d 'other' sum 1",
        ),
        (
            "extra",
            r"the replicas wait for each other at different layers \(.*replica 1 at "
            r"SynchronizedBatchNorm2d 'bn' sum 2",
        ),
        (
            "channels",
            r"replica 1 raised ValueError\(SynchronizedBatchNorm2d '\w+': expected input with 3 channels "
            r"\(from state\['running_mean'\]\), got shape \(2, 4, 4, 4\); give the layer",
        ),
    ],
)
def test_a_bad_replica_makes_every_replica_raise_at_once(mode, message):
    results, seconds, model = _fault_run(mode)
    assert seconds < 5.0, f"took {seconds:.1f} s: the fault was not detected before the timeout"
    record_fault(f"replica {mode}", "replicas x3", "SynchronizationError on every replica", seconds)
    for i, r in enumerate(results):
        assert isinstance(r, BaseException), f"replica {i} returned normally"
        if isinstance(r, SynchronizationError):
            assert str(r).startswith("SynchronizedBatchNorm2d '")  # names the layer
    errors = [str(r) for r in results if isinstance(r, SynchronizationError)]
    assert errors and all(re.search(message, e) for e in errors), errors
    # Nothing stale: the model works again, locally and replicated.
    model.mode = "ok"
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)
    assert all(
        not isinstance(r, BaseException)
        for r in run_replicas(replicate(model, 2), [torch.randn(2, 3, 4, 4)] * 2)
    )


@pytest.mark.faults
def test_a_hanging_replica_times_out_with_a_clear_error():
    results, seconds, _ = _fault_run("hang", timeout=1.0, sleep_s=3.0)
    # The two waiting replicas raise at the timeout; the late one raises when it arrives.
    assert all(isinstance(r, SynchronizationError) for r in results)
    for r in results:
        assert "SynchronizedBatchNorm2d 'bn': replica" in str(r)
        assert "waited 1 s at sum 1 (forward) for replica(s) [1]" in str(r)
    assert seconds < 1.0 + 3.0 + 3.0
    record_fault("replica hangs", "replicas x3", "SynchronizationError after 1 s timeout", seconds)


@pytest.mark.faults
@pytest.mark.parametrize("mode", ["raise", "skip", "extra", "channels"])
def test_a_failed_step_leaves_every_buffer_as_it_was_and_the_next_step_is_right(mode):
    model = Faulty()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rs = replicate(model, 3)
    rs[1].mode = mode  # in "extra" and "channels" the first sum of 'bn' succeeds
    xs = [torch.randn(2, 3, 4, 4) for _ in rs]
    assert all(isinstance(r, BaseException) for r in run_replicas(rs, xs))
    for replica in rs:
        for key, value in replica.state_dict().items():
            assert torch.equal(value, before[key]), key
    # The next step works and equals one model on the whole batch.
    rs = replicate(model, 3)
    reference = Faulty()
    reference.load_state_dict(model.state_dict())
    outs = raise_first(run_replicas(rs, xs))
    y_ref = reference.other(reference.bn(torch.cat(xs)))
    torch.testing.assert_close(torch.cat(outs), y_ref, rtol=1e-5, atol=1e-5)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-5)


def test_replicas_sending_different_shapes_all_raise():
    from fsyncbn.replicas import ReplicaGroup
    from tests._support.threads import run_threads

    group = ReplicaGroup(3, "layer 'x'", timeout=5.0)
    results = run_threads(3, lambda r: group.reducer(r)(torch.ones(10 if r != 1 else 12)))
    for r in results:
        assert isinstance(r, SynchronizationError)
        assert str(r) == (
            "layer 'x': replicas sent different shapes to sum 1 (replica 0 (10,), replica 1 "
            "(12,), replica 2 (10,)); every replica must give this layer the same number of "
            "channels"
        )


def test_eval_forward_does_not_synchronise_and_next_training_works():
    model = Faulty().eval()
    rs = replicate(model, 3)
    rs[1].mode = "skip"  # would fail if eval synchronised
    results = run_replicas(rs, [torch.randn(2, 3, 4, 4)] * 3)
    assert all(not isinstance(r, BaseException) for r in results)
    model.train()
    rs = replicate(model, 2)
    assert all(not isinstance(r, BaseException) for r in run_replicas(rs, [torch.randn(2, 3, 4, 4)] * 2))


def test_fewer_inputs_than_devices_then_full_again():
    model, x = _model_and_batch([4, 4, 4])
    for count in (3, 2, 3):  # a short last batch uses fewer replicas
        results = run_replicas(replicate(model, count), list(x.split(4))[:count])
        assert all(not isinstance(r, BaseException) for r in results)


def test_module_is_detached_after_the_replicated_forward():
    model = Faulty()
    run_replicas(replicate(model, 2), [torch.randn(2, 3, 4, 4)] * 2)
    assert model.bn._replica is None
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)  # local again, no waiting


def test_replica_sum_of_float16_happens_in_float32():
    from fsyncbn.replicas import ReplicaGroup
    from tests._support.threads import run_threads

    group = ReplicaGroup(2, "test layer", timeout=5.0)
    big = torch.full((3,), 60000.0, dtype=torch.float16)
    results = raise_first(run_threads(2, lambda r: group.reducer(r)(big)))
    assert all(r.dtype == torch.float16 for r in results)
    assert all(torch.isinf(r).all() for r in results)  # 120000 does not fit float16 ...
    group = ReplicaGroup(2, "test layer", timeout=5.0)
    half = torch.full((3,), 30000.0, dtype=torch.float16)
    results = raise_first(run_threads(2, lambda r: group.reducer(r)(half) / 2))
    assert all(torch.equal(r, half) for r in results)  # ... but 60000 does, summed in float32


def test_data_parallel_with_callback_on_cpu_is_the_module():
    torch.manual_seed(0)
    model = convert_model(TinyResNet())
    dp = DataParallelWithCallback(model, sync_timeout=5.0)
    x = torch.randn(4, 3, 8, 8)
    out = dp(x)
    assert out.shape == (4, 5)
    assert int(model.stem[1].num_batches_tracked) == 1


def test_patch_replication_callback_patches_once_and_checks_type():
    dp = nn.DataParallel(SynchronizedBatchNorm1d(10))
    assert patch_replication_callback(dp) is dp
    patched = dp.replicate
    assert patch_replication_callback(dp) is dp and dp.replicate is patched
    with pytest.raises(
        TypeError, match="patch_replication_callback: expected an nn.DataParallel, got Linear"
    ):
        patch_replication_callback(nn.Linear(2, 2))


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs >= 2 GPUs")


@needs_two_gpus
@pytest.mark.parametrize("patched", [False, True])
def test_real_data_parallel_equals_global(patched):
    torch.manual_seed(0)
    model = convert_model(TinyResNet()).cuda()
    ref = TinyResNet().cuda()
    ref.load_state_dict(model.state_dict())
    if patched:
        dp = patch_replication_callback(nn.DataParallel(model, device_ids=[1, 0]))
    else:
        dp = DataParallelWithCallback(model, device_ids=[1, 0], output_device=1)
    model.to("cuda:1")
    ref.to("cuda:1")
    x = torch.randn(6, 3, 8, 8, device="cuda:1")
    g = torch.randn(6, 5, device="cuda:1")
    (dp(x) * g).sum().backward()
    (ref(x) * g).sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4, msg=name)
    for b, b_ref in zip(model.buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, rtol=1e-4, atol=1e-4)
