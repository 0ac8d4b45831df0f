"""Bit-plane (bitwise) spike coding, MSB first (DESIGN.md §3.4)."""
from __future__ import annotations

import torch
from torch import Tensor

from spikellm.neurons.rate_functional import bitplane_spike_train, bitplane_weights, popcount
from spikellm.neurons.uniform import UniformCountEncoder


class BitPlaneEncoder(UniformCountEncoder):
    """The binary digits of the count, one plane per step, decoded with weights ``2^(T-1-t)``.

    Same counts as :class:`~spikellm.neurons.IFEncoder` in ``T = log2(n_max + 1)`` steps instead
    of ``n_max``, at the price of weighted time steps; an activation fires ``popcount(|n|)`` spikes.

    Args:
        bits: b in [1, 16] unsigned (counts ``0..2^b-1``, ``T = b``, spikes {0, 1}) or in [2, 16]
            signed (counts ``±(2^(b-1)-1)``, ``T = b - 1`` magnitude planes, spikes {-1, 0, 1}).
        gamma: per-token clipping quantile of ``|x|`` (signed) or of ``relu(x)`` (unsigned), in (0, 1].
        signed: spikes carry the sign of the count, for signed inputs such as LLaMA projections.
    """

    def steps_for(self, max_abs_count: int) -> int:
        return int(max_abs_count).bit_length()  # MSB-first planes: leading empty planes are skipped

    def train_from(self, x: Tensor, step: Tensor, low, high) -> Tensor:
        return bitplane_spike_train(self.counts(x, step, low, high), self.num_steps)

    def time_weights(self) -> Tensor:
        return bitplane_weights(self.num_steps)

    def spikes_per_count(self, counts: Tensor) -> Tensor:
        return popcount(counts, bits=self.num_steps)  # |n| < 2^T: the planes are its binary digits

    def spike_proxy(self, scaled_magnitude: Tensor) -> Tensor:
        # popcount of |n| averages about half its bit length, log2(|n| + 1) / 2, and grows with it
        return torch.log2(1 + scaled_magnitude) / 2
