"""Bad input gets a clear error naming the function, what was expected and what came."""

from __future__ import annotations

import pytest
import torch

from fsyncbn.functional import LocalReducer, batch_norm, init_state, sync_batch_norm


def _identity(t):
    return t


def _state(c=4, **overrides):
    state = init_state(c)
    state.update(overrides)
    return state


X = torch.randn(8, 4, 3, 3)

# (description, kwargs overriding the good call, exception, message regex with {fn})
BAD_INPUTS = [
    ("input not a tensor", {"input": [1.0, 2.0]}, TypeError,
     r"{fn}: expected input to be a torch.Tensor, got list"),
    ("one dim", {"input": torch.randn(5)}, ValueError,
     r"{fn}: expected input of shape \(N, C, \*\) with at least 2 dimensions, got shape \(5,\)"),
    ("no channel", {"input": torch.randn(8, 0, 3), "state": None, "weight": None, "bias": None},
     ValueError, r"{fn}: expected input with at least one channel \(C > 0\), got shape \(8, 0, 3\); "
     r"give it input of shape \(N, C, \*\)"),
    ("integer dtype", {"input": torch.ones(8, 4, dtype=torch.long)}, TypeError,
     r"{fn}: expected a floating-point input, got dtype torch.int64"),
    ("channels vs state", {"input": torch.randn(8, 32, 7, 7), "state": _state(64)}, ValueError,
     r"{fn}: expected input with 64 channels \(from state\['running_mean'\]\), "
     r"got shape \(8, 32, 7, 7\)"),
    ("channels vs weight", {"weight": torch.ones(5)}, ValueError,
     r"{fn}: expected input with 5 channels \(from weight\), got shape \(8, 4, 3, 3\)"),
    ("bias shape", {"bias": torch.zeros(4, 1)}, ValueError,
     r"{fn}: expected bias of shape \(4,\), got shape \(4, 1\)"),
    ("weight not a tensor", {"weight": [1.0] * 4}, TypeError,
     r"{fn}: expected weight to be a torch.Tensor or None, got list"),
    ("running_var shape", {"state": _state(running_var=torch.ones(3))}, ValueError,
     r"{fn}: expected input with 3 channels \(from state\['running_var'\]\), got shape"),
    ("state missing a key", {"state": {"running_mean": torch.zeros(4),
                                       "running_var": torch.ones(4)}}, ValueError,
     r"{fn}: state is missing 'num_batches_tracked'; expected keys running_mean, running_var, "
     r"num_batches_tracked \(see init_state\)"),
    ("state not a dict", {"state": (torch.zeros(4), torch.ones(4))}, TypeError,
     r"{fn}: expected state to be a dict with keys running_mean, running_var, "
     r"num_batches_tracked \(see init_state\) or None, got tuple"),
    ("momentum above 1", {"momentum": 1.5}, ValueError,
     r"{fn}: expected momentum in \[0, 1\] or None, got 1.5"),
    ("momentum below 0", {"momentum": -0.1}, ValueError,
     r"{fn}: expected momentum in \[0, 1\] or None, got -0.1"),
    ("momentum a string", {"momentum": "0.1"}, TypeError,
     r"{fn}: expected momentum to be a float or None, got '0.1'"),
    ("negative eps", {"eps": -1e-5}, ValueError, r"{fn}: expected eps >= 0, got -1e-05"),
    ("zero eps in training", {"eps": 0.0}, ValueError,
     r"{fn}: expected eps > 0 when normalising with batch statistics, got 0.0"),
    ("nan eps", {"eps": float("nan")}, ValueError, r"{fn}: expected eps >= 0, got nan"),
    ("unknown eps_mode", {"eps_mode": "max"}, ValueError,
     r"{fn}: expected eps_mode 'plus' or 'clamp', got 'max'"),
    ("training not a bool", {"training": "yes"}, TypeError,
     r"{fn}: expected training to be a bool, got 'yes'"),
    ("reducer not callable", {"reducer": 3}, TypeError,
     r"{fn}: expected reducer to be a callable reducer\(t\) -> sum of t over all participants, "
     r"got int"),
    ("reducer a class, not an instance", {"reducer": LocalReducer}, TypeError,
     r"{fn}: expected reducer to be a reducer instance, got the class LocalReducer; "
     r"pass LocalReducer\(\) instead"),
    ("reducer returns the wrong shape", {"reducer": lambda t: t[:3]}, ValueError,
     r"{fn}: the reducer must return a tensor shaped like its argument \(12,\), got \(3,\)"),
]


@pytest.mark.parametrize("op", [batch_norm, sync_batch_norm], ids=lambda f: f.__name__)
@pytest.mark.parametrize(("kwargs", "exc", "message"),
                         [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input(op, kwargs, exc, message):
    call = {"input": X, "state": _state(), "weight": None, "bias": None, "training": True,
            "reducer": _identity}
    call.update(kwargs)
    with pytest.raises(exc, match=message.format(fn=op.__name__)):
        op(call.pop("input"), call.pop("state"), call.pop("weight"), call.pop("bias"), **call)


def test_sync_batch_norm_requires_a_reducer():
    with pytest.raises(TypeError, match=r"sync_batch_norm: expected a reducer \(a callable "
                                        r"reducer\(t\) -> sum of t over all participants"):
        sync_batch_norm(X, _state(), reducer=None)


def test_batch_norm_requires_training_keyword():
    with pytest.raises(TypeError, match="training"):
        batch_norm(X, _state())  # type: ignore[call-arg]
