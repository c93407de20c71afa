"""What participants must agree on, and the error when they do not.

A sum over participants cannot tell that they sent different things, unless each also sends
``[1, v, v*v]`` for the value ``v`` they must agree on: the sums ``(W, sum v, sum v^2)`` equal
``(W, W*v, W*v^2)`` only if every participant has the same ``v`` (equal first and second
moments leave no spread). fsyncbn sends this header with the channel count C (inside each
batch-norm message), with a message's size (the reducers' size probe) and with a layer's
tag (the reducers' step check).
"""

from __future__ import annotations

from collections.abc import Sequence

HEADER_SIZE = 3


class SynchronizationError(RuntimeError):
    """Participants could not complete a sum: one raised, died, hung past its timeout, skipped
    or added a call, or sent something the others did not (another channel count, message
    size or layer). Raised in every participant that can tell, naming the layer.
    """


def agreement_header(value: float) -> tuple[float, float, float]:
    """``(1, value, value**2)``: summed over participants, it tells whether all sent ``value``."""
    return (1.0, float(value), float(value) * float(value))


def disagreement(summed: Sequence[float], value: float) -> float | None:
    """The participants' average of ``value`` if they did not all send ``value``, else None.

    Args:
        summed: the sum over participants of their :func:`agreement_header`.
        value: what this participant sent.
    """
    participants, total, total_square = summed
    if total == participants * value and total_square == participants * value * value:
        return None
    return total / participants
