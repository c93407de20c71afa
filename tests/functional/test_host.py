"""The helpers every room may call take shapes and strides, never the batch: checked against
torch's own tensor methods."""

from __future__ import annotations

import itertools

import pytest
import torch

from fsyncbn.functional.host import channels_innermost, stats_dtype, values_per_channel


def _torch_says_channels_innermost(t: torch.Tensor) -> bool:
    if t.dim() == 2:
        return True
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return layout is not None and t.is_contiguous(memory_format=layout)


def _tensors():
    """Every layout over small sizes (1s included, whose strides are free), views too."""
    for shape in itertools.product([1, 2, 3], [1, 3], [1, 2, 4], [1, 3]):
        for layout in (torch.contiguous_format, torch.channels_last):
            t = torch.randn(shape).contiguous(memory_format=layout)
            yield t
            yield t.transpose(2, 3)
            if shape[2] > 1:
                yield t[:, :, ::2]
    for shape in itertools.product([1, 2], [1, 3], [1, 2], [1, 2], [1, 3]):
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            yield torch.randn(shape).contiguous(memory_format=layout)
    yield torch.randn(5, 3)
    yield torch.randn(5, 3, 4)
    yield torch.randn(5, 3, 4).transpose(1, 2)


def test_channels_innermost_is_torchs_channels_last_test():
    tensors = list(_tensors())
    assert len(tensors) > 200
    for t in tensors:
        assert channels_innermost(t.shape, t.stride()) == _torch_says_channels_innermost(t), (
            tuple(t.shape), t.stride())


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 1, 4, 5), (0, 3, 2)])
def test_values_per_channel_is_numel_over_channels(shape):
    assert values_per_channel(torch.Size(shape)) == torch.empty(shape).numel() // shape[1]


def test_statistics_dtype():
    assert stats_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert stats_dtype(dtype) == torch.float32
