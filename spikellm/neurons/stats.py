"""Firing statistics in closed form from the counts: cheap enough to leave on while training.

The temporal form is never run: each statistic follows from the integer counts and the encoder's
closed forms (``spikes_per_count``, ``steps_used``), and tests check them against counting the
train. Accumulators stay on the counts' device, so tracking adds no host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

MAX_HISTOGRAM_BINS = 1025  # wider count ranges (16-bit codes) keep no histogram


@dataclass
class SpikeStats:
    """Running totals for one encoder since the last :meth:`reset`."""

    activations: int = 0
    tokens: int = 0
    spikes: Tensor | float = 0.0
    silent: Tensor | int = 0
    outlier_events: Tensor | int = 0
    max_abs_count: Tensor | int = 0
    histogram: Tensor | None = None  # counts per value, low..high
    histogram_low: int = 0
    channels: int = 0
    steps: int = 0
    extra: dict = field(default_factory=dict)

    @torch.no_grad()
    def update(self, encoder, counts: Tensor, outliers: Tensor | None = None) -> None:
        self.channels, self.steps = counts.shape[-1], encoder.num_steps
        self.activations += counts.numel()
        self.tokens += counts.numel() // max(1, counts.shape[-1])
        self.spikes = self.spikes + encoder.spikes_per_count(counts).sum(dtype=torch.float64)
        self.silent = self.silent + (counts == 0).sum()
        self.max_abs_count = torch.maximum(torch.as_tensor(self.max_abs_count, device=counts.device),
                                           counts.abs().max().long())
        if outliers is not None:
            self.outlier_events = self.outlier_events + (outliers != 0).sum()
        low, high = encoder.count_bounds()
        low = int(low if isinstance(low, int) else low.min().item())
        high = int(high if isinstance(high, int) else high.max().item())
        if high - low + 1 <= MAX_HISTOGRAM_BINS:
            bins = torch.bincount((counts.flatten().long() - low), minlength=high - low + 1)
            self.histogram = bins if self.histogram is None else self.histogram + bins
            self.histogram_low = low

    def summary(self, encoder) -> dict:
        """Plain numbers: spikes per activation, firing rate (spikes per neuron per step), silent
        fraction, steps used, and (per token) spikes and outlier events."""
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
            "histogram": None if self.histogram is None else
            dict(zip(range(self.histogram_low, self.histogram_low + len(self.histogram)), self.histogram.tolist())),
        }


def track_spikes(model: nn.Module, enabled: bool = True) -> None:
    """Start (fresh totals) or stop accumulating statistics in every encoder of ``model``."""
    from spikellm.neurons.base import SpikeEncoder

    for module in model.modules():
        if isinstance(module, SpikeEncoder):
            module.stats = SpikeStats() if enabled else None


def spike_report(model: nn.Module) -> dict[str, dict]:
    """``{encoder name: summary}`` for every encoder of ``model`` that tracks statistics."""
    from spikellm.neurons.base import SpikeEncoder

    return {name: module.stats.summary(module) for name, module in model.named_modules()
            if isinstance(module, SpikeEncoder) and module.stats is not None}
