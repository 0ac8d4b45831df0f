"""Generalized integrate-and-fire: multi-level spikes (SpikeLLM, arXiv 2407.04752; DESIGN.md §3.3)."""
from __future__ import annotations

from torch import Tensor

from spikellm.checks import check_int
from spikellm.errors import ConfigError
from spikellm.neurons.rate_functional import gif_spike_train, gif_spikes_per_count
from spikellm.neurons.uniform import UniformCountEncoder


class GIFEncoder(UniformCountEncoder):
    """GIF neuron: L - 1 binary IF steps merged into one spike of ``log2 L`` bits.

    Same counts as :class:`~spikellm.neurons.IFEncoder`; each GIF step fires ``min(u, L-1)`` and
    subtracts it, over ``T = ceil(n_max / (L-1))`` steps. The ceiling keeps the top count exact:
    the paper's code gives b = 5, L = 16 two steps, which carry at most 2 · 15 = 30, so 31 decodes
    to 30; here T = 3.

    Args:
        bits: b in [1, 16] unsigned (counts ``0..2^b-1``, spikes ``0..L-1``) or in [2, 16] signed
            (counts ``±(2^(b-1)-1)``, spikes ``-(L-1)..L-1``).
        levels: L, spike levels, a power of two in [2, 256]; L = 2 is binary IF with burst firing.
        gamma: per-token clipping quantile of ``|x|`` (signed) or of ``relu(x)`` (unsigned), in (0, 1].
        signed: symmetric counts with signed spikes, for signed inputs such as LLaMA projections.
    """

    def __init__(self, bits: int = 4, levels: int = 4, gamma: float = 1.0, signed: bool = False,
                 learnable_step: bool = False, granularity: str = "token", threshold: str = "bound",
                 threshold_k: float = 1.0):
        super().__init__(bits, gamma, signed, learnable_step, granularity, threshold, threshold_k)
        self.levels = check_int("levels", levels, 2, 256)
        if self.levels & (self.levels - 1):
            raise ConfigError("levels", levels, "must be a power of two in [2, 256]")

    def steps_for(self, max_abs_count: int) -> int:
        return -(-max_abs_count // (self.levels - 1))  # ceil

    def train_from(self, x: Tensor, step: Tensor, low, high) -> Tensor:
        return gif_spike_train(self.counts(x, step, low, high), self.levels, self.num_steps)

    def spikes_per_count(self, counts: Tensor) -> Tensor:
        return gif_spikes_per_count(counts, self.levels)

    @property
    def graded(self) -> bool:
        return self.levels > 2  # L = 2 is a binary spike

    def spike_levels(self, counts: Tensor) -> Tensor:
        return counts.abs()  # a spike of level k carries k of the count

    def spike_proxy(self, scaled_magnitude: Tensor) -> Tensor:
        return scaled_magnitude / (self.levels - 1)  # ceil(|n| / (L-1)) without the steps

    @property
    def spike_proxy_slope(self) -> float:
        return 1.0 / (self.levels - 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={self.levels}"
