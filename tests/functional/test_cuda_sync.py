"""The CUDA sync path (fsyncbn.functional.paths.cuda_sync), its exact op sequence run on CPU.

torch's CUDA-only sync-batch-norm kernels run as reference CPU implementations registered for
the test (tests/_support/cuda_reference.py), and the two Triton glue kernels under Triton's
interpreter. Their compilation for real GPUs is tests/functional/test_cuda_glue_aot.py.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from fsyncbn import SynchronizedBatchNorm2d
from fsyncbn.functional import LocalReducer, init_state, sync_batch_norm
from fsyncbn.functional.ops import choose_path, run_batch_norm
from tests._support.cuda_reference import LaunchCounter, cuda_kernels_on_cpu
from tests._support.threads import ThreadGroup, raise_first, run_threads
from tests._support.walk import DRAWN_WALKS, walk

triton = pytest.importorskip("triton")

from fsyncbn.functional.paths import cuda_glue, cuda_sync  # noqa: E402

GLUE_KERNELS = ("pack_message_kernel", "merge_message_kernel")


class _Interpreted:
    """A glue kernel run by Triton's interpreter on CPU tensors; each launch is recorded as one
    kernel launch in ``launches``, and the interpreter's own tensor copies are not. One launch
    at a time: the interpreter patches triton.language globally while it runs."""

    lock = threading.Lock()

    def __init__(self, kernel, name: str, launches: list[str]) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        self.fn, self.name, self.launches = InterpretedFunction(kernel.fn), name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(self.name)
            with self.lock, _disable_current_modes():
                self.fn[grid](*args, **kwargs)

        return launch


@pytest.fixture
def cuda_path_on_cpu(monkeypatch):
    """CPU tensors take the CUDA sync path; yields the list of glue launches."""
    launches: list[str] = []
    for name in GLUE_KERNELS:
        monkeypatch.setattr(cuda_glue, name, _Interpreted(getattr(cuda_glue, name), name, launches))
    monkeypatch.setattr(cuda_sync, "DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setattr(cuda_sync, "_compiled", set())
    monkeypatch.setattr(cuda_sync, "_failed", {})
    monkeypatch.delenv("FSYNCBN_FUSED", raising=False)
    with cuda_kernels_on_cpu():
        yield launches


def _layouts():
    cases = {
        "contiguous": lambda: torch.randn(4, 6, 5, 3),
        "channels_last": lambda: torch.randn(4, 6, 5, 3).contiguous(memory_format=torch.channels_last),
        "channels_last_3d": lambda: torch.randn(3, 6, 2, 3, 4).contiguous(
            memory_format=torch.channels_last_3d),
        "(N, C)": lambda: torch.randn(20, 6),
        "(N, C, L)": lambda: torch.randn(5, 6, 7),
        "non-dense (N, C)": lambda: torch.randn(20, 12)[:, ::2],
        "non-dense (N, C, H, W)": lambda: torch.randn(4, 9, 5, 6)[:, 1:7, :, ::2],
    }
    assert cases
    return cases


LAYOUTS = _layouts()
DTYPES = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _step(x, eps_mode, momentum, reducer, *, affine=True, state=True, in_place=False, seed=0):
    """One training step of the op: output, input and parameter gradients, new state."""
    g = torch.Generator().manual_seed(seed)
    channels = x.shape[1]
    param_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.detach().clone().requires_grad_()
    w = (1 + torch.rand(channels, generator=g, dtype=param_dtype)).requires_grad_() if affine else None
    b = torch.randn(channels, generator=g, dtype=param_dtype).requires_grad_() if affine else None
    st = init_state(channels, dtype=param_dtype) if state else None
    if st is not None:
        st["running_mean"].normal_(generator=g)
        st["running_var"].uniform_(0.5, 2, generator=g)
        st["num_batches_tracked"] += 3
    y, new = run_batch_norm("sync_batch_norm", x, st, w, b, training=True, momentum=momentum,
                            eps=1e-5, reducer=reducer, eps_mode=eps_mode, in_place=in_place)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    y.backward(dy)
    grads = [x.grad] + ([w.grad, b.grad] if affine else [])
    return y, grads, new, (st, w, b, dy)


def _path(x, eps_mode="plus", momentum=0.1):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return choose_path(x, init_state(x.shape[1], dtype=dtype), None, None, training=True, momentum=momentum,
                       reducer=LocalReducer(), eps_mode=eps_mode)


def _assert_steps_close(got, want, tol):
    y, grads, state, _ = got
    y_ref, grads_ref, state_ref, _ = want
    torch.testing.assert_close(y.double(), y_ref.double(), rtol=tol, atol=tol)
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=tol, atol=tol * 10)
    if state_ref is not None:
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(state[key].double(), state_ref[key].double(), rtol=tol, atol=tol)
        assert int(state["num_batches_tracked"]) == int(state_ref["num_batches_tracked"])


def _composed(monkeypatch, fn):
    """``fn()`` on the composed path (FSYNCBN_FUSED=0)."""
    with monkeypatch.context() as m:
        m.setenv("FSYNCBN_FUSED", "0")
        return fn()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_equals_torch_batch_norm_in_every_layout_and_dtype(cuda_path_on_cpu, layout, dtype):
    x = LAYOUTS[layout]().to(dtype)
    assert _path(x) == "cuda_sync"
    del cuda_path_on_cpu[:]  # the first sight of a configuration rehearses the glue
    got = _step(x, "plus", 0.1, LocalReducer())
    assert cuda_path_on_cpu == list(GLUE_KERNELS)
    assert got[0].shape == x.shape and got[0].dtype == dtype
    if x.dim() > 2 and x.is_contiguous(memory_format=torch.channels_last if x.dim() == 4
                                       else torch.channels_last_3d) and not x.is_contiguous():
        assert not got[0].is_contiguous()  # channels_last stays

    # Reference: nn.BatchNorm's computation in float64 on the same values.
    state, w, b, dy = got[3]
    x64 = x.detach().double().requires_grad_()
    w64, b64 = (t.detach().double().requires_grad_() for t in (w, b))
    state = {k: v.double() for k, v in state.items()}
    y_ref = F.batch_norm(x64, state["running_mean"], state["running_var"], w64, b64, True, 0.1, 1e-5)
    y_ref.backward(dy.double())
    state["num_batches_tracked"] = state["num_batches_tracked"] + 1
    _assert_steps_close(got, (y_ref, [x64.grad, w64.grad, b64.grad], state, None), DTYPES[dtype])


@pytest.mark.parametrize("eps_mode", ["plus", "clamp"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "(N, C, L)"])
def test_equals_the_composed_path(cuda_path_on_cpu, monkeypatch, eps_mode, momentum, dtype, layout):
    x = LAYOUTS[layout]().to(dtype)
    if eps_mode == "clamp":
        x[:, 0] = 3.0 + 1e-4 * x[:, 0].float().to(dtype)  # a channel whose variance is below eps
    assert _path(x, eps_mode, momentum) == "cuda_sync"
    for affine, state in ((True, True), (False, False)):
        got = _step(x, eps_mode, momentum, LocalReducer(), affine=affine, state=state)
        want = _composed(monkeypatch, lambda: _step(x, eps_mode, momentum, LocalReducer(),  # noqa: B023
                                                    affine=affine, state=state))  # noqa: B023
        # Clamp mode divides a nearly constant channel by sqrt(eps): one float32 rounding of its
        # mean (here ~3) shows ~300 times larger in the output.
        tol = 1e-3 if dtype == torch.float16 else DTYPES[dtype] * (10 if eps_mode == "clamp" else 1)
        _assert_steps_close(got, want, tol)
        assert (got[1] is None) == (want[1] is None)


def test_pure_op_leaves_the_state_alone_and_the_layer_path_writes_it(cuda_path_on_cpu):
    x = torch.randn(8, 4, 3, 3)
    state = init_state(4)
    before = {k: v.clone() for k, v in state.items()}
    _, new = sync_batch_norm(x, state, reducer=LocalReducer())
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert new["running_mean"] is not state["running_mean"]
    _, written = run_batch_norm("batch_norm", x, state, None, None, training=True, momentum=0.1,
                                eps=1e-5, reducer=LocalReducer(), eps_mode="plus", in_place=True)
    for key in state:
        assert written[key] is state[key]
        torch.testing.assert_close(state[key], new[key])
    assert int(state["num_batches_tracked"]) == 1


def test_offset_data_keeps_its_variance(cuda_path_on_cpu):
    g = torch.Generator().manual_seed(1)
    x = (1e4 + torch.randn(64, 3, 8, 8, generator=g, dtype=torch.float64)).float()
    _, state = sync_batch_norm(x, init_state(3), reducer=LocalReducer(), momentum=1.0)
    want = x.double().transpose(0, 1).reshape(3, -1).var(dim=1)
    relative = ((state["running_var"].double() - want) / want).abs().max()
    assert relative < 1e-3, relative


def test_sharded_equals_global_over_threads_with_an_empty_share(cuda_path_on_cpu):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 5, 4, 4, generator=g, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(5, generator=g, dtype=torch.float64)
    shares = [(0, 6), (6, 6), (6, 9)]  # the middle participant is empty
    group = ThreadGroup(3)

    def participant(rank):
        lo, hi = shares[rank]
        xs = x[lo:hi].clone().requires_grad_()
        ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
        y, state = sync_batch_norm(xs, init_state(5, dtype=torch.float64), ws, bs,
                                   reducer=group.reducer(rank))
        y.backward(dy[lo:hi])
        return y.detach(), xs.grad, ws.grad, bs.grad, state

    results = raise_first(run_threads(3, participant))
    assert _path(x[:0]) == "composed" and _path(x[:3]) == "cuda_sync"
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    state = init_state(5, dtype=torch.float64)
    y_ref = F.batch_norm(xr, state["running_mean"], state["running_var"], wr, br, True, 0.1, 1e-5)
    y_ref.backward(dy)
    torch.testing.assert_close(torch.cat([r[0] for r in results]), y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), xr.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum(r[2] for r in results), wr.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum(r[3] for r in results), br.grad, rtol=1e-10, atol=1e-10)
    for r in results:
        torch.testing.assert_close(r[4]["running_mean"], state["running_mean"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r[4]["running_var"], state["running_var"], rtol=1e-10, atol=1e-12)


def test_disagreeing_channels_fail_the_device_assert(cuda_path_on_cpu):
    group = ThreadGroup(2, overlap=True)
    inputs = [torch.randn(4, 3, 2, 2), torch.randn(4, 5, 2, 2)]

    def participant(rank):
        return sync_batch_norm(inputs[rank], None, reducer=group.reducer(rank))

    results = run_threads(2, participant)
    for result in results:
        assert isinstance(result, RuntimeError)
        assert "participants disagree on the number of channels" in str(result)


@pytest.mark.parametrize("eps_mode", ["plus", "clamp"])
def test_launch_budget_of_a_layer_step(cuda_path_on_cpu, eps_mode):
    """At most 16 kernel launches per layer step, forward and backward, with a process-group
    reducer (clone + all_reduce, as ProcessGroupReducer on CUDA) and gradient accumulation
    into existing .grad; each reference op and each glue launch counts one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        def reducer(t):
            return _ReduceSum.apply(t)

        x = torch.randn(8, 16, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
        w, b = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)
        state = init_state(16)
        dy = torch.randn_like(x)
        for _ in range(2):  # the first builds caches; the second also accumulates .grad
            counter = LaunchCounter()
            del cuda_path_on_cpu[:]
            x.grad = None  # x stands for an activation: nothing accumulates into it
            with counter:
                y, _ = run_batch_norm("batch_norm", x, state, w, b, training=True, momentum=0.1,
                                      eps=1e-5, reducer=reducer, eps_mode=eps_mode, in_place=True)
                y.backward(dy)
        launches = counter.launches + cuda_path_on_cpu
    finally:
        dist.destroy_process_group()
    expected = {
        "batch_norm_update_stats": 1, "pack_message_kernel": 1, "clone": 2, "allreduce_": 2,
        "merge_message_kernel": 1, "_assert_async": 1, "batch_norm_elemt": 1,
        "batch_norm_backward_reduce": 1, "cat": 1, "batch_norm_backward_elemt": 1,
        "add_": 2,  # gradient accumulation into the existing .grad of weight and bias
    }
    if eps_mode == "clamp":
        expected["mul"] = 1
    assert sorted(launches) == sorted(name for name, n in expected.items() for _ in range(n)), str(launches)
    assert len(launches) <= 16


