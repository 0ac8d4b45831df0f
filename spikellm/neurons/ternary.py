"""Bidirectional ternary spikes (SDLLM, arXiv 2604.16475; DESIGN.md §3.2)."""
from __future__ import annotations

from torch import Tensor

from spikellm.checks import check_float, check_int
from spikellm.errors import ConfigError
from spikellm.neurons.base import SpikeEncoder, threshold_repr
from spikellm.neurons.functional import ternary_spike_train, ternary_surrogate_value
from spikellm.ops.rounding import quantize_counts

RESIDUALS = ("drop", "outlier")


class TernaryEncoder(SpikeEncoder):
    """Symmetric integer counts ``-c..c`` fired as a train of {-1, 0, +1} spikes.

    Args:
        bits: b; the step maps the per-token clipping bound onto ``Q = 2^(b-1) - 1`` counts, and
            the train needs ``T = Q`` steps, half of an unsigned rate code of the same bits.
        gamma: quantile of ``|x|`` per token that sets the clipping bound (1 = absmax).
        clip: membrane-potential clipping ``c < Q`` (``|n| <= c``, ``T = c``); ``None`` for none.
            The step stays that of Q, so clipping trades the rare large counts for a short train.
        residual: what happens to the count beyond ``±c``: ``drop`` it, or carry it as a sparse
            ``outlier`` stream (integer counts sent beside the train, see :meth:`outlier_counts`),
            so the value is that of the unclipped ``±Q`` quantizer while the train stays c long.
        learnable_step: learn a scale of the step with LSQ (see :class:`SpikeEncoder`).
        granularity: ``token`` (a step per token) or ``channel`` (a causal step per channel, for
            attention keys).
        threshold: ``bound`` (the γ-quantile bound maps onto Q) or ``mean`` (``Δ = mean(|x|) /
            threshold_k`` per token, SpikingBrain's adaptive threshold; about ``threshold_k``
            spikes per activation).
        threshold_k: k of the ``mean`` rule.
        dead_zone: inputs with ``|x| < dead_zone · Δ`` count zero; at most 1/2 is plain rounding, above
            it small activations fire nothing (fewer non-zero inputs, so fewer weight rows read).
        keep_top: the fraction of each token's inputs that may fire, those of largest ``|x|`` (the
            per-token top-k of Q-Sparse); 1 keeps them all.
    """

    def __init__(self, bits: int = 4, gamma: float = 1.0, clip: int | None = None, residual: str = "drop",
                 learnable_step: bool = False, granularity: str = "token", threshold: str = "bound",
                 threshold_k: float = 1.0, dead_zone: float = 0.0, keep_top: float = 1.0):
        super().__init__(learnable_step, granularity, threshold, threshold_k)
        self.dead_zone = check_float("dead_zone", dead_zone, 0.0, 16.0)
        self.keep_top = check_float("keep_top", keep_top, 0.0, 1.0, low_open=True)
        self.bits = check_int("bits", bits, 2, 16)
        self.gamma = check_float("gamma", gamma, 0.0, 1.0, low_open=True)
        self._check_threshold_options()
        self.step_levels = 2 ** (self.bits - 1) - 1  # Q: the count the bound maps onto
        self.clip = None if clip is None else check_int("clip", clip, 1, self.step_levels)
        if residual not in RESIDUALS:
            raise ConfigError("residual", residual, "must be one of: " + ", ".join(RESIDUALS))
        self.residual = residual
        self.max_count = self.clip if self.clip is not None else self.step_levels
        self.min_count = -self.max_count

    def steps_for(self, max_abs_count: int) -> int:
        return max_abs_count  # one ±1 spike per step

    def train_from(self, x: Tensor, step: Tensor, low, high) -> Tensor:
        return ternary_spike_train(x, step, self.num_steps, limit=high)

    @property
    def keeps_full_range(self) -> bool:
        return self.clip is None or self.residual == "outlier"

    @property
    def outlier_stream(self) -> bool:
        return self.residual == "outlier" and self.clip is not None

    def surrogate_value(self, x: Tensor) -> Tensor:
        step = self.element_step(x).detach()
        return ternary_surrogate_value(x, step, self.num_steps, limit=self.count_bounds()[1])

    def outlier_counts(self, x: Tensor, step: Tensor, counts: Tensor) -> Tensor | None:
        if not self.outlier_stream:
            return None
        scale = 1 if self.channel_scale is None else self.channel_scale
        return quantize_counts(x, step, -self.step_levels * scale, self.step_levels * scale) - counts

    fused_overrides = ("outlier_counts",)  # None unless outlier_stream, which dispatch.counts_reason names

    def window_bounds(self):
        if not self.outlier_stream:
            return self.count_bounds()
        scale = 1 if self.channel_scale is None else self.channel_scale
        return -self.step_levels * scale, self.step_levels * scale

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, gamma={self.gamma}, clip={self.clip}, residual={self.residual}, "
                f"{threshold_repr(self)}T={self.num_steps}")
