"""Orthonormal Hadamard rotations, applied in O(n log n) by the fast Walsh–Hadamard transform.

Rotating a linear layer's input by an orthonormal H and its weight by the same H leaves the
output unchanged, ``(x H)(W H)ᵀ = x Wᵀ``, but spreads activation outliers over all channels, so a
per-token step wastes fewer counts on them (SDLLM; QuaRot). Widths that are not a power of two use
a block-diagonal H whose blocks are the largest power of two dividing the width.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from spikellm.errors import ConfigError


def hadamard_block(width: int) -> int:
    """Block size of the block-diagonal Hadamard for ``width``: its largest power-of-two divisor."""
    block = width & -width
    if block < 2:
        raise ConfigError("rotate", True, f"needs an even layer width, got {width}")
    return block


def hadamard_transform(x: Tensor) -> Tensor:
    """``x @ H`` over the last dim, H block-diagonal, orthonormal and symmetric (so ``H @ H = I``)."""
    width = x.shape[-1]
    block = hadamard_block(width)
    out = x.reshape(*x.shape[:-1], width // block, block)
    half = 1
    while half < block:
        # butterfly: pairs (i, i + half) within each run of 2·half become (a + b, a - b)
        out = out.reshape(*out.shape[:-1], block // (2 * half), 2, half)
        a, b = out[..., 0, :], out[..., 1, :]
        out = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        half *= 2
    return out.reshape(x.shape) / math.sqrt(block)

