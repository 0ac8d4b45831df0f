"""The contract every spike encoder implements.

An encoder maps activations ``x`` to integer spike counts ``n`` and a step (threshold) ``Δ`` with
``x ≈ n · Δ``. It has two exact forms (DESIGN.md §2):

* :meth:`SpikeEncoder.encode` — the collapsed form, counts in one pass; this is what training runs;
* :meth:`SpikeEncoder.spike_train` — the temporal form, the ``[T, ...]`` train a neuromorphic chip
  would see, with ``decode(train) == counts`` exactly.

:meth:`forward` returns ``n · Δ`` with a straight-through gradient, so any module can sit behind an
encoder without knowing which one it is: new encoders plug in without touching the model.

Three options apply to every encoder, implemented once here:

* per-input-channel step allocation (Optimal Brain Spiking): :meth:`allocate_channels` gives the
  chosen channels ``m = 2^addbit`` times the steps, a step ``Δ/m`` and counts up to ``m`` times
  larger; the allocation is a buffer saved with the model;
* a learnable step size (LSQ, Esser et al. 2020): ``learnable_step=True`` multiplies the dynamic
  per-token step by a learned scalar trained with the LSQ gradient; it is also the per-layer
  threshold that a spike objective can push up (:meth:`spike_term`);
* the threshold rule: ``threshold="bound"`` maps a per-token clipping bound (the γ-quantile of
  ``|x|``, γ = 1 the absmax) onto the top count; ``threshold="mean"`` is SpikingBrain's adaptive
  threshold ``Δ = mean(|x|) / k`` per token, which fires about ``k`` spikes per activation whatever
  the distribution's tail (counts beyond the range saturate);
* firing statistics in closed form from the counts (:mod:`spikellm.neurons.stats`), either full
  (histograms, for validation) or as a per-forward :class:`~spikellm.neurons.tally.SpikeTally`
  (the few sums a training step or the operation counter needs).
"""
from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from spikellm.checks import check_bool, check_float, check_int
from spikellm.errors import ConfigError
from spikellm.neurons.functional import causal_channel_bound, learned_step_quantize, quantile_bound
from spikellm.neurons import fused
from spikellm.ops.rounding import quantize_counts, straight_through

GRANULARITIES = ("token", "channel")
# what an encoder keeps between forwards, derived from its attributes and dropped when one is set
_CACHED = ("_settings", "_fused", "_fused_channels")
#: the methods that define an encoder's collapsed form, as the fused encoders compute it
COLLAPSED_FORM = ("counts", "magnitude", "step_size", "_step_of", "token_step", "element_step", "count_bounds",
                  "outlier_counts", "encode", "forward")
THRESHOLDS = ("bound", "mean")


