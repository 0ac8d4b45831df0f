"""The contract every spike encoder implements.

An encoder maps activations ``x`` to integer spike counts ``n`` and a step (threshold) ``Δ`` with
``x ≈ n · Δ``. It has two exact forms (DESIGN.md §2):

* :meth:`SpikeEncoder.encode` — the collapsed form, counts in one pass; this is what training runs;
* :meth:`SpikeEncoder.spike_train` — the temporal form, the ``[T, ...]`` train a neuromorphic chip
  would see, with ``decode(train) == counts`` exactly.

:meth:`forward` returns ``n · Δ`` with a straight-through gradient, so any module can sit behind an
encoder without knowing which one it is: new encoders plug in without touching the model.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from spikellm.neurons.functional import straight_through


class SpikeEncoder(nn.Module, ABC):
    """Base class of activation spike encoders (see the module docstring for the contract)."""

    #: lowest and highest count the encoder emits, used for the straight-through window
    min_count: int
    max_count: int

    @property
    @abstractmethod
    def num_steps(self) -> int:
        """T: the number of time steps of the temporal form."""

    @abstractmethod
    def step_size(self, x: Tensor) -> Tensor:
        """Δ, broadcastable against ``x`` (fp32)."""

    @abstractmethod
    def counts(self, x: Tensor, step: Tensor) -> Tensor:
        """Collapsed form: integer-valued fp32 counts, same shape as ``x``."""

    @abstractmethod
    def train_from(self, x: Tensor, step: Tensor) -> Tensor:
        """Temporal form: simulate the neuron, ``[T, *x.shape]`` fp32 spikes."""

    def time_weights(self) -> Tensor:
        """Weight of each time step when decoding a train (all ones for rate codes)."""
        return torch.ones(self.num_steps)

    def spikes_per_count(self, counts: Tensor) -> Tensor:
        """Non-zero spikes each activation emits, in closed form from its count."""
        return counts.abs()

    # ---- the public two forms -------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Collapsed form: ``(counts, step)``."""
        step = self.step_size(x)
        return self.counts(x, step), step

    @torch.no_grad()
    def spike_train(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Temporal form: ``(spikes [T, *x.shape], step)``."""
        step = self.step_size(x)
        return self.train_from(x, step), step

    def decode(self, spikes: Tensor) -> Tensor:
        """Counts carried by a train: ``Σ_t w_t · s_t``."""
        weights = self.time_weights().to(spikes).view(-1, *([1] * (spikes.dim() - 1)))
        return (spikes * weights).sum(0)

    def forward(self, x: Tensor) -> Tensor:
        """``n · Δ`` in ``x.dtype``; gradient passes straight through inside the clipping window."""
        counts, step = self.encode(x)
        x32 = x.detach().float()
        inside = (x32 >= (self.min_count - 0.5) * step) & (x32 <= (self.max_count + 0.5) * step)
        return straight_through(x, counts * step, inside)
