"""Ternary weights {-1, 0, 1}·α (DESIGN.md §4, §5): BitNet b1.58 / MatMul-free LM absmean."""
from __future__ import annotations

from torch import Tensor

from spikellm.checks import check_bool, check_float
from spikellm.neurons.functional import round_half_up, straight_through
from spikellm.quant.weights import WeightQuantizer


class TernaryAbsMean(WeightQuantizer):
    """``W_q = clamp(round(W / α), -1, 1) · α`` with ``α = mean(|W|)``, gradient straight through.

    Args:
        per_channel: one α per output channel (row) when true, one for the whole tensor otherwise.
        eps: floor on α, so an all-zero row quantizes to zeros rather than NaN.

    Every weight is then an addition, a subtraction or nothing: with spiking inputs the layer
    needs no multiplier but one α per row.
    """

    bits = 2  # three levels: log2(3) ≈ 1.58 bits, stored in 2

    def __init__(self, per_channel: bool = True, eps: float = 1e-5):
        super().__init__()
        self.per_channel = check_bool("per_channel", per_channel)
        self.eps = check_float("eps", eps, 0.0, 1.0, low_open=True)
        self.levels = 1

    def scales_and_integers(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Scales ``[out, 1, 1]`` and integers in {-1, 0, 1} ``[out, 1, in]`` (RoundToNearest's layout)."""
        w = weight.detach().float()
        if self.per_channel:
            scale = w.abs().mean(dim=-1, keepdim=True)
        else:
            scale = w.abs().mean().expand(w.shape[0], 1)
        scale = scale.clamp_min(self.eps).unsqueeze(1)
        integers = round_half_up(w.unsqueeze(1) / scale).clamp(-1, 1)
        return scale, integers

    def forward(self, weight: Tensor) -> Tensor:
        scale, integers = self.scales_and_integers(weight)
        return straight_through(weight, (integers * scale).reshape(weight.shape), None)

    def extra_repr(self) -> str:
        return f"per_channel={self.per_channel}, eps={self.eps}"
