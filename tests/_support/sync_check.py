"""The central check for whole models: synchronized replicas train like one model on the whole batch.

``replicas_train_like_one_model`` converts a copy of a plain model, trains it for a few SGD
steps as DataParallel-style replicas (CPU threads, fsyncbn's own replication callback), each
on its share of the batch, and trains another copy unsynchronized on the whole batch. Outputs,
weights and running statistics must agree at every step, and the reverted model must hold
the plain classes again with the reference's values.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fsyncbn import convert_model, revert_model
from tests._support.reference import informative_grad
from tests._support.replica_threads import replicate, run_replicas
from tests._support.threads import raise_first


def _sgd(model: nn.Module, lr: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None


def replicas_train_like_one_model(
    plain: nn.Module, x: torch.Tensor, splits: list[int], *, steps: int = 2, lr: float = 0.05,
    tol: float = 1e-9, timeout: float = 60.0,
) -> nn.Module:
    """Run the check; return the reverted synchronized model."""
    reference = copy.deepcopy(plain).train()
    synced = convert_model(copy.deepcopy(plain)).train()
    for step in range(steps):
        out_ref = reference(x)
        g = informative_grad(tuple(out_ref.shape), out_ref.dtype, seed=step)
        (out_ref * g).sum().backward()
        replicas = replicate(synced, len(splits))
        gs = g.split(splits)

        def backward(i: int, out: torch.Tensor, gs=gs) -> torch.Tensor:
            (out * gs[i]).sum().backward()
            return out.detach()

        outs = raise_first(run_replicas(replicas, list(x.split(splits)), backward, timeout=timeout))
        torch.testing.assert_close(torch.cat(outs), out_ref.detach(), rtol=tol, atol=tol)
        # DataParallel sums the replicas' gradients into the module (replica 0 is the module).
        for name, p in synced.named_parameters():
            others = [dict(r.named_parameters())[name].grad for r in replicas[1:]]
            if p.grad is not None:
                p.grad = p.grad + sum(o for o in others if o is not None)
        _sgd(reference, lr)
        _sgd(synced, lr)
        ref_state = reference.state_dict()
        for key, value in synced.state_dict().items():
            torch.testing.assert_close(value, ref_state[key], rtol=tol, atol=tol, msg=f"step {step}: {key}")
    reverted = revert_model(synced)
    plain_types = [type(m) for m in plain.modules()]
    assert [type(m) for m in reverted.modules()] == plain_types
    return reverted
