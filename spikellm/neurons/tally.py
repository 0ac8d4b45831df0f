"""The spike sums a training step or the operation counter reads from an encoder, as tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SpikeTally:
    """The few sums of the spikes of some forwards that a training step or the operation counter
    needs, with no histogram: activations, spike events, summed spike levels (a graded spike of
    level k counts k), non-zero counts (inputs whose weight row an event-driven layer reads), and
    outlier events. Totals stay tensors on the counts' device (no host synchronisation)."""

    activations: int = 0
    spikes: Tensor | float = 0.0
    levels: Tensor | float = 0.0
    nonzero: Tensor | int = 0
    active_rows: Tensor | int = 0  # tokens (rows of the last dim) with at least one non-zero count
    outlier_events: Tensor | int = 0

    @classmethod
    @torch.no_grad()
    def of(cls, counts: Tensor, outliers: Tensor | None, spikes: Tensor, levels: Tensor, row_spikes: Tensor,
           nonzero: Tensor) -> "SpikeTally":
        """The tally of one encoding, whose spike count (``spikes``), summed spike levels, spikes per
        token (``row_spikes``) and non-zero counts are already summed. A diverged (NaN) input makes
        NaN totals: the figures say so rather than hide it."""
        # a count fires iff it is non-zero, so a token fired iff it has spikes
        return cls(activations=counts.numel(), spikes=spikes, levels=levels, nonzero=nonzero,
                   active_rows=(row_spikes > 0).sum(),
                   outlier_events=0 if outliers is None else (outliers != 0).sum())

    def observe(self, encoder, forward) -> None:
        """Add one encoding's sums (an observer of :mod:`spikellm.neurons.observers`)."""
        self.add(forward.tally)

    def take(self) -> "SpikeTally":
        """The sums so far, this tally starting afresh."""
        taken = SpikeTally(**vars(self))
        vars(self).update(vars(SpikeTally()))
        return taken

    def add(self, other: "SpikeTally") -> None:
        self.activations += other.activations
        self.spikes = self.spikes + other.spikes
        self.levels = self.levels + other.levels
        self.nonzero = self.nonzero + other.nonzero
        self.active_rows = self.active_rows + other.active_rows
        self.outlier_events = self.outlier_events + other.outlier_events

    def as_numbers(self) -> dict:
        return {"activations": self.activations, "spikes": float(self.spikes), "levels": float(self.levels),
                "nonzero": float(self.nonzero), "active_rows": int(self.active_rows),
                "outlier_events": int(self.outlier_events)}
