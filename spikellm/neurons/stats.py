"""Firing statistics in closed form from the counts: cheap enough to leave on while training.

The temporal form is never run: each statistic follows from the integer counts and the encoder's
closed forms (``spikes_per_count``, ``steps_used``), and tests check them against counting the
train. Accumulators stay on the counts' device, so tracking adds no host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from spikellm.neurons.observers import attach, detach, find

MAX_HISTOGRAM_BINS = 1025  # wider count ranges (16-bit codes) keep no histogram


@dataclass
class SpikeStats:
    """Running totals for one encoder since the last :meth:`reset`."""

    activations: int = 0
    tokens: int = 0
    spikes: Tensor | float = 0.0
    silent: Tensor | int = 0
    outlier_events: Tensor | int = 0
    nonfinite: Tensor | int = 0  # activations whose count was NaN/inf (a diverged input): no spikes, no bin
    max_abs_count: Tensor | int = 0
    histogram: Tensor | None = None  # counts per value, low..high
    histogram_low: int = 0
    channels: int = 0
    steps: int = 0
    extra: dict = field(default_factory=dict)

    # the histogram's size depends on the counts (bincount): torch.compile runs this eagerly, the
    # one graph break of a compiled forward that tracks statistics (validation, not training)
    @torch.compiler.disable
    def observe(self, encoder, forward) -> None:
        """Count one encoding (an observer of :mod:`spikellm.neurons.observers`)."""
        self.update(encoder, forward.counts, forward.outliers)

    @torch.no_grad()
    def update(self, encoder, counts: Tensor, outliers: Tensor | None = None) -> None:
        self.channels, self.steps = counts.shape[-1], encoder.num_steps
        numel = counts.numel()
        self.activations += numel
        self.tokens += numel // max(1, counts.shape[-1])
        if outliers is not None:
            self.outlier_events = self.outlier_events + (outliers != 0).sum()
        low, high = encoder.count_bounds()
        low = int(low if isinstance(low, int) else low.min().item())
        high = int(high if isinstance(high, int) else high.max().item())
        bins = high - low + 1
        if bins > MAX_HISTOGRAM_BINS:
            self._update_without_histogram(encoder, counts)
            return
        # One pass over the counts makes the histogram; every other statistic follows from it. A
        # non-finite input (a diverging run) gives NaN counts: they go to an extra bin, dropped and
        # counted as ``nonfinite``, so they neither poison the totals nor crash the bincount.
        index = (counts.flatten() - (low - 1)).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).clamp_(0, bins + 1)
        histogram = torch.bincount(index.long(), minlength=bins + 2)[1:bins + 1]
        values = torch.arange(low, high + 1, device=counts.device)
        self.nonfinite = self.nonfinite + (numel - histogram.sum())
        self.spikes = self.spikes + (encoder.spikes_per_count(values.to(counts.dtype)).double() * histogram).sum()
        if low <= 0 <= high:
            self.silent = self.silent + histogram[-low]
        self.max_abs_count = torch.maximum(torch.as_tensor(self.max_abs_count, device=counts.device),
                                           (values.abs() * (histogram > 0)).max())
        self.histogram = histogram if self.histogram is None else self.histogram + histogram
        self.histogram_low = low

    def _update_without_histogram(self, encoder, counts: Tensor) -> None:
        """Wide count ranges (16-bit codes): the statistics from the counts themselves."""
        finite = torch.isfinite(counts)
        self.nonfinite = self.nonfinite + (counts.numel() - finite.sum())
        counts = torch.where(finite, counts, 0)
        self.spikes = self.spikes + encoder.spikes_per_count(counts).sum(dtype=torch.float64)
        self.silent = self.silent + ((counts == 0) & finite).sum()
        self.max_abs_count = torch.maximum(torch.as_tensor(self.max_abs_count, device=counts.device),
                                           counts.abs().max().long())

    def summary(self, encoder) -> dict:
        """Plain numbers: spikes per activation, firing rate (spikes per neuron per step), silent
        fraction, steps used, (per token) spikes and outlier events, and ``nonfinite``: activations
        whose input was NaN/inf (0 in a healthy run; left out of every other statistic)."""
        activations = max(1, self.activations)
        spikes = float(self.spikes)
        max_abs = int(self.max_abs_count)
        return {
            "activations": self.activations,
            "tokens": self.tokens,
            "spikes": spikes,
            "spikes_per_activation": spikes / activations,
            "firing_rate": spikes / (activations * max(1, self.steps)),
            "silent_fraction": float(self.silent) / activations,
            "steps": self.steps,
            "steps_used": encoder.steps_used(max_abs),
            "max_abs_count": max_abs,
            "spikes_per_token": spikes / max(1, self.tokens),
            "outlier_events": int(self.outlier_events),
            "nonfinite": int(self.nonfinite),
            "histogram": None if self.histogram is None else
            dict(zip(range(self.histogram_low, self.histogram_low + len(self.histogram)), self.histogram.tolist())),
        }


def track_spikes(model: nn.Module, enabled: bool = True) -> None:
    """Start (fresh totals) or stop accumulating statistics in every encoder of ``model``."""
    from spikellm.neurons.base import SpikeEncoder

    for module in model.modules():
        if isinstance(module, SpikeEncoder):
            if enabled:
                attach(module, SpikeStats())
            else:
                detach(module, SpikeStats)


def spike_report(model: nn.Module) -> dict[str, dict]:
    """``{encoder name: summary}`` for every encoder of ``model`` that tracks statistics."""
    from spikellm.neurons.base import SpikeEncoder

    return {name: find(module, SpikeStats).summary(module) for name, module in model.named_modules()
            if isinstance(module, SpikeEncoder) and find(module, SpikeStats) is not None}