class _ReduceSum(torch.autograd.Function):
    """clone + all_reduce, forward and backward: what ProcessGroupReducer does on CUDA."""

    @staticmethod
    def forward(ctx, t):  # type: ignore[override]
        import torch.distributed as dist

        total = t.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _ReduceSum.forward(ctx, grad)


def test_glue_grids_stay_within_cuda_limits():
    """The glue's grids depend on C only, never on the batch: 10**7 rows launch the same grids
    as 10 (torch's kernels grid the batch themselves)."""
    limits = (2**31 - 1, 65535, 65535)
    for channels in (1, 3, 64, 1024, 1025, 2048, 65536, 2**20):
        for grid in (cuda_sync.pack_grid(channels), cuda_sync.MERGE_GRID):
            assert all(1 <= g <= limit for g, limit in zip(grid, limits, strict=False)), (channels, grid)
    assert cuda_sync.MERGE_GRID == (1,)  # num_batches_tracked is read before it is written


def test_a_glue_that_cannot_launch_falls_back_with_one_warning(monkeypatch):
    """The real Triton kernels on CPU tensors, on a machine without a GPU driver: the launch
    fails, the first call warns once naming the cause and FSYNCBN_FUSED, and every call takes
    the composed path with the same results."""
    monkeypatch.setattr(cuda_sync, "DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setattr(cuda_sync, "_compiled", set())
    monkeypatch.setattr(cuda_sync, "_failed", {})
    monkeypatch.delenv("FSYNCBN_FUSED", raising=False)
    if torch.cuda.is_available():
        monkeypatch.setattr(cuda_glue, "pack_message_kernel", _Broken())
    x = torch.randn(8, 3, 4, 4)
    with cuda_kernels_on_cpu():
        with pytest.warns(RuntimeWarning, match=r"Triton kernels failed on cpu .*FSYNCBN_FUSED=0"):
            assert _path(x) == "composed"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _path(x) == "composed"
            y, state = sync_batch_norm(x, init_state(3), reducer=LocalReducer())
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))
    assert list(cuda_sync._failed) == [("cpu", torch.float32, True, True, False)]


class _Broken:
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise triton.CompilationError("kernel.py", None, "made to fail")

        return launch


def test_fsyncbn_fused_0_turns_the_path_off(cuda_path_on_cpu, monkeypatch):
    x = torch.randn(8, 3)
    monkeypatch.setenv("FSYNCBN_FUSED", "0")
    assert _path(x) == "composed"
    assert cuda_path_on_cpu == []  # nothing was even tried
    monkeypatch.delenv("FSYNCBN_FUSED")
    assert _path(x) == "cuda_sync"


def test_the_path_stays_off_the_cpu_by_default():
    x = torch.randn(4, 3)
    assert cuda_sync.DEVICE_TYPES == {"cuda"}
    assert _path(x) == "composed"


def test_following_the_input_enters_each_module_once(cuda_path_on_cpu):
    """The layer's forward on this path, as docs/architecture.md draws it (tests/test_walk.py
    has the other paths)."""
    layer = SynchronizedBatchNorm2d(6, eps_mode="clamp")
    x = torch.randn(4, 6, 5, 3)
    layer(x)  # the first sight rehearses the glue
    assert cuda_path_on_cpu
    assert walk(lambda: layer(x), x) == DRAWN_WALKS["cuda_sync"]
