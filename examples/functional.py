"""The pure functional API: explicit state in, new state out; ensembles with vmap; a reducer.

    python examples/functional.py
"""

from __future__ import annotations

import threading

import torch
from torch.func import vmap

from fsyncbn.functional import batch_norm, init_state, sync_batch_norm


def explicit_state() -> None:
    """A training loop that threads the state through, as in JAX/Equinox."""
    torch.manual_seed(0)
    weight = torch.ones(3, requires_grad=True)
    bias = torch.zeros(3, requires_grad=True)
    state = init_state(3)
    for _ in range(5):
        x = torch.randn(16, 3, 8, 8) * 2 + 1
        y, state = batch_norm(x, state, weight, bias, training=True, momentum=None)
        (y * torch.randn_like(y)).sum().backward()
    print("running_mean after 5 steps (cumulative average):", state["running_mean"])
    y_eval, _ = batch_norm(x, state, weight, bias, training=False)
    print("eval output mean per channel:", y_eval.mean((0, 2, 3)))


def ensemble() -> None:
    """Four independent batch-norm states trained at once with vmap (training mode).

    torch has no vmap batching rule yet for the batch-norm kernel that batch_norm calls
    (aten::_native_batch_norm_legit_functional), so vmap runs it once per member and torch
    prints a "performance drop ... batching rule not implemented" warning. The results are
    exact (checked against a loop over the members below); only the speed is a loop's.
    """
    members, channels = 4, 3
    one = init_state(channels)
    states = {key: torch.stack([value] * members) for key, value in one.items()}
    x = torch.randn(members, 16, channels) + torch.arange(members).view(members, 1, 1)
    print("vmap over 4 members (torch may warn of a 'performance drop': no batching rule for its "
          "batch-norm kernel yet, so it loops over the members; the results are exact)")
    _, new_states = vmap(lambda s, xi: batch_norm(xi, s, training=True))(states, x)
    looped = torch.stack([batch_norm(x[i], one, training=True)[1]["running_mean"] for i in range(members)])
    print("per-member running_mean:\n", new_states["running_mean"])
    print(f"vmap vs a loop over the members: max difference "
          f"{(new_states['running_mean'] - looped).abs().max():.1e}")


def custom_reducer() -> None:
    """Two participants as threads, with a reducer written against the contract alone."""
    barrier = threading.Barrier(2)
    slots: list[torch.Tensor | None] = [None, None]

    def make_reducer(rank: int):
        def total(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t
            barrier.wait()
            result = slots[0] + slots[1]
            barrier.wait()
            return result

        class Sum(torch.autograd.Function):  # differentiable: backward is the same sum
            @staticmethod
            def forward(ctx, t):
                return total(t)

            @staticmethod
            def backward(ctx, g):
                return total(g)

        return Sum.apply

    x = torch.randn(10, 3, dtype=torch.float64)
    shards = [x[:7], x[7:]]
    outputs: list[torch.Tensor | None] = [None, None]

    def participant(rank: int) -> None:
        y, _ = sync_batch_norm(shards[rank], init_state(3), reducer=make_reducer(rank))
        outputs[rank] = y

    threads = [threading.Thread(target=participant, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    whole = torch.nn.functional.batch_norm(x, None, None, training=True)
    gap = (torch.cat(outputs) - whole).abs().max()
    print(f"2 participants (7 + 3 rows) vs batch norm on all 10: max difference {gap:.1e}")


if __name__ == "__main__":
    explicit_state()
    ensemble()
    custom_reducer()
