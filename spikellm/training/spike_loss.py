"""The spike-count objective: a term of the training loss that trains models to fire less.

Every encoder records, on each training forward, its exact spike count with a gradient through the
collapsed form (:func:`spikellm.neurons.observers.spike_term`); this objective turns them
into spikes per activation and a penalty ``weight · penalty``:

* no target: the spikes per activation themselves (activation-weighted over the encoded layers,
  or the mean of the layers' figures with ``per_layer``);
* a target ``t`` in spikes per activation: only the excess ``max(0, s - t)``, globally or for each
  layer (``per_layer``), so a model already under its budget trains on the task loss alone.

It works with every encoder (each defines its spike count and a smooth proxy of it) and costs one
sum per encoded input per step, no histogram.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from spikellm.checks import check_bool, check_float
from spikellm.errors import ConfigError
from spikellm.neurons import observers
from spikellm.neurons.observers import SpikeTerms


@dataclass(frozen=True)
class SpikeObjective:
    """``weight`` λ (0: off), ``target`` in spikes per activation or None, ``per_layer``;
    ``nonzero_weight`` and ``nonzero_target``: the same for the fraction of encoded inputs whose
    count is not zero (the inputs a spiking layer reads a weight row for), a target of that
    fraction (0.35: at most 35 % non-zero) or None for the fraction itself."""

    weight: float = 0.0
    target: float | None = None
    per_layer: bool = False
    nonzero_weight: float = 0.0
    nonzero_target: float | None = None

    @classmethod
    def from_config(cls, options: dict | None, key: str = "spike_loss") -> "SpikeObjective":
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", options[unknown[0]], "unknown option; the spike loss takes "
                                                                          + ", ".join(OPTIONS))
        weight = check_float(f"{key}.weight", options.get("weight", 0.0), 0.0, 1e6)
        target = options.get("target")
        if target is not None:
            target = check_float(f"{key}.target", target, 0.0, 1e6)
        nonzero_weight = check_float(f"{key}.nonzero_weight", options.get("nonzero_weight", 0.0), 0.0, 1e6)
        nonzero_target = options.get("nonzero_target")
        if nonzero_target is not None:
            nonzero_target = check_float(f"{key}.nonzero_target", nonzero_target, 0.0, 1.0)
        return cls(weight, target, check_bool(f"{key}.per_layer", options.get("per_layer", False)), nonzero_weight,
                   nonzero_target)

    @property
    def enabled(self) -> bool:
        return self.weight > 0 or self.nonzero_weight > 0

    def attach(self, model: nn.Module) -> None:
        """Make every encoder of ``model`` record its spike terms on training forwards."""
        for encoder in _encoders(model):
            if self.enabled:
                observers.attach(encoder, SpikeTerms(nonzero=self.nonzero_weight > 0))
            else:
                observers.detach(encoder, SpikeTerms)

    def collect(self, model: nn.Module) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """``(penalty, spikes per activation, non-zero fraction or None)`` of the forwards since the
        last call, the recorded terms cleared; None when nothing was recorded (off, or no encoder
        ran). The penalty is ``weight · spike penalty + nonzero_weight · non-zero penalty``."""
        spikes, nonzero, activations = [], [], []
        for encoder in _encoders(model):
            recorded = observers.find(encoder, SpikeTerms)
            terms = list(recorded or ())
            if recorded:
                recorded.clear()
                spikes.append(torch.stack([term.spikes for term in terms]).sum())
                if recorded.nonzero:
                    nonzero.append(torch.stack([term.nonzero for term in terms]).sum())
                activations.append(float(sum(term.activations for term in terms)))
        if not spikes:
            return None
        counts = spikes[0].new_tensor(activations)
        penalty, rate = self._penalty(torch.stack(spikes), counts, self.weight, self.target)
        fraction = None
        if nonzero:
            nonzero_penalty, fraction = self._penalty(torch.stack(nonzero), counts, self.nonzero_weight,
                                                      self.nonzero_target)
            penalty = penalty + nonzero_penalty
        return penalty, rate, fraction

    def _penalty(self, totals: Tensor, counts: Tensor, weight: float, target: float | None) -> tuple[Tensor, Tensor]:
        """``(weight · mean penalty, overall rate)`` of per-layer totals over their activations."""
        overall = totals.sum() / counts.sum()
        rates = totals / counts if self.per_layer else overall.unsqueeze(0)
        penalty = rates if target is None else (rates - target).clamp_min(0)
        return (weight * penalty.mean()).float(), overall.detach().float()


OPTIONS = ("weight", "target", "per_layer", "nonzero_weight", "nonzero_target")


def _encoders(model: nn.Module):
    from spikellm.neurons.base import SpikeEncoder

    return (module for module in model.modules() if isinstance(module, SpikeEncoder))
