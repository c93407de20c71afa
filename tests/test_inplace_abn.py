"""In-place activated batch norm: the op (gradcheck, references), the layer on every way in
(local, reducer threads, DataParallel replicas, DDP over gloo, torch.compile, checkpointing,
eval), its errors, and convert_model's fold and revert_model's unfold."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fsyncbn
from fsyncbn import ConversionWarning, InPlaceABN, convert_model, revert_model
from fsyncbn.functional import activated, batch_norm_act, init_state
from fsyncbn.integrations.timm import SynchronizedBatchNormAct2d, register_norm_act
from tests._support.distributed import spawn
from tests._support.reference import float64_training_batch_norm, informative_grad, nearly_constant_channel
from tests._support.replica_threads import replicate, run_replicas
from tests._support.threads import ThreadGroup, raise_first, run_threads

ACTIVATIONS = [("leaky_relu", 0.01), ("leaky_relu", 0.3), ("elu", 1.0), ("elu", 0.5), ("identity", 0.0)]
ACT_IDS = [f"{a}-{p}" for a, p in ACTIVATIONS]


def act(y, activation, param):
    """The activation in plain torch, for the references."""
    if activation == "leaky_relu":
        return F.leaky_relu(y, param)
    if activation == "elu":
        return F.elu(y, param)
    return y


def _params(c, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    # Negative and positive weights, all of magnitude >= eps: the op is exact batch norm there.
    w = (torch.rand(c, generator=gen, dtype=dtype) + 0.5) * torch.tensor([1.0, -1.0] * c)[:c].to(dtype)
    b = torch.randn(c, generator=gen, dtype=dtype)
    return w.requires_grad_(), b.requires_grad_()


# --- the op ---------------------------------------------------------------------------------


@pytest.mark.parametrize("eps_mode", ["plus", "clamp"])
@pytest.mark.parametrize("activation,param", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("reducer", [None, fsyncbn.LocalReducer()], ids=["local", "sync"])
def test_gradcheck(activation, param, eps_mode, reducer):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=gen).requires_grad_()
    w, b = _params(3)

    def fn(x, w, b):
        # The op overwrites its input: give it a copy, as a layer gets a convolution's output.
        return batch_norm_act(x.clone(), None, w, b, training=True, reducer=reducer, eps_mode=eps_mode,
                              activation=activation, activation_param=param)[0]

    assert torch.autograd.gradcheck(fn, (x, w, b), atol=1e-7)


@pytest.mark.parametrize("eps_mode", ["plus", "clamp"])
@pytest.mark.parametrize("activation,param", ACTIVATIONS, ids=ACT_IDS)
def test_equals_batch_norm_then_activation_in_float64(activation, param, eps_mode):
    """Against the float64 formula (clamp: with a channel whose variance is below eps)."""
    x = nearly_constant_channel((6, 3, 5))
    g = informative_grad(x.shape, x.dtype)
    w, b = _params(3)
    xr = x.clone().requires_grad_()
    ref = act(float64_training_batch_norm(xr, w, b, eps=1e-5, eps_mode=eps_mode), activation, param)
    ref_grads = torch.autograd.grad((ref * g).sum(), (xr, w, b))
    xi = x.clone().requires_grad_()
    h = xi * 1.0  # a non-leaf, as a convolution's output
    y, _ = batch_norm_act(h, None, w, b, training=True, eps_mode=eps_mode, activation=activation,
                          activation_param=param)
    assert y is h
    grads = torch.autograd.grad((y * g).sum(), (xi, w, b))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    for got, expected, name in zip(grads, ref_grads, "xwb", strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8, msg=name)


def test_weight_below_eps_is_floored_and_its_gradient_is_batch_norms():
    """|gamma| < eps computes with sign(gamma) * eps (+eps at 0); gamma's gradient is batch
    norm's sum(dy * xhat) there too (straight through)."""
    eps = 1e-3
    x = torch.randn(8, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    g = informative_grad(x.shape, x.dtype)
    w = torch.tensor([0.0, -1e-4, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    w_eff = torch.tensor([eps, -eps, 2.0], dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_()
    ref = F.leaky_relu(F.batch_norm(xr, None, None, w_eff, b, True, 0.0, eps), 0.1)
    ref_grads = torch.autograd.grad((ref * g).sum(), (xr, w_eff))
    xi = x.clone().requires_grad_()
    y, _ = batch_norm_act(xi * 1.0, None, w, b, training=True, eps=eps, activation_param=0.1)
    grads = torch.autograd.grad((y * g).sum(), (xi, w))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(grads[1], ref_grads[1], rtol=1e-8, atol=1e-8)
    # The same function in eval and out of the autograd path: the floored weight.
    state = init_state(3, dtype=torch.float64)
    out, _ = batch_norm_act(x, state, w, b, training=False, eps=eps, activation_param=0.1)
    expected = F.leaky_relu(F.batch_norm(x, state["running_mean"], state["running_var"], w_eff.detach(), b,
                                         False, 0.0, eps), 0.1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_equal_the_out_of_place_layers(momentum):
    torch.manual_seed(0)
    layers = [InPlaceABN(4, momentum=momentum, in_place=flag).double() for flag in (True, False)]
    for step in range(3):
        x = torch.randn(6, 4, 3, 3, dtype=torch.float64) * (step + 1) + step
        outs = [layer(x.clone()) for layer in layers]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layers[0], key), getattr(layers[1], key), rtol=1e-12, atol=1e-14)
    assert int(layers[0].num_batches_tracked) == 3


def test_float32_channels_last_matches_the_out_of_place_layer():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last) * 3 + 2
    g = informative_grad(x.shape, x.dtype).contiguous(memory_format=torch.channels_last)
    layers = [InPlaceABN(8, in_place=flag) for flag in (True, False)]
    with torch.no_grad():
        layers[0].weight.uniform_(0.5, 1.5)
    layers[1].load_state_dict(layers[0].state_dict())
    results = []
    for layer in layers:
        xi = x.clone().requires_grad_()
        y = layer(xi * 1.0)
        assert y.is_contiguous(memory_format=torch.channels_last)
        (y * g).sum().backward()
        results.append((y.detach(), xi.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eps_mode", ["plus", "clamp"])
@pytest.mark.parametrize("activation,param", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("reducer", [None, fsyncbn.LocalReducer()], ids=["local", "sync"])
def test_backward_by_slices_of_the_batch_equals_one_slice(monkeypatch, activation, param, eps_mode, reducer):
    """Backward recovers the pre-activation slice by slice of dim 0 (its size from the shape
    only): slices of 2 rows and a shorter last one give the one-slice result to rounding."""
    x = nearly_constant_channel((7, 3, 5))
    g = informative_grad(x.shape, x.dtype)
    results = []
    for chunk_bytes in (1 << 30, 2 * 3 * 5 * 8):  # one slice; slices of 2, 2, 2, 1 rows
        monkeypatch.setattr(activated, "_CHUNK_BYTES", chunk_bytes)
        w, b = _params(3)
        xi = x.clone().requires_grad_()
        y, _ = batch_norm_act(xi * 1.0, None, w, b, training=True, reducer=reducer, eps_mode=eps_mode,
                              activation=activation, activation_param=param)
        results.append(torch.autograd.grad((y * g).sum(), (xi, w, b)))
    assert len(activated._batch_slices(x)) == 4
    for got, expected, name in zip(*results, "xwb", strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=name)


def test_backward_allocates_one_full_size_buffer_the_input_gradient(monkeypatch):
    """For LeakyReLU, backward writes dy into the input gradient's buffer and recovers the
    pre-activation into one slice-sized scratch buffer: no other full-size allocation (the
    peak of a training step). Deterministic: counts the storages that torch ops return."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(activated, "_CHUNK_BYTES", 2 * 4 * 6 * 4)  # slices of 2 rows of 8
    x = torch.randn(8, 4, 6)
    full = x.numel() * x.element_size()

    class Storages(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return out

    xi = x.clone().requires_grad_()
    # clone's backward passes the gradient on, allocating nothing.
    y, _ = batch_norm_act(xi.clone(), None, torch.ones(4, requires_grad=True), torch.zeros(4), training=True)
    g = torch.randn_like(x)
    keep = {t.untyped_storage().data_ptr() for t in (y, g)}
    mode = Storages()
    with mode:
        y.backward(g)
    new = {ptr: size for ptr, size in mode.sizes.items() if ptr not in keep}
    assert sorted(new.values())[-2:] == [full // 4, full], new  # the scratch, then dx
    assert xi.grad is not None


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_in_place_affine_of_the_forward_equals_plain_ops(layout):
    """The forward's per-channel affine runs torch's inference kernel over its own input."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(3, 4, 6, 5).transpose(2, 3)
    scale, shift = torch.randn(4), torch.randn(4)
    expected = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    out = activated._scale_shift_(x, scale, shift)
    assert out is x
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_empty_batch_and_no_running_stats():
    layer = InPlaceABN(3, track_running_stats=False).double()
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    y = layer(x.clone())
    expected = F.leaky_relu(F.batch_norm(x, None, None, layer.weight, layer.bias, True), 0.01)
    torch.testing.assert_close(y, expected)
    out, state = batch_norm_act(torch.empty(0, 3, 2), init_state(3), training=True,
                                reducer=fsyncbn.LocalReducer())
    assert out.shape == (0, 3, 2) and int(state["num_batches_tracked"]) == 1
    torch.testing.assert_close(state["running_var"], torch.ones(3))


# --- errors -----------------------------------------------------------------------------


def test_relu_in_place_raises_and_says_what_to_do():
    with pytest.raises(ValueError, match=r"InPlaceABN: activation='relu' cannot run with in_place=True.*"
                       r"use activation='leaky_relu' with a small slope.*or in_place=False"):
        InPlaceABN(4, activation="relu")
    with pytest.raises(ValueError, match=r"batch_norm_act: activation='relu' cannot run with in_place=True"):
        batch_norm_act(torch.randn(4, 3), None, training=True, activation="relu")
    # Out of place ReLU is plain batch norm + ReLU.
    x = torch.randn(5, 3)
    y = InPlaceABN(3, activation="relu", in_place=False)(x)
    torch.testing.assert_close(y, F.relu(F.batch_norm(x, None, None, training=True)))


def test_bad_activation_arguments_raise():
    with pytest.raises(ValueError, match=r"InPlaceABN: expected activation 'leaky_relu', 'elu', "
                       r"'identity' or 'relu', got 'gelu'"):
        InPlaceABN(4, activation="gelu")
    with pytest.raises(ValueError,
                       match=r"expected activation_param \(the leaky_relu slope\) > 0 with in_place=True"):
        InPlaceABN(4, activation_param=0.0)
    with pytest.raises(TypeError, match=r"InPlaceABN: expected in_place to be a bool, got 'yes'"):
        InPlaceABN(4, in_place="yes")


def test_a_leaf_input_that_requires_grad_is_refused():
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"batch_norm_act: in_place=True overwrites the input, which is a "
                       r"leaf tensor that requires grad.*pass input.clone\(\)"):
        batch_norm_act(x, None, training=True)
    # The layer names itself (its class and channels, or its place in a model) instead of the op.
    with pytest.raises(ValueError, match=r"^InPlaceABN\(3\): in_place=True overwrites the input, which is "
                       r"a leaf tensor that requires grad.*pass input.clone\(\)"):
        InPlaceABN(3)(x)


def test_reusing_the_overwritten_input_raises_autograds_error():
    """A tensor that another op saved for backward, then overwritten by the layer: backward
    raises autograd's own error instead of computing with the wrong values."""
    conv, layer = nn.Conv2d(3, 4, 1), InPlaceABN(4)
    h = conv(torch.randn(2, 3, 5, 5))
    side = torch.sigmoid(h) * h  # mul saves h (version 0) for its backward
    y = layer(h)
    assert y is h  # the layer's output is its input, overwritten
    with pytest.raises(RuntimeError, match=r"one of the variables needed for gradient computation has been "
                       r"modified by an inplace operation: \[torch.FloatTensor \[2, 4, 5, 5\]\], "
                       r"which is output 0 of InPlaceABN, is at version \d+; expected "
                       r"version 0 instead") as info:
        (y.sum() + side.sum()).backward()
    print(info.value)  # the message the user sees


def test_eval_returns_a_new_tensor_and_leaves_the_input_alone():
    layer = InPlaceABN(3, activation="elu", activation_param=0.5).double()
    layer(torch.randn(8, 3, 4, dtype=torch.float64))
    layer.eval()
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    before = x.clone()
    y = layer(x)
    assert y is not x and torch.equal(x, before)
    expected = F.elu(F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False,
                                  0.0, layer.eps), 0.5)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


# --- every way in -------------------------------------------------------------------------


SPLITS = [3, 0, 4]


def _union_reference(x, g, activation, param, eps_mode="plus"):
    """One process on the whole (concatenated) batch: output, (dx, dw, db), running stats."""
    w, b = _params(x.shape[1])
    state = init_state(x.shape[1], dtype=x.dtype)
    xr = x.clone().requires_grad_()
    ref = act(float64_training_batch_norm(xr, w, b, eps=1e-5, eps_mode=eps_mode), activation, param)
    grads = torch.autograd.grad((ref * g).sum(), (xr, w, b))
    from tests._support.reference import float64_moments

    mean, _, var_unbiased = float64_moments(x)
    state = {"running_mean": 0.1 * mean, "running_var": 0.9 + 0.1 * var_unbiased}
    return ref.detach(), grads, state


@pytest.mark.parametrize("activation,param", ACTIVATIONS[::2], ids=ACT_IDS[::2])
@pytest.mark.parametrize("eps_mode", ["plus", "clamp"])
def test_three_threads_equal_the_union(activation, param, eps_mode):
    x = nearly_constant_channel((sum(SPLITS), 3, 4))
    g = informative_grad(x.shape, x.dtype)
    ref, ref_grads, ref_state = _union_reference(x, g, activation, param, eps_mode)
    group = ThreadGroup(3)
    w, b = _params(3)
    ws = [w.detach().clone().requires_grad_() for _ in SPLITS]
    bs = [b.detach().clone().requires_grad_() for _ in SPLITS]
    xs = [part.clone().requires_grad_() for part in x.split(SPLITS)]

    def participant(rank):
        state = init_state(3, dtype=torch.float64)
        y, new_state = batch_norm_act(xs[rank] * 1.0, state, ws[rank], bs[rank], training=True,
                                      reducer=group.reducer(rank), eps_mode=eps_mode, activation=activation,
                                      activation_param=param)
        (y * g.split(SPLITS)[rank]).sum().backward()
        return y.detach(), new_state

    results = raise_first(run_threads(3, participant))
    torch.testing.assert_close(torch.cat([r[0] for r in results]), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([xi.grad for xi in xs]), ref_grads[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum(wi.grad for wi in ws), ref_grads[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum(bi.grad for bi in bs), ref_grads[2], rtol=1e-10, atol=1e-10)
    for _, state in results:
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(state[key], ref_state[key], rtol=1e-10, atol=1e-10)
    # One sum forward (2C + 4 numbers), one backward (2C), for every participant.
    assert group.sums == [[(10,), (6,)]] * 3


class ConvABN(nn.Module):
    """conv -> InPlaceABN (or BN + activation), the layer's input a fresh convolution output."""

    def __init__(self, norm: nn.Module, act_module: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = norm
        self.act = act_module or nn.Identity()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.act(self.norm(self.conv(x))))


def _models(dtype=torch.float64):
    ours = ConvABN(InPlaceABN(4, activation="leaky_relu", activation_param=0.2)).to(dtype)
    ref = ConvABN(nn.BatchNorm2d(4), nn.LeakyReLU(0.2)).to(dtype)
    with torch.no_grad():
        ours.norm.weight.copy_(torch.tensor([1.5, -0.7, 0.3, 2.0]))
        ours.norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def test_dataparallel_replicas_equal_one_model_on_the_whole_batch():
    ours, ref = _models()
    x = torch.randn(sum(SPLITS), 3, 5, 5, dtype=torch.float64)
    g = informative_grad((sum(SPLITS), 2, 5, 5), x.dtype)
    out_ref = ref(x)
    (out_ref * g).sum().backward()
    replicas = replicate(ours, len(SPLITS))
    gs = g.split(SPLITS)

    def backward(i, out):
        (out * gs[i]).sum().backward()
        return out.detach()

    outs = raise_first(run_replicas(replicas, x.split(SPLITS), backward))
    torch.testing.assert_close(torch.cat(outs), out_ref.detach(), rtol=1e-10, atol=1e-10)
    for name, p_ref in ref.named_parameters():
        total = sum(dict(r.named_parameters())[name].grad for r in replicas)
        torch.testing.assert_close(total, p_ref.grad, rtol=1e-10, atol=1e-10, msg=name)
    for name, b_ref in ref.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], b_ref, rtol=1e-10, atol=1e-10, msg=name)


def _ddp_worker(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    splits = [3, 5]
    ours, ref = _models()
    ddp = DDP(ours)
    x = torch.randn(sum(splits), 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = informative_grad((sum(splits), 2, 5, 5), torch.float64)
    for step in range(2):
        out = ddp((x + step).split(splits)[rank])
        (out * g.split(splits)[rank]).sum().backward()
        out_ref = ref(x + step)
        (out_ref * g).sum().backward()
        torch.testing.assert_close(out, out_ref.split(splits)[rank], rtol=1e-10, atol=1e-10)
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad * world_size, p_ref.grad, rtol=1e-10, atol=1e-10, msg=name)
    for (name, b), b_ref in zip(ours.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, rtol=1e-10, atol=1e-10, msg=name)
    del ddp


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_over_two_gloo_ranks_equals_the_union():
    spawn(2, _ddp_worker)


def test_checkpoint_recomputation_equals_a_plain_step():
    from torch.utils.checkpoint import checkpoint

    ours, ref = _models()
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    g = informative_grad((6, 2, 5, 5), x.dtype)
    out = checkpoint(ours, x, use_reentrant=False)
    (out * g).sum().backward()
    out_ref = ref(x)
    (out_ref * g).sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-10, msg=name)
    # The recomputation kept no statistics: one step counted, as in the reference.
    torch.testing.assert_close(ours.norm.running_var, ref.norm.running_var, rtol=1e-10, atol=1e-10)
    assert int(ours.norm.num_batches_tracked) == 1


@pytest.mark.slow
@pytest.mark.parametrize("in_place", [True, False])
def test_compiled_fullgraph_equals_eager(in_place):
    torch._dynamo.reset()
    eager, _ = _models(torch.float32)
    eager.norm.in_place = in_place
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(2):
        x = torch.randn(4, 3, 6, 6) + step
        g = informative_grad((4, 2, 6, 6), torch.float32, seed=step)
        for model in (eager, compiled):
            (model(x) * g).sum().backward()
    for (name, p), p_c in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(p_c.grad, p.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, b), b_c in zip(eager.named_buffers(), compiled_model.buffers(), strict=True):
        torch.testing.assert_close(b_c, b, rtol=1e-5, atol=1e-6, msg=name)


# --- convert_model's fold -----------------------------------------------------------------


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ELU(0.5),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),  # not invertible: converted, not folded
        nn.BatchNorm2d(4), nn.LeakyReLU(0.1),  # its input is a ReLU's output: not folded
        nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6), nn.Identity(),
    ).double()


