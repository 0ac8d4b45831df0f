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
    """``weight`` λ (0: off), ``target`` in spikes per activation or None, ``per_layer``."""

    weight: float = 0.0
    target: float | None = None
    per_layer: bool = False

    @classmethod
    def from_config(cls, options: dict | None, key: str = "spike_loss") -> "SpikeObjective":
        options = dict(options or {})
        unknown = sorted(set(options) - {"weight", "target", "per_layer"})
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", options[unknown[0]], "unknown option; the spike loss takes "
                                                                          "weight, target and per_layer")
        weight = check_float(f"{key}.weight", options.get("weight", 0.0), 0.0, 1e6)
        target = options.get("target")
        if target is not None:
            target = check_float(f"{key}.target", target, 0.0, 1e6)
        return cls(weight, target, check_bool(f"{key}.per_layer", options.get("per_layer", False)))

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def attach(self, model: nn.Module) -> None:
        """Make every encoder of ``model`` record its spike terms on training forwards."""
        for encoder in _encoders(model):
            if self.enabled:
                observers.attach(encoder, SpikeTerms())
            else:
                observers.detach(encoder, SpikeTerms)

    def collect(self, model: nn.Module) -> tuple[Tensor, Tensor] | None:
        """``(weight · penalty, spikes per activation)`` of the forwards since the last call, the
        recorded terms cleared; None when nothing was recorded (off, or no encoder ran)."""
        spikes, activations = [], []
        for encoder in _encoders(model):
            recorded = observers.find(encoder, SpikeTerms)
            terms = list(recorded or ())
            if recorded:
                recorded.clear()
                spikes.append(torch.stack([t for t, _ in terms]).sum())
                activations.append(float(sum(n for _, n in terms)))
        if not spikes:
            return None
        spikes = torch.stack(spikes)
        counts = spikes.new_tensor(activations)
        overall = spikes.sum() / counts.sum()
        rates = spikes / counts if self.per_layer else overall.unsqueeze(0)
        penalty = rates if self.target is None else (rates - self.target).clamp_min(0)
        return (self.weight * penalty.mean()).float(), overall.detach().float()


def _encoders(model: nn.Module):
    from spikellm.neurons.base import SpikeEncoder

    return (module for module in model.modules() if isinstance(module, SpikeEncoder))
