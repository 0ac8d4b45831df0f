"""A linear layer fed by spike trains (DESIGN.md §4)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spikellm.neurons.base import SpikeEncoder
from spikellm.quant.weights import WeightQuantizer

EncoderFactory = Callable[[], SpikeEncoder]
WeightQuantizerFactory = Callable[[], WeightQuantizer]


class SpikingLinear(nn.Linear):
    """``nn.Linear`` whose input passes through a spike encoder and whose weight through a quantizer.

    With an encoder the layer computes ``Δ · Σ_t s_t @ Wᵀ``: additions of weight rows selected by
    spikes. Training runs the collapsed form ``(n · Δ) @ Wᵀ`` (:meth:`forward`), which equals it;
    :meth:`forward_temporal` runs the spike train for checks and for hardware-faithful inference.
    With neither an encoder nor a quantizer it is exactly ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 encoder: SpikeEncoder | None = None, weight_quantizer: WeightQuantizer | None = None):
        super().__init__(in_features, out_features, bias=bias)
        self.encoder = encoder
        self.weight_quantizer = weight_quantizer

    def effective_weight(self) -> Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.encoder is not None:
            x = self.encoder(x)
        return F.linear(x, self.effective_weight(), self.bias)

    @torch.no_grad()
    def forward_temporal(self, x: Tensor) -> Tensor:
        """Spike-train form: ``Δ · Σ_t w_t (s_t @ Wᵀ)`` (+ bias), fp32 accumulation."""
        if self.encoder is None:
            return self.forward(x)
        spikes, step = self.encoder.spike_train(x)
        weight = self.effective_weight().float()
        time_weights = self.encoder.time_weights().tolist()
        total = sum(w_t * (s_t @ weight.T) for w_t, s_t in zip(time_weights, spikes))
        out = step * total
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype)