def test_fold_computes_what_the_model_computed_and_warns_once_per_skipped_pattern():
    net, ref = _net(), _net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = convert_model(net, fuse_activations=True)
    kinds = [type(m).__name__ for m in folded]
    assert kinds == ["Conv2d", "InPlaceABN", "Identity", "Conv2d", "InPlaceABN", "Identity", "Conv2d",
                     "SynchronizedBatchNorm2d", "ReLU", "SynchronizedBatchNorm2d", "LeakyReLU", "Flatten",
                     "Linear", "InPlaceABN", "Identity"]
    assert (folded[1].activation, folded[1].activation_param) == ("leaky_relu", 0.1)
    assert (folded[4].activation, folded[4].activation_param) == ("elu", 0.5)
    assert folded[13].activation == "identity"
    messages = [str(w.message) for w in caught if issubclass(w.category, ConversionWarning)]
    assert len(messages) == 2, messages
    assert any("BatchNorm2d + ReLU into InPlaceABN at '7', since it is not invertible" in m for m in messages)
    assert any("BatchNorm2d + LeakyReLU into InPlaceABN at '9', since its input is not the fresh output of "
               "a convolution" in m for m in messages)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    g = informative_grad((4, 6), x.dtype)
    for _ in range(2):
        out, out_ref = folded(x), ref(x)
        (out * g).sum().backward()
        (out_ref * g).sum().backward()
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for (name, p), p_ref in zip(folded.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-9, msg=name)
    for (name, b), b_ref in zip(folded.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, rtol=1e-10, atol=1e-10, msg=name)


