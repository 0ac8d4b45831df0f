"""The collapsed form shared by the IF, GIF and bit-plane encoders."""
from __future__ import annotations

from spikellm.checks import check_bool, check_float, check_int
from spikellm.neurons.base import SpikeEncoder, threshold_repr
from spikellm.neurons.rate_functional import count_limit


class UniformCountEncoder(SpikeEncoder):
    """Counts ``0..2^b-1`` (unsigned) or ``±(2^(b-1)-1)`` (signed) on a per-token step; the
    subclasses differ only in how a count is fired over time (``num_steps``, ``train_from``).

    Args:
        bits: b in [1, 16] unsigned or in [2, 16] signed.
        gamma: per-token clipping quantile of ``|x|`` (signed) or of ``relu(x)`` (unsigned), in (0, 1].
        signed: symmetric counts and signed spikes. Unsigned drops negative activations to 0, so
            LLaMA projections (signed inputs) need ``signed=True``.
        learnable_step: learn a scale of the step with LSQ (see :class:`SpikeEncoder`).
        granularity: ``token`` (a step per token) or ``channel`` (a causal step per channel).
        threshold: ``bound`` (the γ-quantile bound maps onto the top count) or ``mean``
            (``Δ = mean(|x|) / threshold_k`` per token, SpikingBrain's adaptive threshold).
        threshold_k: k of the ``mean`` rule.
    """

    def __init__(self, bits: int = 4, gamma: float = 1.0, signed: bool = False, learnable_step: bool = False,
                 granularity: str = "token", threshold: str = "bound", threshold_k: float = 1.0):
        super().__init__(learnable_step, granularity, threshold, threshold_k)
        self.signed = check_bool("signed", signed)
        self.bits = check_int("bits", bits, 2 if self.signed else 1, 16)
        self.gamma = check_float("gamma", gamma, 0.0, 1.0, low_open=True)
        self._check_threshold_options()
        self.max_count = count_limit(self.bits, self.signed)
        self.min_count = -self.max_count if self.signed else 0
        self.step_levels = self.max_count

    @property
    def keeps_full_range(self) -> bool:
        return self.signed  # unsigned codes clip every negative activation to 0

    def extra_repr(self) -> str:
        return f"bits={self.bits}, gamma={self.gamma}, signed={self.signed}, {threshold_repr(self)}T={self.num_steps}"
