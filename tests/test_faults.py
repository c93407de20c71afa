"""Fault injection: no hangs, clear errors in every surviving participant, nothing lost.

Both paths: DataParallel replicas as threads (fsyncbn's own timeout), and gloo processes
(the process group's timeout, 5 s here). Every test records what happened and how long
the error took; the summary is printed at the end of the run (see conftest.py).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest
import torch
from torch import nn

from fsyncbn import SynchronizedBatchNorm1d, SynchronizedBatchNorm2d, roll_back_step
from tests._support.distributed import launch_with_faults
from tests._support.faultlog import record_fault
from tests._support.replica_threads import replicate, run_replicas
from tests._support.threads import raise_first, run_threads

pytestmark = pytest.mark.faults

PG_TIMEOUT_S = 5.0


def _layered(c_first: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(SynchronizedBatchNorm1d(c_first), nn.Linear(c_first, 4),
                         SynchronizedBatchNorm1d(4))


# --- gloo processes ---------------------------------------------------------------------


def _training_step(model: nn.Module) -> None:
    y = model(torch.randn(3, 4, requires_grad=True))
    (y * torch.randn_like(y)).sum().backward()


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}


def _fails_in_step_two(rank: int, fault, *, in_backward: bool = False) -> None:
    """A good step, then a step in which rank 1 faults after the first layer (or, with
    ``in_backward``, after the whole forward). The surviving ranks raise, and their running
    statistics must be exactly those after step one: nothing of the failed step is kept."""
    model = _layered()
    _training_step(model)
    after_step_one = _buffers(model)
    try:
        h = model[0](torch.randn(3, 4, requires_grad=True))
        if rank == 1 and not in_backward:
            fault()
        y = model[2](model[1](h))
        if rank == 1:
            fault()
        (y * torch.randn_like(y)).sum().backward()
    except Exception:
        if rank == 1:
            roll_back_step()  # the rank whose own code failed undoes its part of the step
        for key, value in _buffers(model).items():
            assert torch.equal(value, after_step_one[key]), f"{key} kept a write of the failed step"
        raise


def _exit() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # a crash (OOM killer, segfault): no Python cleanup at all


def _sleep_past_the_timeout() -> None:
    time.sleep(PG_TIMEOUT_S + 4)


def _raise() -> None:
    raise RuntimeError("boom before batch norm")


def _dies_mid_step(rank, world_size):
    _fails_in_step_two(rank, _exit)


def _dies_before_backward(rank, world_size):
    _fails_in_step_two(rank, _exit, in_backward=True)


def _hangs(rank, world_size):
    _fails_in_step_two(rank, _sleep_past_the_timeout)


def _raises_before_a_layer(rank, world_size):
    _fails_in_step_two(rank, _raise)


def _different_channels(rank, world_size):
    _layered(5 if rank == 1 else 4)(torch.randn(3, 5 if rank == 1 else 4))


def _nan_everywhere_consistent(rank, world_size):
    x = torch.randn(3, 4)
    if rank == 0:
        x[0, 1] = float("nan")
        x[1, 2] = float("inf")
    bn = SynchronizedBatchNorm1d(4)
    y = bn(x)
    # torch's semantics on the whole batch: NaN/inf poison exactly their channels.
    assert torch.isnan(y[:, 1]).all() and torch.isnan(y[:, 2]).all()
    assert torch.isfinite(y[:, [0, 3]]).all()
    assert torch.isnan(bn.running_mean[1]) and torch.isfinite(bn.running_mean[0])


def _all_empty(rank, world_size):
    bn = SynchronizedBatchNorm1d(4)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    y = bn(torch.randn(0, 4, requires_grad=True))
    (y * 2).sum().backward()
    assert y.shape == (0, 4)
    assert torch.equal(bn.running_mean, before["running_mean"])
    assert torch.equal(bn.running_var, before["running_var"])


def _one_value_in_total(rank, world_size):
    SynchronizedBatchNorm1d(4)(torch.randn(1 if rank == 0 else 0, 4))


def _skips_a_layer_at_step_two(rank, world_size):
    model = _layered()
    for step in range(3):
        x = torch.randn(3, 4, requires_grad=True)
        y = model[2](model[1](x)) if rank == 1 and step == 1 else model(x)
        (y * torch.randn_like(y)).sum().backward()


def _extra_call_at_step_two(rank, world_size):
    model = _layered()
    for step in range(3):
        x = torch.randn(3, 4, requires_grad=True)
        y = model(x)
        if rank == 1 and step == 1:
            y = model[0](y)
        (y * torch.randn_like(y)).sum().backward()


def _extra_call_in_the_forward_at_step_two(rank, world_size):
    model = _layered()
    for step in range(3):
        x = torch.randn(3, 4, requires_grad=True)
        h = model[0](x)
        if rank == 1 and step == 1:
            h = model[0](h)
        y = model[2](model[1](h))
        (y * torch.randn_like(y)).sum().backward()


OUT_OF_STEP = r"SynchronizedBatchNorm1d '[02]': the ranks are out of step: this rank is at the layer"
SUM_FAILED = r"SynchronizedBatchNorm1d '[02]': the sum over the process group failed"

# scenario: (function, the error every rank reports, whether every rank reports it without
# torch's own checks)
ORDER_SCENARIOS = {
    # The skipped layer's message has the size of the next one's: their tags differ.
    "skips a layer (step 2)": (_skips_a_layer_at_step_two, OUT_OF_STEP, True),
    "calls a layer again in the forward (step 2)": (_extra_call_in_the_forward_at_step_two,
                                                    OUT_OF_STEP, True),
    # The extra call's message is larger than the backward's the others send.
    "calls a layer again (step 2)": (_extra_call_at_step_two, SUM_FAILED, False),
}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("debug", ["DETAIL", "OFF"])
@pytest.mark.parametrize("scenario", ORDER_SCENARIOS)
def test_gloo_ranks_out_of_step(scenario, debug, monkeypatch):
    """A rank that skips or repeats a layer after the first step. Where the messages have the
    same size, every layer's tag tells every rank; where they differ, torch's own collective
    checks (TORCH_DISTRIBUTED_DEBUG=DETAIL) make every rank raise, and without them gloo
    aborts a rank whose buffer is too small while every other rank raises."""
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", debug)
    fn, message, every_rank_reports = ORDER_SCENARIOS[scenario]
    outcomes = launch_with_faults(3, fn, pg_timeout_s=PG_TIMEOUT_S)
    reported = {r: o for r, o in outcomes.items() if o[0] != "exited"}
    if debug == "DETAIL" or every_rank_reports:
        assert len(reported) == 3, outcomes
    assert reported, outcomes
    for kind, text, seconds in reported.values():
        assert kind == "SynchronizationError", text
        assert re.match(message, text), text
        assert seconds < PG_TIMEOUT_S + 10
    aborted = len(outcomes) - len(reported)
    record_fault(scenario, f"gloo x3 {debug.lower()}",
                 f"SynchronizationError on {len(reported)} ranks" + (f", {aborted} aborted by gloo"
                                                                     if aborted else ""),
                 max(o[2] for o in reported.values()))


GLOO_SCENARIOS = {
    "dies mid-step": (_dies_mid_step, "SynchronizationError",
                      r"SynchronizedBatchNorm1d '[02]': the sum over the process group failed"),
    "dies before backward": (_dies_before_backward, "SynchronizationError",
                             r"SynchronizedBatchNorm1d '[02]': the sum over the process group failed"),
    "hangs past the timeout": (_hangs, "SynchronizationError",
                               r"SynchronizedBatchNorm1d '[02]': the sum over the process group failed"),
    "raises before a layer": (_raises_before_a_layer, "SynchronizationError",
                              r"SynchronizedBatchNorm1d '[02]': the sum over the process group failed"),
    "different channel count": (_different_channels, "SynchronizationError",
                                r"SynchronizedBatchNorm1d '0': the ranks disagree on the size of "
                                r"the tensor to sum: this rank has 1[24] numbers"),
    "total count 1 in training": (_one_value_in_total, "ValueError",
                                  r"expected more than 1 value per channel when training, got 1 "
                                  r"over all 3 participants"),
    "NaN/inf input": (_nan_everywhere_consistent, "ok", ""),
    "every participant empty": (_all_empty, "ok", ""),
}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("scenario", GLOO_SCENARIOS)
def test_gloo_fault(scenario):

    fn, expected, message = GLOO_SCENARIOS[scenario]
    start = time.monotonic()
    outcomes = launch_with_faults(3, fn, pg_timeout_s=PG_TIMEOUT_S)
    elapsed = time.monotonic() - start
    faulty = {"dies mid-step", "dies before backward", "hangs past the timeout",
              "raises before a layer"}
    survivors = {r: o for r, o in outcomes.items() if not (scenario in faulty and r == 1)}
    for rank, (kind, text, seconds) in survivors.items():
        assert kind == expected, (rank, kind, text)
        assert re.search(message, text), (rank, text)
        assert seconds < PG_TIMEOUT_S + 10, (rank, seconds)
    if scenario == "raises before a layer":  # its own error, after undoing its part of the step
        assert outcomes[1][:2] == ("RuntimeError", "boom before batch norm"), outcomes[1]
    worst = max(s for _, _, s in survivors.values())
    record_fault(scenario, "gloo x3", f"{expected} on every surviving rank", worst)
    assert elapsed < 120


# --- replicas as threads ----------------------------------------------------------------


def test_nan_and_inf_follow_torch_on_the_replica_path():
    bn = SynchronizedBatchNorm2d(3).double()
    reference = nn.BatchNorm2d(3).double()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    x[0, 1, 0, 0] = float("nan")
    x[4, 2, 1, 1] = float("inf")
    outs = raise_first(run_replicas(replicate(bn, 2), list(x.split([2, 4]))))
    torch.testing.assert_close(torch.cat(outs), reference(x), equal_nan=True)
    torch.testing.assert_close(bn.running_var, reference.running_var, equal_nan=True)
    record_fault("NaN/inf input", "replicas x2", "torch's semantics (NaN in its channels)", 0.0)


def test_every_replica_empty_keeps_running_stats():
    bn = SynchronizedBatchNorm1d(3)
    start = time.monotonic()
    outs = raise_first(run_replicas(replicate(bn, 3), [torch.randn(0, 3)] * 3))
    assert all(o.shape == (0, 3) for o in outs)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    record_fault("every participant empty", "replicas x3", "empty outputs, stats unchanged",
                 time.monotonic() - start)


def test_one_value_in_total_raises_on_every_replica():
    start = time.monotonic()
    results = run_replicas(replicate(SynchronizedBatchNorm1d(3), 2), [torch.randn(1, 3), torch.randn(0, 3)])
    for r in results:
        assert isinstance(r, ValueError) and "got 1 over all 2 participants" in str(r)
    record_fault("total count 1 in training", "replicas x2", "ValueError on every replica",
                 time.monotonic() - start)


# --- soak and concurrency --------------------------------------------------------------

SOAK_STEPS = int(os.environ.get("FSYNCBN_SOAK_STEPS", "500"))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_soak_replicas_equal_a_single_process_every_step():
    """500 steps by default; FSYNCBN_SOAK_STEPS=N pytest tests/test_faults.py -k soak for N."""
    torch.manual_seed(0)
    model = nn.Sequential(SynchronizedBatchNorm1d(5), nn.Linear(5, 5), SynchronizedBatchNorm1d(5)).double()
    reference = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 5), nn.BatchNorm1d(5)).double()
    reference.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    threads_before = memory_before = None
    for step in range(SOAK_STEPS):
        sizes = torch.randint(0, 5, (3,), generator=gen).tolist()
        if sum(sizes) < 2:
            sizes[0] += 2
        x = torch.randn(sum(sizes), 5, dtype=torch.float64, generator=gen)
        outs = raise_first(run_replicas(replicate(model, 3), list(x.split(sizes))))
        torch.testing.assert_close(torch.cat(outs), reference(x), rtol=1e-9, atol=1e-9)
        for b, b_ref in zip(model.buffers(), reference.buffers(), strict=True):
            torch.testing.assert_close(b, b_ref, rtol=1e-9, atol=1e-9)
        if step == 5:
            threads_before, memory_before = threading.active_count(), _rss_mb()
    assert threading.active_count() <= threads_before
    assert _rss_mb() - memory_before < 50, "memory grew over the run"


def test_two_replicated_models_in_two_threads_do_not_interfere():
    models = [SynchronizedBatchNorm1d(4).double(), SynchronizedBatchNorm1d(4).double()]
    references = [nn.BatchNorm1d(4).double(), nn.BatchNorm1d(4).double()]
    data = [torch.randn(6, 4, dtype=torch.float64) * (i + 1) for i in range(2)]

    def train(i):
        for _ in range(10):
            raise_first(run_replicas(replicate(models[i], 3), list(data[i].split([1, 2, 3]))))
            references[i](data[i])

    raise_first(run_threads(2, train, timeout=120))
    for model, reference in zip(models, references, strict=True):
        torch.testing.assert_close(model.running_var, reference.running_var, rtol=1e-12, atol=1e-12)
