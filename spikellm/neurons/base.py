"""The contract every spike encoder implements (docs/encoders.md shows a new one end to end).

An encoder maps activations ``x`` to integer spike counts ``n`` and a step (threshold) ``Δ`` with
``x ≈ n · Δ``, in two exact forms (DESIGN.md §2): :meth:`~SpikeEncoder.encode`, the collapsed form
(counts in one pass, what training runs), and :meth:`~SpikeEncoder.spike_train`, the temporal form
(the ``[T, ...]`` train a chip would see, ``decode(train) == counts``). A new encoder sets
``min_count``, ``max_count``, ``step_levels``, ``gamma`` and defines :meth:`steps_for` and
:meth:`train_from`; its spike accounting (:meth:`spikes_per_count`) when a count is not ``|n|`` spikes.

Shared by every encoder and implemented once: the threshold rule (the γ-quantile bound onto the
top count, or SpikingBrain's ``mean(|x|) / k``), a learnable step (LSQ), per-channel step
allocation (Optimal Brain Spiking). The math is in :mod:`~spikellm.neurons.functional`, the choice
of fast path in :mod:`~spikellm.neurons.dispatch`, what watches a forward (statistics, the energy
counter's tally, a spike objective) in :mod:`~spikellm.neurons.observers`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from spikellm.checks import check_bool, check_float
from spikellm.errors import ConfigError
from spikellm.neurons import dispatch
from spikellm.neurons.allocation import ChannelAllocation
from spikellm.neurons.functional import check_threshold_options, dynamic_step
from spikellm.ops.rounding import quantize_counts

GRANULARITIES = ("token", "channel")
THRESHOLDS = ("bound", "mean")
# what an encoder keeps between forwards, derived from its attributes and dropped when one is set
_CACHED = ("_settings", "_fused", "_fused_channels")


class SpikeEncoder(ChannelAllocation, ABC):
    """Base class of activation spike encoders (see the module docstring for the contract)."""

    #: lowest and highest count of a channel with no extra steps allocated
    min_count: int
    max_count: int
    #: counts the clipping bound is mapped onto (Δ = bound / step_levels), and the quantile γ
    step_levels: int
    gamma: float
    #: the collapsed form defined here is what the fused encoders compute (see dispatch.counts_reason)
    fused_overrides = dispatch.COLLAPSED_FORM

    def __init__(self, learnable_step: bool = False, granularity: str = "token", threshold: str = "bound",
                 threshold_k: float = 1.0):
        super().__init__()
        self.learnable_step = check_bool("learnable_step", learnable_step)
        if granularity not in GRANULARITIES:
            raise ConfigError("granularity", granularity, "must be one of: " + ", ".join(GRANULARITIES))
        self.granularity = granularity
        if threshold not in THRESHOLDS:
            raise ConfigError("threshold", threshold, "must be one of: " + ", ".join(THRESHOLDS))
        self.threshold = threshold
        self.threshold_k = check_float("threshold_k", threshold_k, 0.0, 1e6, low_open=True)
        self.step_scale = nn.Parameter(torch.ones(())) if self.learnable_step else None
        self.dead_zone = 0.0  # inputs below dead_zone·Δ count zero (above 1/2: more zeros than rounding)
        self.keep_top = 1.0  # the fraction of each token's inputs kept, the largest |x| (Q-Sparse's top-k)
        self.observers = []  # what watches the forwards (spikellm.neurons.observers)

    def __setattr__(self, name, value):
        # any change of the encoder may change its settings and whether the fused encoder computes it
        for cached in _CACHED:
            self.__dict__.pop(cached, None)
        super().__setattr__(name, value)

    def __getstate__(self):
        # a copy or a pickle computes its own (a cached plan may hold functions bound to this encoder)
        return {name: value for name, value in super().__getstate__().items() if name not in _CACHED}

    def settings(self) -> str:
        """The settings :meth:`extra_repr` shows, kept until an attribute is set: layers compare
        them on every forward to know whether they can share one spike train."""
        settings = self.__dict__.get("_settings")
        if settings is None:
            settings = self.__dict__["_settings"] = self.extra_repr()
        return settings

    def _check_threshold_options(self) -> None:
        """Called by subclasses once ``gamma`` is set."""
        check_threshold_options(self.granularity, self.threshold, self.gamma)

    # ---- what an encoder defines ----------------------------------------------------------
    @abstractmethod
    def steps_for(self, max_abs_count: int) -> int:
        """Time steps the temporal form needs to fire a count of this magnitude."""

    @abstractmethod
    def train_from(self, x: Tensor, step: Tensor, low, high) -> Tensor:
        """Temporal form: simulate the neuron, ``[T, *x.shape]`` fp32 spikes decoding into ``[low, high]``."""

    def counts(self, x: Tensor, step: Tensor, low, high) -> Tensor:
        """Collapsed form: integer-valued fp32 counts ``clamp(round_half_away(x / Δ), low, high)``."""
        return quantize_counts(x, step, low, high)

    def magnitude(self, x: Tensor) -> Tensor:
        """What the step is taken of, fp32: ``|x|``, or ``relu(x)`` for unsigned codes (``min_count = 0``)."""
        return x.float().abs() if self.min_count < 0 else x.float().clamp_min(0)

    def spikes_per_count(self, counts: Tensor) -> Tensor:
        """Non-zero spikes each activation emits, in closed form (binary and ternary codes: ``|n|``)."""
        return counts.abs()

    def spike_levels(self, counts: Tensor) -> Tensor:
        """Summed magnitudes of each activation's spikes (a graded spike of level k counts k); an
        encoder that overrides it is :attr:`graded`."""
        return self.spikes_per_count(counts)

    @property
    def graded(self) -> bool:
        """Whether a spike can carry a level above 1 (priced by the cost model's ``graded_spike``)."""
        return False

    def spike_proxy(self, scaled_magnitude: Tensor) -> Tensor:
        """A smooth, increasing stand-in for :meth:`spikes_per_count` of ``|x| / Δ``: the gradient a
        spike objective follows."""
        return scaled_magnitude

    @property
    def spike_proxy_slope(self) -> float | None:
        """``c`` when :meth:`spike_proxy` is ``c · |x| / Δ`` (a spike term then sums per token first)."""
        return 1.0 if type(self).spike_proxy is SpikeEncoder.spike_proxy else None

    def time_weights(self) -> Tensor:
        """Weight of each time step when decoding a train (all ones for rate codes)."""
        return torch.ones(self.num_steps)

    def steps_used(self, max_abs_count: int) -> int:
        """Steps after which every neuron of a tensor whose largest count is given has gone quiet."""
        return self.steps_for(max_abs_count)

    outlier_stream = False  #: whether :meth:`outlier_counts` sends clipped residuals beside the train

    def outlier_counts(self, x: Tensor, step: Tensor, counts: Tensor) -> Tensor | None:
        """Counts sent beside the train as a sparse stream (clipped residuals), or None."""
        return None

    def window_bounds(self):
        """``(low, high)`` counts of the straight-through and LSQ gradients' clipping window."""
        return self.count_bounds()

    def surrogate_value(self, x: Tensor) -> Tensor | None:
        """``Δ · decode(train)`` differentiable through the simulated neuron (surrogate gradients), or None."""
        return None

    @property
    def keeps_full_range(self) -> bool:
        """Whether every activation fits the count range when the bound is the maximum (γ = 1)."""
        return True

    # ---- derived, shared by every encoder -------------------------------------------------
    def _step_of(self, magnitude: Tensor) -> Tensor:
        return dynamic_step(magnitude, self.threshold, self.threshold_k, self.granularity, self.gamma,
                            self.step_levels)

    def step_size(self, x: Tensor) -> Tensor:
        """The dynamic step Δ (fp32): per token ``[..., 1]``, or per channel ``[..., T, C]`` (causal)."""
        return self._step_of(self.magnitude(x.detach()))

    def token_step(self, x: Tensor) -> Tensor:
        """The dynamic step times the learned scale (LSQ), before any channel allocation."""
        step = self.step_size(x)
        return step if self.step_scale is None else step * self.step_scale.detach().abs().clamp_min(1e-4)

    def element_step(self, x: Tensor) -> Tensor:
        """Δ of every element: :meth:`token_step` over the channel's step multiplier; with separate
        clusters the allocated channels and the others each take the token's bound among themselves."""
        step = self.token_step(x)
        if self.channel_scale is None:
            return step
        if self.clusters_apart and self.granularity == "token":
            salient = self.channel_scale > 1
            if bool(salient.any()) and not bool(salient.all()):
                step = torch.where(salient, self.token_step(x[..., salient]), self.token_step(x[..., ~salient]))
        return step / self.channel_scale

    @property
    def num_steps(self) -> int:
        """T: time steps of the temporal form (those of the channels with the most steps)."""
        return self.steps_for(self.largest_count)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        for cached in _CACHED:  # a loaded allocation changes the settings shown (T)
            self.__dict__.pop(cached, None)

    def inside_window(self, x: Tensor, step: Tensor) -> Tensor:
        """Where the gradient passes: ``low <= x/Δ <= high`` on the window's bounds (as LSQ clips)."""
        scaled = x.detach().float() / step
        low, high = self.window_bounds()
        return (scaled >= low) & (scaled <= high)

    # ---- the public forms -----------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Collapsed form: ``(counts, step)``, ``step`` broadcastable against ``x``."""
        if torch.is_grad_enabled():  # a no-grad context costs microseconds a one-token decode step feels
            with torch.no_grad():
                return self.encode(x)
        step = self.element_step(x)
        return self.counts(self._zeroed(x, step), step, *self.count_bounds()), step

    @torch.no_grad()
    def spike_train(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Temporal form: ``(spikes [T, *x.shape], step)``."""
        step = self.element_step(x)
        return self.train_from(self._zeroed(x, step), step, *self.count_bounds()), step

    def _zeroed(self, x: Tensor, step: Tensor) -> Tensor:
        # the same zeros for both forms: they encode the input with the small inputs cleared
        if self.keep_top < 1.0:  # ties at the k-th largest |x| are kept
            top = max(1, round(self.keep_top * x.shape[-1]))
            magnitude = x.float().abs()
            x = x.masked_fill(magnitude < magnitude.topk(top, dim=-1).values[..., -1:], 0)
        if self.dead_zone <= 0.5:  # rounding already zeroes |x| < Δ/2
            return x
        return x.masked_fill(x.float().abs() < self.dead_zone * step, 0)

    def decode(self, spikes: Tensor) -> Tensor:
        """Counts carried by a train: ``Σ_t w_t · s_t``."""
        weights = self.time_weights().to(spikes).view(-1, *([1] * (spikes.dim() - 1)))
        return (spikes * weights).sum(0)

    def forward(self, x: Tensor, siblings: tuple["SpikeEncoder", ...] = ()) -> Tensor:
        """``n · Δ`` in ``x.dtype``; the gradient passes straight through inside the clipping window
        (and reaches a learnable step by the LSQ rule). ``siblings``: encoders of other layers that
        receive this same train, whose observers see it too."""
        return dispatch.forward(self, x, siblings)

    def encode_continued(self, x: Tensor, previous: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(n · Δ, bound)`` of new tokens ``x [..., T, C]`` of a per-channel (causal) code whose
        running bound over the earlier tokens is ``previous [..., 1, C]`` (None: none), and the bound
        to carry on: what a cached decoding step needs (the bound is a maximum: continuing it is exact)."""
        return dispatch.continued(self, x, previous)


def threshold_repr(encoder: SpikeEncoder) -> str:
    """``threshold=mean, threshold_k=…, `` for the mean rule and ``dead_zone=…, `` where one is set;
    nothing for the default bound rule."""
    rule = "" if encoder.threshold == "bound" else f"threshold=mean, threshold_k={encoder.threshold_k}, "
    return (rule + (f"dead_zone={encoder.dead_zone}, " if encoder.dead_zone > 0.5 else "")
            + (f"keep_top={encoder.keep_top}, " if encoder.keep_top < 1.0 else ""))
