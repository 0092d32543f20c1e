"""The channel argmax that validation and click windows use: PyTorch's argmax, faster on the CPU."""

import pytest
import torch

from gcml_app.ml.evaluate import channel_argmax


def _random(shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _ties(shape):
    """Logits from {0, 1}: most voxels have two or more channels at the maximum."""
    return torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(1)).float()


@pytest.mark.parametrize("name, logits", [
    ("one channel", _random((1, 4, 5, 6))),
    ("two channels", _random((2, 4, 5, 6))),
    ("three channels, a click window", _random((3, 16, 16, 16))),
    ("ties keep the lower channel", _ties((4, 6, 6, 6))),
    ("all equal", torch.zeros((3, 2, 2, 2))),
    ("bfloat16 logits of a mixed-precision pass", _random((3, 8, 8, 8), torch.bfloat16)),
    ("a strided view (a window cut from a padded output)", _random((3, 12, 12, 12))[:, :7, 2:9, :5]),
])
def test_channel_argmax_is_torch_argmax_as_uint8(name, logits):
    got = channel_argmax(logits)
    assert got.dtype == torch.uint8 and got.shape == logits.shape[1:]
    assert torch.equal(got, logits.argmax(0).to(torch.uint8)), name


def test_the_docstring_example():
    assert channel_argmax(torch.tensor([[0.0, 2.0, 1.0], [1.0, 2.0, 0.0]])).tolist() == [1, 0, 0]
