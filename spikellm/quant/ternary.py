"""Ternary weights {-1, 0, 1}·α (DESIGN.md §4, §5): BitNet b1.58 / MatMul-free LM absmean."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from spikellm.checks import check_bool, check_float, check_int
from spikellm.ops.rounding import round_half_up, straight_through
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
        self.max_int = 1  # the grid is {-1, 0, 1}

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

    def column_grid(self, weight: Tensor, hessian: Tensor | None = None, hinv_diag: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
        """GPTQ's static grid: the absmean scale of each row for every column, one level."""
        scale, _ = self.scales_and_integers(weight)
        columns = weight.shape[1]
        return scale.reshape(-1, 1).expand(-1, columns), torch.ones(columns, dtype=torch.long, device=weight.device)

    def extra_repr(self) -> str:
        return f"per_channel={self.per_channel}, eps={self.eps}"


class TernaryGIFGrid:
    """SpikeLLM's ternary GIF weights for the GPTQ pipeline: every weight is a sum of ternary terms.

    Most columns hold one term, ``{-1, 0, 1}·α`` with the absmean ``α`` of the row's ordinary
    columns. The ``salient_fraction`` of input columns with the largest Hessian saliency get
    ``salient_terms`` terms: integers ``-m … m`` (``m = salient_terms``), each fired as ``m``
    ternary spikes (a GIF weight), on a per-row scale chosen among ``scale_candidates · mean|W|``
    to minimize the row's squared error on those columns. The layer then still only adds and
    subtracts weight-scaled inputs; a salient column costs ``m`` additions instead of one.

    Saliency of column ``j`` (Optimal Brain Surgeon, with the GPTQ Hessian ``H = 2XXᵀ``): the
    loss of zeroing it, ``Σ_i W_ij² / [H⁻¹]_jj``, with ``percdamp · mean(diag H)`` added to H's
    diagonal before inverting (the damping GPTQ uses). Inside GPTQ, the diagonal comes from GPTQ's
    own damped inverse (its ``percdamp``), computed once.
    """

    bits = 2

    def __init__(self, salient_fraction: float = 0.1, salient_terms: int = 2, percdamp: float = 0.01,
                 scale_candidates: tuple[float, ...] = tuple(0.25 + 0.05 * i for i in range(26))):
        self.salient_fraction = check_float("salient_fraction", salient_fraction, 0.0, 1.0)
        self.salient_terms = check_int("salient_terms", salient_terms, 1, 64)
        self.percdamp = check_float("percdamp", percdamp, 0.0, 1.0)
        self.scale_candidates = tuple(check_float("scale_candidates", c, 0.0, 100.0, low_open=True)
                                      for c in scale_candidates)
        self.ordinary = TernaryAbsMean(per_channel=True)

    def salient_columns(self, weight: Tensor, hessian: Tensor | None, hinv_diag: Tensor | None = None) -> Tensor:
        """``[in]`` bool mask of the ``ceil(salient_fraction · in)`` most salient columns; ``hinv_diag``:
        the diagonal of the damped ``H⁻¹`` when the caller has it (GPTQ's own inverse: a 5632-wide
        Hessian is not inverted twice), else computed here from ``hessian`` with ``percdamp``."""
        columns = weight.shape[1]
        count = min(columns, math.ceil(round(self.salient_fraction * columns, 9)))
        if hinv_diag is None:
            H = hessian.detach().to(torch.float64).clone()
            H.diagonal().add_(self.percdamp * H.diagonal().mean() + 1e-12)
            hinv_diag = torch.cholesky_inverse(torch.linalg.cholesky(H)).diagonal()
        saliency = (weight.detach().double() ** 2).sum(0) / hinv_diag.double()
        mask = torch.zeros(columns, dtype=torch.bool, device=weight.device)
        mask[torch.sort(saliency, descending=True, stable=True).indices[:count].to(weight.device)] = True
        return mask

    def _salient_scale(self, part: Tensor) -> Tensor:
        """Per-row scale ``[out, 1]`` minimizing the squared rounding error on ``-m … m``."""
        m = self.salient_terms
        base = part.abs().mean(dim=1, keepdim=True).clamp_min(1e-8)
        best_error = best_scale = None
        for factor in self.scale_candidates:
            scale = base * factor
            error = ((round_half_up(part / scale).clamp(-m, m) * scale - part) ** 2).sum(dim=1, keepdim=True)
            if best_error is None:
                best_error, best_scale = error, scale
            else:
                better = error < best_error
                best_error, best_scale = torch.where(better, error, best_error), torch.where(better, scale, best_scale)
        return best_scale

    def column_grid(self, weight: Tensor, hessian: Tensor | None, hinv_diag: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(scales [out, in], max_ints [in])`` for :func:`~spikellm.quant.gptq.gptq_quantize_detailed`."""
        w = weight.detach().float()
        salient = self.salient_columns(w, hessian, hinv_diag)
        max_ints = torch.where(salient, self.salient_terms, 1).long()
        ordinary_part = w[:, ~salient] if (~salient).any() else w
        alpha = ordinary_part.abs().mean(dim=1, keepdim=True).clamp_min(self.ordinary.eps)
        scales = alpha.expand(-1, w.shape[1]).clone()
        if salient.any():
            scales[:, salient] = self._salient_scale(w[:, salient]).expand(-1, int(salient.sum()))
        return scales, max_ints

    def __repr__(self) -> str:
        return (f"TernaryGIFGrid(salient_fraction={self.salient_fraction}, salient_terms={self.salient_terms}, "
                f"percdamp={self.percdamp})")