def test_without_fuse_activations_nothing_is_folded():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = convert_model(_net())
    assert not any(isinstance(m, InPlaceABN) for m in converted.modules())


def test_revert_undoes_the_fold():
    net = _net()
    originals = list(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)
        folded = convert_model(net, fuse_activations=True)
    reverted = revert_model(folded)
    assert [type(m) for m in reverted] == [type(m) for m in originals]
    for i in (2, 5, 14):  # the very activation modules, back in their slots
        assert reverted[i] is originals[i]
    for i in (1, 4, 13):  # the same tensors
        assert reverted[i].weight is originals[i].weight
        assert reverted[i].running_var is originals[i].running_var


# timm's BatchNormAct2d and ConvNormAct, in structure (timm does not import here).
class MimicBatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 act_layer=nn.LeakyReLU, drop_layer=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class ConvNormAct(nn.Module):
    """timm's conv + norm-act block: forward is ``bn(conv(x))``."""

    def __init__(self, c_in, c_out, **bn_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = MimicBatchNormAct2d(c_out, **bn_kwargs)

    def forward(self, x):
        return self.bn(self.conv(x))


ConvNormAct.__module__ = "timm.layers.conv_bn_act"


class PreAct(nn.Module):
    """A pre-activation block: the norm's input is also the shortcut, so it must not be folded."""

    def __init__(self, c):
        super().__init__()
        self.norm = MimicBatchNormAct2d(c)
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.conv(self.norm(x)) + x


class MimicSynchronizedBatchNormAct2d(SynchronizedBatchNormAct2d):
    pass


register_norm_act(MimicBatchNormAct2d, MimicSynchronizedBatchNormAct2d)


def _timm_net():
    torch.manual_seed(0)
    return nn.Sequential(
        ConvNormAct(3, 4), ConvNormAct(4, 4, act_layer=nn.ReLU),
        ConvNormAct(4, 4, drop_layer=lambda: nn.Dropout(0.0)),
        PreAct(4),
    ).double()


def test_fold_of_timm_norm_act_layers():
    net, ref = _timm_net(), _timm_net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = convert_model(net, fuse_activations=True)
    assert isinstance(folded[0].bn, InPlaceABN)
    assert type(folded[1].bn) is MimicSynchronizedBatchNormAct2d  # ReLU: converted, not folded
    assert type(folded[2].bn) is MimicSynchronizedBatchNormAct2d  # dropout in between
    assert type(folded[3].norm) is MimicSynchronizedBatchNormAct2d  # its input is the shortcut
    messages = " | ".join(str(w.message) for w in caught if issubclass(w.category, ConversionWarning))
    assert messages.count("convert_model: did not fold") == 3, messages
    assert ("MimicBatchNormAct2d + LeakyReLU into InPlaceABN at '3.norm', since its input is not the fresh "
            "output") in messages
    assert "MimicBatchNormAct2d + LeakyReLU into InPlaceABN at '2.bn', since a dropout runs" in messages
    assert "MimicBatchNormAct2d + ReLU into InPlaceABN at '1.bn', since it is not invertible" in messages
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    g = informative_grad((4, 4, 5, 5), x.dtype)
    out, out_ref = folded(x), ref(x)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for (name, p), p_ref in zip(folded.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-9, msg=name)
    act_module = folded[0].bn._fold_origin.activation
    reverted = revert_model(folded)
    assert type(reverted[0].bn) is MimicBatchNormAct2d and reverted[0].bn.act is act_module
    assert type(reverted[1].bn) is MimicBatchNormAct2d and isinstance(reverted[1].bn.act, nn.ReLU)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_half_precision_output_is_rounded_once(dtype, training):
    """float16/bfloat16 input computes in float32 (the kernel's mixed mode) and rounds once: on
    offset data (mean 40, std 3), where x * scale and the shift nearly cancel, the output is as
    close to the float64 result as that result rounded to the dtype (rounding twice was 10-20x
    further)."""
    g = torch.Generator().manual_seed(0)
    x64 = 40 + 3 * torch.randn(8, 6, 5, 5, dtype=torch.float64, generator=g)
    x = x64.to(dtype)
    weight = 1 + torch.rand(6, generator=g)
    bias = torch.randn(6, generator=g)
    state = init_state(6)
    state["running_mean"].fill_(40.0)
    state["running_var"].fill_(9.0)
    out, _ = batch_norm_act(x.clone(), {k: v.clone() for k, v in state.items()}, weight, bias,
                            training=training)
    assert out.dtype == dtype
    if training:
        mean, var = x.double().mean((0, 2, 3)), x.double().var((0, 2, 3), unbiased=False)
    else:
        mean, var = state["running_mean"].double(), state["running_var"].double()
    view = (1, -1, 1, 1)
    y = ((x.double() - mean.view(view)) / (var.view(view) + 1e-5).sqrt() * weight.double().view(view)
         + bias.double().view(view))
    reference = F.leaky_relu(y, 0.01)
    rounding = (reference.to(dtype).double() - reference).abs().mean()
    error = (out.double() - reference).abs().mean()
    assert error <= 2 * rounding, (float(error), float(rounding))
