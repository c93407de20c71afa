"""The wire format: what one batch-norm layer sends through its reducer, in one place.

Forward, one float64 message per participant, summed element-wise by the reducer::

    [participants, C, C*C, n,  n*mean (C values),  M2 + n*mean^2 (C values)]
     \\_ agreement header _/  \\ count

- ``participants, C, C*C``: the agreement header of the channel count (see
  :mod:`.agreement`): summed, it tells every participant whether all had the same C.
- ``n``: this participant's values per channel (N times the spatial size); summed, the global
  count. An empty participant sends ``n = 0`` and zero sums.
- ``n*mean`` and ``M2 + n*mean^2``: the moments as float64 sums, merged by the one sum (see
  :mod:`.moments` for the numerics).

Backward, one message in the statistics dtype (float32, or float64 for float64 input)::

    [sum dy (C values),  sum dy * (x - mean) (C values)]

with the global mean. Every path of every participant sends these same layouts, so paths
interoperate within one sum (a CUDA participant, an empty one on the composed path, a
DataParallel replica). The CUDA path's kernels take the offsets below as compile-time
constants.
"""

from __future__ import annotations

from .agreement import HEADER_SIZE as AGREEMENT_SIZE
from .agreement import agreement_header

# Offsets in the forward message.
PARTICIPANTS = 0
CHANNELS = 1
CHANNELS_SQUARED = 2
COUNT = AGREEMENT_SIZE
HEADER_SIZE = AGREEMENT_SIZE + 1  # where the sums start


def forward_size(channels: int) -> int:
    """Numbers in a forward message of ``channels`` channels."""
    return HEADER_SIZE + 2 * channels


def forward_header(channels: int, count: int) -> tuple[float, ...]:
    """The header of a forward message: the agreement header of C, then the count."""
    return (*agreement_header(channels), float(count))
