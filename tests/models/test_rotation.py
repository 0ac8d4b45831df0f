"""Hadamard rotation: orthonormal, exact in the layer's output, folded into weights once."""
import math

import pytest
import torch

from spikellm.errors import ConfigError
from spikellm.neurons import TernaryEncoder
from spikellm.nn import SpikingLinear
from spikellm.ops.hadamard import hadamard_transform


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


@pytest.mark.parametrize("width,block", [(16, 16), (24, 8), (6, 2), (704, 64)])
def test_transform_is_the_block_diagonal_hadamard(width, block):
    x = torch.randn(3, 5, width, dtype=torch.float64)
    expected = x @ torch.block_diag(*[sylvester(block).double()] * (width // block))
    torch.testing.assert_close(hadamard_transform(x), expected)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x)), x)  # H is its own inverse


def test_odd_width_cannot_rotate():
    with pytest.raises(ConfigError, match="rotate=True is invalid: needs an even layer width, got 15"):
        SpikingLinear(15, 4, rotate=True)


def test_rotation_leaves_output_unchanged_and_tames_outliers():
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    x[:, 5] *= 40  # one outlier channel, as in LLM activations
    plain = SpikingLinear(64, 16)
    rotated = SpikingLinear(64, 16, rotate=True)
    rotated.load_state_dict(plain.state_dict())
    torch.testing.assert_close(rotated(x), plain(x), rtol=1e-5, atol=1e-4)
    errors = {}
    for rotate in (False, True):
        layer = SpikingLinear(64, 16, encoder=TernaryEncoder(bits=4), rotate=rotate)
        layer.load_state_dict(plain.state_dict())
        errors[rotate] = (layer(x) - plain(x)).pow(2).mean().item()
        torch.testing.assert_close(layer.forward_temporal(x), layer(x), rtol=1e-5, atol=1e-4)
    assert errors[True] < errors[False] / 4


def test_fold_rotation_once_and_reload():
    torch.manual_seed(1)
    layer = SpikingLinear(32, 8, encoder=TernaryEncoder(bits=5), rotate=True)
    x = torch.randn(4, 32)
    before = layer(x)
    layer.fold_rotation()
    layer.fold_rotation()  # idempotent
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    reloaded = SpikingLinear(32, 8, encoder=TernaryEncoder(bits=5), rotate=True)
    reloaded.load_state_dict(layer.state_dict())
    torch.testing.assert_close(reloaded(x), before, rtol=1e-5, atol=1e-5)
