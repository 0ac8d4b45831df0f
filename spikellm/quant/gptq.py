"""GPTQ weight quantization (DESIGN.md §3.5, §5): round-to-nearest's grid, chosen column by column
so that each column's rounding error is compensated on the columns not yet quantized.

GPTQ (Frantar et al., arXiv 2210.17323) minimizes the layer's output error ``||X Wᵀ - X Qᵀ||²`` on
calibration inputs X. Its Hessian is ``H = 2/N Σ xxᵀ``; quantizing column j with error e moves the
remaining columns by ``-e · H⁻¹[j, j:] / H⁻¹[j, j]`` (Optimal Brain Surgeon), computed from the upper
Cholesky factor of ``H⁻¹`` and applied lazily, a block of columns at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from spikellm.checks import check_bool, check_float, check_int
from spikellm.errors import ConfigError
from spikellm.ops.rounding import round_half_up
from spikellm.quant.weights import RoundToNearest


class HessianAccumulator:
    """Running ``H = 2/N Σ x xᵀ`` over the rows ``x`` of calibration inputs ``[..., in_features]``.

    A running mean (as GPTQ's ``add_batch``), so a long calibration set never sums to overflow;
    ``N`` counts tokens (rows), not sequences. Kept in ``dtype`` (float64 by default).
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float64, device=None):
        self.in_features = check_int("in_features", in_features, 1)
        self.hessian = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.count = 0

    @torch.no_grad()
    def add_batch(self, x: Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs of width {x.shape[-1]} for a Hessian of width {self.in_features}")
        rows = x.detach().reshape(-1, self.in_features).to(self.hessian.device, self.hessian.dtype)
        n = rows.shape[0]
        if n == 0:
            return
        total = self.count + n
        self.hessian.mul_(self.count / total).addmm_(rows.T, rows, alpha=2.0 / total)
        self.count = total
        self._prepared = {}

    def prepared(self, percdamp: float, act_order: bool, release: bool = False) -> "PreparedHessian":
        """:func:`prepare_hessian` of this Hessian, computed once for every layer that shares it;
        ``release``: the Hessian itself is not needed afterwards, and is dropped before inverting
        (a 5632-wide Hessian is 127 MB; the inversion then holds two such matrices, not four)."""
        cache = self.__dict__.setdefault("_prepared", {})
        key = (float(percdamp), bool(act_order))
        if key not in cache:
            holder = [self.hessian]
            if release:
                self.hessian = None
            cache[key] = prepare_hessian(holder, percdamp, act_order)
        return cache[key]

    def free(self) -> None:
        """Drop the Hessian and its inverse (the last layer that reads this input is quantized)."""
        self.hessian, self._prepared = None, {}


@dataclass
class GPTQResult:
    """``weight = integers · scales[:, group_index]``, in the layer's original column order.

    ``scales`` is ``[out, groups]`` (one group when per channel); ``group_index[j]`` is column j's
    group. With ``act_order`` and groups, a group holds columns consecutive in activation order,
    so ``group_index`` is not monotone. A static grid (``column_grid``: ternary weights) has a
    scale per column: ``scales`` is ``[out, in]`` and ``group_index[j] = j``.
    """

    weight: Tensor
    integers: Tensor
    scales: Tensor
    group_index: Tensor
    # per output row, the increase of GPTQ's objective ``(W - Q) H' (W - Q)ᵀ`` on the damped
    # Hessian H' (Σ_j ((w_j - q_j) / [U]_jj)², Optimal Brain Surgeon's exact step costs)
    row_loss: Tensor | None = None


def _row_scale(quantizer: RoundToNearest, columns: Tensor) -> Tensor:
    """RTN's scale ``[out, 1]`` for a slice of columns that share one (a row, or a group)."""
    return columns.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / quantizer.max_int


@dataclass
class PreparedHessian:
    """What GPTQ derives from a Hessian before touching a weight, shared by every layer that reads
    the same input (q/k/v, gate/up): the dead inputs, the act-order permutation and the upper
    Cholesky factor of the damped, permuted ``H⁻¹``."""

    dead: Tensor
    perm: Tensor | None
    hinv: Tensor


@torch.no_grad()
def prepare_hessian(hessian: Tensor | list, percdamp: float = 0.01, act_order: bool = False) -> PreparedHessian:
    """:class:`PreparedHessian` of ``hessian [in, in]`` (GPTQ's preamble): dead inputs (``H_ii = 0``)
    get ``H_ii = 1``; with ``act_order`` columns go by descending ``diag H``; ``percdamp · mean(diag H)``
    is added to the diagonal; the inversion runs in the Hessian's own precision (fp32 as GPTQ's
    reference, float64 for a float64 Hessian), retried in float64 if fp32 fails. ``hessian`` may be
    a one-element list holding its only reference, which is then freed as early as possible."""
    percdamp = check_float("percdamp", percdamp, 0.0, 1.0)
    act_order = check_bool("act_order", act_order)
    # a list holding the only reference lets the inversion free each matrix as soon as it is used
    holder = hessian if isinstance(hessian, list) else [hessian]
    hessian = holder.pop()
    diagonal = torch.diag(hessian)
    dead = diagonal == 0
    perm = torch.argsort(torch.where(dead, 1.0, diagonal), descending=True, stable=True) if act_order else None
    H = hessian.detach().to(torch.float64 if hessian.dtype == torch.float64 else torch.float32)
    H = H.index_select(0, perm) if perm is not None else H.clone()
    del hessian
    if perm is not None:
        H = H.index_select(1, perm)
    order_dead = dead if perm is None else dead[perm]
    H.diagonal()[order_dead] = 1.0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    holder.append(H)
    del H
    return PreparedHessian(dead, perm, _inverse_cholesky(holder))


@torch.no_grad()
def gptq_quantize_detailed(weight: Tensor, hessian: Tensor | None, quantizer: RoundToNearest, block_size: int = 128,
                           percdamp: float = 0.01, act_order: bool = False,
                           prepared: PreparedHessian | None = None) -> GPTQResult:
    """GPTQ of ``weight [out, in]`` against ``hessian [in, in]`` onto ``quantizer``'s grid.

    Dead inputs (``H_ii = 0``: a channel that is always zero) get a zero weight column and
    ``H_ii = 1``. ``percdamp · mean(diag H)`` is added to the diagonal before inverting. With
    ``act_order`` columns are processed by descending ``diag H`` and put back at the end. With
    ``quantizer.group_size`` each group's scale is taken, when its first column is reached, from
    the group's weights as updated so far (the reference's ``static_groups=False``). ``prepared``
    (:func:`prepare_hessian` of the same Hessian and settings) skips the inversion, for layers
    that share their input.

    ``quantizer`` may instead be a static grid, any object with ``column_grid(weight, hessian) ->
    (scales [out, in], max_ints [in])`` (:class:`~spikellm.quant.ternary.TernaryAbsMean`,
    :class:`~spikellm.quant.ternary.TernaryGIFGrid`): column j is rounded onto
    ``scales[:, j] · {-max_ints[j] … max_ints[j]}``, all fixed before the first column is quantized.

    The column loop runs on the transposed weight, so that each column is a contiguous row.
    """
    static = hasattr(quantizer, "column_grid")
    if not static and not isinstance(quantizer, RoundToNearest):
        raise ConfigError("quantizer", type(quantizer).__name__,
                          "GPTQ needs a RoundToNearest grid or one with column_grid() (TernaryAbsMean, TernaryGIFGrid)")
    block_size = check_int("block_size", block_size, 1)
    if weight.dim() != 2 or (hessian is not None and hessian.shape != (weight.shape[1], weight.shape[1])):
        raise ValueError(f"weight {tuple(weight.shape)} and Hessian "
                         f"{None if hessian is None else tuple(hessian.shape)} do not match")
    out_features, columns = weight.shape
    group = None if static else quantizer.group_size
    if group is not None and columns % group:
        raise ConfigError("group_size", group, f"must divide the layer width {columns}")
    prepared = prepared or prepare_hessian(hessian, percdamp, act_order)
    dead, perm, hinv = prepared.dead, prepared.perm, prepared.hinv

    W = weight.detach().float().clone()
    W[:, dead] = 0.0
    if static:  # a scale and a level count per column, fixed up front from the weight (and H)
        # the diagonal of the damped H⁻¹ from the prepared factor (H⁻¹ = UᵀU: squared column norms)
        hinv_diag = hinv.square().sum(0)
        hinv_diag = hinv_diag if perm is None else hinv_diag[torch.argsort(perm)]
        column_scales, column_max_ints = quantizer.column_grid(W, hessian, hinv_diag=hinv_diag)
        column_scales, column_max_ints = column_scales.float().to(W.device), column_max_ints.to(W.device)
        scale = None
    else:
        column_max_ints = torch.full((columns,), quantizer.max_int, device=W.device)
        scale = None if group is not None else _row_scale(quantizer, W)  # per channel: once, up front
        column_scales = None
    if perm is not None:
        W = W[:, perm]
        column_max_ints = column_max_ints[perm]
        column_scales = None if column_scales is None else column_scales[:, perm]
    tops = column_max_ints.tolist()
    # rows of the transposed matrices are the columns of the weight: contiguous, cache-friendly
    Wt = W.t().contiguous()
    del W
    scales_t = None if column_scales is None else column_scales.t().contiguous()
    row_scale = None if scale is None else scale.reshape(-1)
    Qt, integers_t = torch.empty_like(Wt), torch.empty_like(Wt)
    row_loss = torch.zeros(out_features, dtype=torch.float64, device=Wt.device)
    group_scales = []  # in processing order
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = Wt[i1:i2]  # a view: the updates below land in Wt
        Err1 = torch.empty_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group is not None and col % group == 0:
                # the group's current weights: in this block from W1, beyond it from Wt plus the
                # block's updates not yet applied there
                end = col + group
                current = W1[i:min(end, i2) - i1]
                if end > i2:
                    pending = Wt[i2:end] - hinv[i1:col, i2:end].t() @ Err1[:i]
                    current = torch.cat((current, pending), dim=0)
                row_scale = _row_scale(quantizer, current.t()).reshape(-1)
                group_scales.append(row_scale.reshape(-1, 1))
            w = W1[i]
            step = scales_t[col] if scales_t is not None else row_scale
            q_int = round_half_up(w / step).clamp_(-tops[col], tops[col])
            integers_t[col] = q_int
            q = q_int.mul_(step)
            Qt[col] = q
            err = w.sub(q).div_(Hinv1[i, i])
            Err1[i] = err
            if i + 1 < i2 - i1:
                W1[i + 1:].addr_(Hinv1[i, i + 1:], err, alpha=-1.0)
        row_loss += Err1.square().sum(0, dtype=torch.float64)
        if i2 < columns:
            Wt[i2:].addmm_(hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)
    del Wt, Err1
    Q, integers = Qt.t(), integers_t.t()
    del Qt, integers_t

    if static:  # one "group" per column
        scales = column_scales
        group_index = torch.arange(columns, device=Q.device)
    elif group is None:
        scales = scale
        group_index = torch.zeros(columns, dtype=torch.long, device=Q.device)
    else:
        scales = torch.cat(group_scales, dim=1)
        group_index = torch.arange(columns, device=Q.device) // group  # in processing order
    if perm is not None:
        inverse = torch.argsort(perm)
        Q, integers, group_index = Q[:, inverse], integers[:, inverse], group_index[inverse]
        if static:
            scales, group_index = scales[:, inverse], torch.arange(columns, device=Q.device)
    return GPTQResult(Q.contiguous().to(weight.dtype), integers.contiguous(), scales, group_index, row_loss)


def _inverse_cholesky(holder: list) -> Tensor:
    """The upper Cholesky factor of ``H⁻¹`` (fp32) for the ``H`` in ``holder`` (consumed: each
    n×n matrix is dropped once used), in H's precision, retried in float64 when an fp32
    factorisation fails (a Hessian too ill-conditioned for single precision)."""
    H = holder.pop()
    for precision in (H.dtype, torch.float64) if H.dtype != torch.float64 else (H.dtype,):
        factor, info = torch.linalg.cholesky_ex(H.to(precision))
        if int(info) == 0:
            del H
            factor = torch.cholesky_inverse(factor)
            factor, info = torch.linalg.cholesky_ex(factor, upper=True)
            if int(info) == 0:
                return factor.float()
            raise ValueError("the inverse of the damped Hessian is not positive definite; raise percdamp")
        del factor
    raise ValueError("the damped Hessian is not positive definite; raise percdamp")


def gptq_quantize(weight: Tensor, hessian: Tensor, quantizer: RoundToNearest, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = False) -> Tensor:
    """The dequantized GPTQ weight (``integers · scale``); see :func:`gptq_quantize_detailed`."""
    return gptq_quantize_detailed(weight, hessian, quantizer, block_size, percdamp, act_order).weight


class LayerHessian:
    """The Hessian of the inputs a layer actually multiplies, and GPTQ of its weight against it.

    A ``SpikingLinear`` with ``rotate=True`` has its rotation folded at construction and its inputs
    rotated in :meth:`add`, so GPTQ quantizes the weight the layer multiplies. The encoder is not
    applied: H is built from the full-precision inputs, as in GPTQ. Layers that read the same
    input (q/k/v, gate/up) may share one ``accumulator``: one Hessian, accumulated once.
    """

    def __init__(self, layer: nn.Linear, accumulator: HessianAccumulator | None = None,
                 dtype: torch.dtype = torch.float64):
        self.layer = layer
        self.rotate = bool(getattr(layer, "rotate", False))
        if self.rotate:
            layer.fold_rotation()
        self.accumulator = accumulator or HessianAccumulator(layer.in_features, dtype=dtype, device=layer.weight.device)

    def add(self, x: Tensor) -> None:
        if self.rotate:
            from spikellm.ops.hadamard import hadamard_transform

            x = hadamard_transform(x.float())
        self.accumulator.add_batch(x)

    @torch.no_grad()
    def quantize(self, quantizer, release: bool = False, **kw) -> GPTQResult:
        """Overwrite the layer's weight with its GPTQ quantization (see :func:`gptq_quantize_detailed`);
        ``release``: no later layer needs this Hessian (its inverse is kept for the layers sharing it)."""
        if self.accumulator.count == 0:
            raise ValueError("GPTQ needs at least one calibration input per layer")
        prepared = self.accumulator.prepared(kw.get("percdamp", 0.01), kw.get("act_order", False), release=release)
        result = gptq_quantize_detailed(self.layer.weight, self.accumulator.hessian, quantizer, **kw, prepared=prepared)
        self.layer.weight.copy_(result.weight)
        return result


@torch.no_grad()
def gptq_layer(layer: nn.Linear, inputs: Iterable[Tensor], quantizer: RoundToNearest, **kw) -> GPTQResult:
    """Overwrite ``layer.weight`` (in place) with its GPTQ quantization on calibration ``inputs``.

    ``inputs`` are what the layer is called with (``[..., in_features]``); see :class:`LayerHessian`.
    A layer that also carries a ``weight_quantizer`` would re-quantize the result in its forward
    (RTN recomputes its scale from the GPTQ'd weights, so it need not give them back unchanged):
    give GPTQ'd layers none.
    """
    hessian = LayerHessian(layer)
    for x in inputs:
        hessian.add(x)
    return hessian.quantize(quantizer, **kw)
