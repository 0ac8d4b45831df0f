"""Bidirectional ternary spikes (SDLLM, arXiv 2604.16475; DESIGN.md §3.2)."""
from __future__ import annotations

from torch import Tensor

from spikellm.checks import check_float, check_int
from spikellm.neurons.base import SpikeEncoder
from spikellm.neurons.functional import symmetric_step, ternary_counts, ternary_spike_train


class TernaryEncoder(SpikeEncoder):
    """Symmetric integer counts ``-c..c`` fired as a train of {-1, 0, +1} spikes.

    Args:
        bits: b; the step maps the per-token clipping bound onto ``Q = 2^(b-1) - 1`` counts, and
            the train needs ``T = Q`` steps, half of an unsigned rate code of the same bits.
        gamma: quantile of ``|x|`` per token that sets the clipping bound (1 = absmax).
        clip: membrane-potential clipping ``c < Q`` (``|n| <= c``, ``T = c``); ``None`` for none.
            The step stays that of Q, so clipping trades the rare large counts for a short train.
    """

    def __init__(self, bits: int = 4, gamma: float = 1.0, clip: int | None = None):
        super().__init__()
        self.bits = check_int("bits", bits, 2, 16)
        self.gamma = check_float("gamma", gamma, 0.0, 1.0, low_open=True)
        self.levels = 2 ** (self.bits - 1) - 1
        self.clip = None if clip is None else check_int("clip", clip, 1, self.levels)
        self.max_count = self.clip if self.clip is not None else self.levels
        self.min_count = -self.max_count

    @property
    def num_steps(self) -> int:
        return self.max_count

    def step_size(self, x: Tensor) -> Tensor:
        return symmetric_step(x, self.levels, self.gamma)

    def counts(self, x: Tensor, step: Tensor) -> Tensor:
        return ternary_counts(x, step, self.max_count)

    def train_from(self, x: Tensor, step: Tensor) -> Tensor:
        return ternary_spike_train(x, step, self.num_steps)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, gamma={self.gamma}, clip={self.clip}, T={self.num_steps}"