class SpikeEncoder(nn.Module, ABC):
    """Base class of activation spike encoders (see the module docstring for the contract)."""

    #: lowest and highest count of a channel with no extra steps allocated
    min_count: int
    max_count: int
    #: counts the clipping bound is mapped onto (Δ = bound / step_levels), and the quantile γ
    step_levels: int
    gamma: float

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
        self.register_buffer("channel_scale", None)  # [C] step multiplier per input channel, or None
        # set (True) when the allocated channels take their per-token bound among themselves
        self.register_buffer("separate_clusters", None)
        self.stats = None  # a SpikeStats while statistics are tracked
        self.tally = None  # a SpikeTally while a counter or a step needs the spike sums
        self.spike_terms = None  # a list of (differentiable spike count, activations) while a spike objective records

    def __setattr__(self, name, value):
        # any change of the encoder may change its settings and whether the fused encoder computes it
        for cached in _CACHED:
            self.__dict__.pop(cached, None)
        super().__setattr__(name, value)

    def __getstate__(self):
        # a copy or a pickle computes its own (a cached plan may hold functions bound to this encoder)
        return {name: value for name, value in super().__getstate__().items() if name not in _CACHED}

    def settings(self) -> str:
        """The encoder's settings, as :meth:`extra_repr` shows them, kept until an attribute is set:
        layers compare them on every forward to know whether they can share one spike train."""
        settings = self.__dict__.get("_settings")
        if settings is None:
            settings = self.__dict__["_settings"] = self.extra_repr()
        return settings

    def _check_threshold_options(self) -> None:
        """Combinations that would silently do something else: called by subclasses once ``gamma`` is set."""
        if self.granularity == "channel" and (self.gamma < 1.0 or self.threshold != "bound"):
            raise ConfigError("gamma" if self.gamma < 1.0 else "threshold", self.gamma if self.gamma < 1.0 else
                              self.threshold, "granularity=channel takes the causal running max per channel; "
                              "it has no γ-quantile or mean threshold: use gamma=1.0, threshold=bound")
        if self.threshold == "mean" and self.gamma < 1.0:
            raise ConfigError("gamma", self.gamma, "threshold=mean sets Δ = mean(|x|)/threshold_k and has no "
                              "clipping quantile: use gamma=1.0 with it")

    # ---- what an encoder defines ----------------------------------------------------------
    @abstractmethod
    def steps_for(self, max_abs_count: int) -> int:
        """Time steps the temporal form needs to fire a count of this magnitude."""

    def magnitude(self, x: Tensor) -> Tensor:
        """What the step is taken of, fp32: ``|x|``; unsigned codes (``min_count = 0``) never fire
        for negative inputs, so only the positive part sets their range."""
        return x.float().abs() if self.min_count < 0 else x.float().clamp_min(0)

    def step_size(self, x: Tensor) -> Tensor:
        """The dynamic step Δ (fp32): per token ``[..., 1]`` from the γ-quantile of the token (or
        ``mean(|x|)/k``), or per channel ``[..., T, C]`` from the running maximum over the tokens
        so far (``x [..., T, C]``)."""
        return self._step_of(self.magnitude(x.detach()))

    def _step_of(self, magnitude: Tensor) -> Tensor:
        if self.threshold == "mean":
            step = magnitude.mean(dim=-1, keepdim=True).clamp_min_(1e-8)
            return step if self.threshold_k == 1.0 else step / self.threshold_k  # / 1 is exact: skip it
        bound = causal_channel_bound(magnitude) if self.granularity == "channel" else quantile_bound(magnitude, self.gamma)
        return bound.clamp_min(1e-8) / self.step_levels

    def counts(self, x: Tensor, step: Tensor, low, high) -> Tensor:
        """Collapsed form: integer-valued fp32 counts in ``[low, high]`` (ints or tensors); here
        ``clamp(round_half_away(x / Δ), low, high)``, which the fused encoders compute too."""
        return quantize_counts(x, step, low, high)

    @abstractmethod
    def train_from(self, x: Tensor, step: Tensor, low, high) -> Tensor:
        """Temporal form: simulate the neuron, ``[T, *x.shape]`` fp32 spikes decoding into ``[low, high]``."""

    def time_weights(self) -> Tensor:
        """Weight of each time step when decoding a train (all ones for rate codes)."""
        return torch.ones(self.num_steps)

    def spikes_per_count(self, counts: Tensor) -> Tensor:
        """Non-zero spikes each activation emits, in closed form (binary and ternary codes: ``|n|``)."""
        return counts.abs()

    def spike_levels(self, counts: Tensor) -> Tensor:
        """Summed magnitudes of the spikes each activation emits: ``spikes_per_count`` for codes of
        unit spikes; a graded (multi-level) spike of level k counts k."""
        return self.spikes_per_count(counts)

    @property
    def graded(self) -> bool:
        """Whether a spike can carry a level above 1 (multi-level spikes, priced by the cost model's
        ``graded_spike``); binary and ternary codes: no."""
        return False

    def spike_proxy(self, scaled_magnitude: Tensor) -> Tensor:
        """A smooth, increasing stand-in for :meth:`spikes_per_count` as a function of ``|x| / Δ``
        (within the count range): its gradient is what a spike objective follows (``|n|`` for
        binary and ternary codes)."""
        return scaled_magnitude

    @property
    def spike_proxy_slope(self) -> float | None:
        """``c`` when :meth:`spike_proxy` is ``c · |x| / Δ`` (then a spike term sums ``|x|`` per
        token first, the cheap way); None for a nonlinear proxy."""
        return 1.0 if type(self).spike_proxy is SpikeEncoder.spike_proxy else None

    def outlier_counts(self, x: Tensor, step: Tensor, counts: Tensor) -> Tensor | None:
        """Counts sent beside the train as a sparse stream (clipped residuals), or None."""
        return None

    def window_bounds(self):
        """``(low, high)`` of the value the layer receives, in counts: the clipping window of the
        straight-through and LSQ gradients (the count bounds, wider with an outlier stream)."""
        return self.count_bounds()

    def surrogate_value(self, x: Tensor) -> Tensor | None:
        """``Δ · decode(train)`` differentiable through the simulated neuron (surrogate gradients),
        for training unrolled in time; None where the encoder fires from integer counts."""
        return None

    def steps_used(self, max_abs_count: int) -> int:
        """Steps after which every neuron of a tensor whose largest count is given has gone quiet."""
        return self.steps_for(max_abs_count)

    # ---- derived, shared by every encoder -------------------------------------------------
    @property
    def max_scale(self) -> int:
        return 1 if self.channel_scale is None else int(self.channel_scale.max().item())

    @property
    def num_steps(self) -> int:
        """T: time steps of the temporal form (those of the channels with the most steps)."""
        return self.steps_for(self.largest_count)

    def count_bounds(self):
        """``(low, high)`` count bounds: ints, or ``[C]`` tensors once channels are allocated."""
        if self.channel_scale is None:
            return self.min_count, self.max_count
        return self.min_count * self.channel_scale, self.max_count * self.channel_scale

    def token_step(self, x: Tensor) -> Tensor:
        """The dynamic step times the learned scale (LSQ), before any channel allocation."""
        step = self.step_size(x)
        return step if self.step_scale is None else step * self.step_scale.detach().abs().clamp_min(1e-4)

    def element_step(self, x: Tensor) -> Tensor:
        """Δ of every element: :meth:`token_step` over the channel's step multiplier. With
        separate clusters the allocated channels and the others each take the token's bound among
        themselves (SpikeLLM's per-cluster dynamic range), so outlier channels no longer set the
        step of all the others."""
        step = self.token_step(x)
        if self.channel_scale is None:
            return step
        if self.clusters_apart and self.granularity == "token":
            salient = self.channel_scale > 1
            if bool(salient.any()) and not bool(salient.all()):
                step = torch.where(salient, self.token_step(x[..., salient]), self.token_step(x[..., ~salient]))
        return step / self.channel_scale

    @property
    def clusters_apart(self) -> bool:
        """Whether the allocated channels and the others take their per-token bounds apart
        (:meth:`allocate_channels` with ``separate``); read from the buffer, which loading sets."""
        return self.separate_clusters is not None and bool(self.separate_clusters)

    def allocate_channels(self, salient: Tensor, addbit: int, separate: bool = False) -> None:
        """Give the channels where ``salient`` ([C] bool) is set ``2^addbit`` times the steps;
        ``separate``: they and the other channels take their per-token bounds apart."""
        addbit = check_int("addbit", addbit, 0, 8)
        if salient.dim() != 1 or salient.dtype != torch.bool:
            raise ConfigError("salient", tuple(salient.shape), "must be a 1-D bool mask over input channels")
        self.channel_scale = torch.where(salient, 2.0 ** addbit, 1.0).to(salient.device)
        self.separate_clusters = torch.tensor(bool(check_bool("separate", separate)), device=salient.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # an allocation saved with the model creates the buffers a freshly built encoder lacks
        for name in ("channel_scale", "separate_clusters"):
            saved = state_dict.get(prefix + name)
            if saved is not None and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(saved))
        for cached in _CACHED:  # the loaded allocation changes the settings shown (T)
            self.__dict__.pop(cached, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- the public two forms -------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Collapsed form: ``(counts, step)``, ``step`` broadcastable against ``x``."""
        if torch.is_grad_enabled():  # a no-grad context costs microseconds a one-token decode step feels
            with torch.no_grad():
                return self.encode(x)
        step = self.element_step(x)
        return self.counts(x, step, *self.count_bounds()), step

    @torch.no_grad()
    def spike_train(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Temporal form: ``(spikes [T, *x.shape], step)``."""
        step = self.element_step(x)
        return self.train_from(x, step, *self.count_bounds()), step

    def decode(self, spikes: Tensor) -> Tensor:
        """Counts carried by a train: ``Σ_t w_t · s_t``."""
        weights = self.time_weights().to(spikes).view(-1, *([1] * (spikes.dim() - 1)))
        return (spikes * weights).sum(0)

    def fused_reason(self) -> str | None:
        """Why the fused encoders (the Triton kernel, :mod:`spikellm.kernels`, and the CPU one,
        :mod:`spikellm.ops.cpu_encode`) cannot compute this encoder's collapsed form, or None when
        they can: they compute ``clamp(round_half_away(x / Δ), low, high)`` with a per-token step
        (given, or the bound of :meth:`magnitude` over ``step_levels``) and per-channel multipliers."""
        reason = self.static_fused_reason()
        if reason is None and self.clusters_apart:
            return "separate per-cluster steps"
        return reason

    def static_fused_reason(self) -> str | None:
        """:meth:`fused_reason` as far as the encoder's settings decide it (not its buffers)."""
        if self.granularity != "token":
            return "a per-channel (causal) step"
        return self.counts_reason()

    def counts_reason(self) -> str | None:
        """Why this encoder's collapsed form is not ``clamp(round_half_away(x / Δ), low, high)`` of
        its step (what every fused encoder computes), or None. An encoder that overrides a method
        of the collapsed form (:data:`COLLAPSED_FORM`) is left to the PyTorch path, unless the
        class that overrides it lists it in ``fused_overrides`` (and says here when it does not hold)."""
        cls = type(self)
        for name in COLLAPSED_FORM:
            owner = next(c for c in cls.__mro__ if name in c.__dict__)
            if owner is not SpikeEncoder and name not in owner.__dict__.get("fused_overrides", ()):
                return f"{owner.__name__} defines its own {name}()"
        return None

    @property
    def largest_count(self) -> int:
        """The largest count magnitude of any channel (allocated channels included)."""
        return max(abs(self.min_count), abs(self.max_count)) * self.max_scale

    def kernel_reason(self) -> str | None:
        """Why the Triton kernels cannot run this encoder, or None: :meth:`fused_reason`, and the
        kernels' int8 counts."""
        reason = self.fused_reason()
        if reason is None and self.largest_count > 127:
            return "counts beyond int8"
        return reason

    @property
    def keeps_full_range(self) -> bool:
        """Whether every activation fits the count range when the bound is the maximum (γ = 1):
        no clipping of the encoder's own (membrane clipping, unsigned codes dropping negatives)."""
        return True

    @property
    def absmax_step(self) -> bool:
        """Whether the step is the plain per-token absmax over the levels (what the fused kernel
        computes by itself); otherwise the encoder's :meth:`token_step` is handed to it."""
        return self.threshold == "bound" and self.gamma >= 1.0 and self.step_scale is None

    @property
    def can_clip(self) -> bool:
        """Whether some activation can fall outside the window (then the STE needs a mask). A
        per-token absmax or a causal per-channel running max always covers the value itself."""
        covered = self.threshold == "bound" and (self.granularity == "channel" or self.gamma >= 1.0)
        return not (covered and self.step_scale is None and self.keeps_full_range)

    def spike_term(self, x: Tensor, counts: Tensor, spikes: Tensor) -> Tensor:
        """The spike count of this forward, exactly ``spikes`` in value, differentiable through the
        collapsed form: the gradient is that of ``Σ spike_proxy(|x| / Δ)`` with Δ's dependence on
        ``x`` (its bound) and on the learned scale kept, and the rounding passed straight through.
        A learned scale is the per-layer threshold the objective pushes up; the task loss pulls it
        down."""
        magnitude = self.magnitude(x)
        step = self._step_of(magnitude)
        if self.step_scale is not None:
            step = step * self.step_scale.abs().clamp_min(1e-4)
        slope = self.spike_proxy_slope
        if slope is not None and self.channel_scale is None and step.shape[-1] == 1:
            # a linear proxy of a per-token step: Σ_i |x_i| / Δ_t per token, without an element-wise
            # division (the clipping of the rare counts beyond the range is left out of the proxy)
            proxy = slope * (magnitude.sum(dim=-1, keepdim=True) / step).sum()
        else:
            if self.channel_scale is not None:
                step = step / self.channel_scale
            low, high = self.count_bounds()
            proxy = self.spike_proxy((x.float() / step).clamp(low, high).abs()).sum()
        return spikes + (proxy - proxy.detach())

    def forward(self, x: Tensor, siblings: tuple["SpikeEncoder", ...] = ()) -> Tensor:
        """``n · Δ`` in ``x.dtype``; gradient passes straight through inside the clipping window
        (and, with a learnable step, reaches the step by the LSQ rule). ``siblings`` are encoders
        of other layers that receive this same spike train: their statistics are updated too."""
        value = fused.forward_value(self, x, siblings)  # evaluation on small CPU tensors: one C call
        if value is not None:
            return value
        counts, step = self.encode(x)
        listeners = (self, *siblings)
        grad_mode = torch.is_grad_enabled()
        needs_grad = grad_mode and (x.requires_grad or (self.step_scale is not None and self.step_scale.requires_grad))
        recording = needs_grad and any(e.spike_terms is not None for e in listeners)
        with torch.no_grad() if grad_mode else contextlib.nullcontext():
            outliers = self.outlier_counts(x, step, counts)
            for encoder in listeners:
                if encoder.stats is not None:
                    encoder.stats.update(encoder, counts, outliers)
            spikes = record_tallies(self, listeners, counts, outliers, need_spikes=recording)
            if not needs_grad:  # evaluation: the value alone, no clipping window to keep
                total = counts.mul_(step) if outliers is None else (counts + outliers).mul_(step)
                return total.to(x.dtype)
            total = counts if outliers is None else counts + outliers
            inside = self.inside_window(x, step) if self.can_clip else None
        if recording:
            term = self.spike_term(x, counts, spikes)
            for encoder in listeners:
                if encoder.spike_terms is not None:
                    encoder.spike_terms.append((term, counts.numel()))
        if self.step_scale is None:
            return straight_through(x, total * step, inside)
        return learned_step_quantize(x, self.step_scale, total, step, inside, self.lsq_gradient_scale(x))

    def records(self) -> bool:
        """Whether a forward must record something besides the value: statistics, a tally (the
        energy counter) or a spike objective's terms."""
        return self.stats is not None or self.tally is not None or self.spike_terms is not None

    def encode_continued(self, x: Tensor, previous: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(n · Δ, bound)`` of new tokens ``x [..., T, C]`` of a per-channel (causal) code whose
        running bound over the tokens before is ``previous [..., 1, C]`` (None: none before), and
        the bound to carry on: the last T rows of the code over the whole sequence, which is what a
        cached decoding step needs (the bound is a maximum, so continuing it is exact)."""
        continued = fused.continued_value(self, x, previous)
        if continued is not None:
            return continued
        bound = self.magnitude(x).amax(dim=-2, keepdim=True)
        if previous is None:
            return self(x), bound
        # the carried bound as a first row: the running maximum then starts from it (and that row is dropped)
        encoded = self(torch.cat([previous.to(x.dtype), x], dim=-2))[..., 1:, :]
        return encoded, torch.maximum(previous, bound)

    def inside_window(self, x: Tensor, step: Tensor) -> Tensor:
        """Where the gradient passes: ``low <= x/Δ <= high`` on the window's bounds, as LSQ
        (Esser et al. 2020) clips ``v/s`` to ``[-Q_N, Q_P]`` before rounding; a value in
        ``(Q_P, Q_P + 1/2]`` rounds to the top count but is clipped all the same."""
        scaled = x.detach().float() / step
        low, high = self.window_bounds()
        return (scaled >= low) & (scaled <= high)

    def lsq_gradient_scale(self, x: Tensor) -> float:
        """LSQ's ``g = 1 / sqrt(N_F · Q_P)``, ``N_F`` the features of one example (Esser et al.:
        "the number of features in a layer"): one sequence's ``x[0].numel()``, so the scale does
        not shrink with the batch size; ``Q_P`` the top count."""
        features = x[0].numel() if x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(max(1, features) * max(1, self.max_count))


def threshold_repr(encoder: SpikeEncoder) -> str:
    """``threshold=mean, threshold_k=…, `` for the mean rule, nothing for the default bound rule
    (so the representation of every existing configuration stays what it was)."""
    return "" if encoder.threshold == "bound" else f"threshold=mean, threshold_k={encoder.threshold_k}, "


def record_tallies(encoder: SpikeEncoder, listeners, counts: Tensor, outliers: Tensor | None,
                   need_spikes: bool = False) -> Tensor | None:
    """Add this forward's spike sums to every listener's tally; returns the spike count (a 0-d
    tensor) when a tally or ``need_spikes`` asked for it, computed once for all listeners."""
    tallies = [e.tally for e in listeners if e.tally is not None]
    if not tallies and not need_spikes:
        return None
    # per-token sums first: exact in fp32 while a row's spikes stay below 2^24, and they also say
    # which tokens fired at all (a count fires iff it is non-zero, for every code)
    bound = encoder.largest_count
    exact = torch.float32 if counts.dim() and counts.shape[-1] * bound < 2 ** 24 else torch.float64
    per_count = encoder.spikes_per_count(counts)
    rows = per_count.sum(dim=-1, dtype=exact)
    spikes = rows.sum(dtype=torch.float64)
    if tallies:
        from spikellm.neurons.tally import SpikeTally

        # a count fires iff it is non-zero, and then at least one whole spike: min(spikes, 1) marks
        # the non-zero counts without a data-dependent branch (torch.count_nonzero on counts that
        # are zero about half the time runs ~8x slower than this sum on the CPU)
        marks = per_count.clamp_(max=1.0) if per_count.data_ptr() != counts.data_ptr() else per_count.clamp(max=1.0)
        nonzero = marks.sum(dtype=torch.float32 if counts.numel() < 2 ** 24 else torch.float64)
        levels = spikes if type(encoder).spike_levels is SpikeEncoder.spike_levels else \
            encoder.spike_levels(counts).sum(dtype=torch.float64)
        step_tally = SpikeTally.of(counts, outliers, spikes, levels, rows, nonzero)
        for tally in tallies:
            tally.add(step_tally)
    return spikes
