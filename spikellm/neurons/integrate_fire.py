"""Integrate-and-fire rate coding, the baseline spike encoder (DESIGN.md §3.1)."""
from __future__ import annotations

from torch import Tensor

from spikellm.neurons.rate_functional import if_spike_train
from spikellm.neurons.uniform import UniformCountEncoder


class IFEncoder(UniformCountEncoder):
    """IF rate code: count ``n`` fired as ``|n|`` binary spikes spread over ``T`` steps.

    Collapsed form ``n = clamp(round_half_away(x / Δ), lo, hi)``. Temporal form: the classic
    soft-reset IF neuron (SpikingJelly ``IFNode(v_reset=None)``) driven by the constant current
    ``n / T`` of a threshold, i.e. integer current ``|n|`` against threshold ``T``, which fires
    exactly ``|n|`` spikes (:func:`~spikellm.neurons.rate_functional.if_spike_train`). Driving
    it with ``x / (Δ T)`` and an initial membrane of half a threshold gives the same count in exact
    arithmetic (ANN-SNN conversion, Bu et al., ICLR 2022), but float rounding of the running
    membrane can flip near-ties; quantizing the current first keeps both forms equal bit for bit.

    Args:
        bits: b in [1, 16] unsigned (counts ``0..2^b-1``, ``T = 2^b - 1``, spikes {0, 1}) or in
            [2, 16] signed (counts ``±(2^(b-1)-1)``, ``T = 2^(b-1) - 1``, spikes {-1, 0, 1}).
        gamma: per-token clipping quantile of ``|x|`` (signed) or of ``relu(x)`` (unsigned), in (0, 1].
        signed: two IF neurons per activation, a positive and a negative channel. Unsigned drops
            negative activations to 0, so LLaMA projections (signed inputs) need ``signed=True``.
    """

    def steps_for(self, max_abs_count: int) -> int:
        return max_abs_count  # one binary spike per step

    def steps_used(self, max_abs_count: int) -> int:
        # spikes are spread evenly over the window, so any non-zero count fires in the last step
        return self.num_steps if max_abs_count > 0 else 0

    def train_from(self, x: Tensor, step: Tensor, low, high) -> Tensor:
        return if_spike_train(self.counts(x, step, low, high), self.num_steps)
