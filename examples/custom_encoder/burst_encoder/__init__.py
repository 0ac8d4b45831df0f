"""A spike encoder defined outside spikellm: the worked example of docs/encoders.md.

``BurstEncoder`` fires a count ``n`` as a burst: ``|n|`` spikes of sign ``sign(n)`` in the first
``|n|`` time steps, then silence (an IF neuron spreads the same spikes evenly). It reuses
spikellm's uniform counts (the collapsed form: ``n = clamp(round(x / Δ))`` on a per-token step),
so it implements only what makes it a different neuron: how many steps a count needs
(``steps_for``) and the spike train (``train_from``). Its decoded train equals its counts exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor

from spikellm.neurons.uniform import UniformCountEncoder


def burst_spike_train(counts: Tensor, num_steps: int) -> Tensor:
    """``[T, *counts.shape]`` in {-1, 0, 1}: ``sign(n)`` at steps ``t < |n|``, 0 after."""
    steps = torch.arange(num_steps, device=counts.device).view(num_steps, *([1] * counts.dim()))
    return (steps < counts.abs()).to(counts.dtype) * counts.sign()


class BurstEncoder(UniformCountEncoder):
    """Burst coding: counts as :class:`~spikellm.neurons.IFEncoder`'s, spikes at the onset.

    Args: those of :class:`~spikellm.neurons.uniform.UniformCountEncoder` (``bits``, ``gamma``,
    ``signed``, ``learnable_step``, ``granularity``, ``threshold``, ``threshold_k``).
    """

    def steps_for(self, max_abs_count: int) -> int:
        return max_abs_count  # one binary spike per step, as many steps as the largest count

    def train_from(self, x: Tensor, step: Tensor, low, high) -> Tensor:
        return burst_spike_train(self.counts(x, step, low, high), self.num_steps)
