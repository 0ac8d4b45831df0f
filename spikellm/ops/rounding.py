"""Exact rounding of the spike counts and weights, and the straight-through gradient that trains them.

The lowest layer's math: the encoders (``spikellm.neurons``), the weight quantizers (``spikellm.quant``)
and the kernels' PyTorch references (``spikellm.kernels``) all round here, so each
integer they produce is the same, bit for bit, whichever of them produced it.
"""
from __future__ import annotations

import torch
from torch import Tensor


def round_half_up(v: Tensor) -> Tensor:
    """``floor(v + 0.5)`` computed without rounding ``v + 0.5`` first.

    ``v + 0.5`` is itself rounded in floating point (0.49999997 + 0.5 becomes 1.0), which would
    disagree with a neuron that compares its membrane with 0.5. ``v - floor(v)`` is exact for
    every finite float, so comparing the fraction is exact.
    """
    whole = torch.floor(v)
    return whole + (v - whole >= 0.5).to(v.dtype)


def round_half_away(v: Tensor) -> Tensor:
    """``sign(v) · floor(|v| + 1/2)``: round to nearest, ties away from zero, computed exactly.

    The rounding of spike counts: symmetric, ``round_half_away(-v) == -round_half_away(v)`` also
    at ties, so a signed code fires the mirror train for the mirror input. As in
    :func:`round_half_up`, ``|v| + 0.5`` is never rounded in float: the fraction of ``|v|`` is
    compared with 1/2, and ``|v| - floor(|v|)`` is exact (``floor(|v|)`` is 0 or within a factor 2
    of ``|v|``), where ``v - floor(v)`` of a small negative ``v`` is not. No ``-0.0`` comes out;
    ±inf stay, NaN stays NaN.
    """
    magnitude = v.abs()
    whole = torch.floor(magnitude)
    whole += magnitude.sub_(whole) >= 0.5
    return whole.copysign_(v).add_(0.0)  # + 0.0: the -0.0 of a small negative becomes 0.0


class _StraightThrough(torch.autograd.Function):
    """Returns ``quantized`` exactly; the gradient flows to ``x`` where ``passthrough`` is set
    (everywhere when it is None: nothing is saved for backward then)."""

    @staticmethod
    def forward(ctx, x: Tensor, quantized: Tensor, passthrough: Tensor | None) -> Tensor:
        ctx.save_for_backward(passthrough)
        return quantized

    @staticmethod
    def backward(ctx, grad: Tensor):
        (passthrough,) = ctx.saved_tensors
        return grad if passthrough is None else grad * passthrough.to(grad.dtype), None, None


def straight_through(x: Tensor, quantized: Tensor, passthrough: Tensor | None) -> Tensor:
    """Straight-through estimator: forward value ``quantized``, gradient ``passthrough`` ⊙ ∂x.

    Unlike ``x + (q - x).detach()`` the forward value is ``q`` exactly, so the collapsed form of a
    spiking layer computes the same numbers as its exported, integer form.
    """
    return _StraightThrough.apply(x, quantized.to(x.dtype), passthrough)


def quantize_counts(x: Tensor, step: Tensor, low, high) -> Tensor:
    """Collapsed form of every encoder: ``clamp(round_half_away(x / Δ), low, high)`` in fp32 (bounds
    ints or per-channel tensors; ``x / Δ = ±inf`` saturates, NaN stays NaN). Ties go away from
    zero, so signed codes are symmetric, ``counts(-x) == -counts(x)``; unsigned codes clamp at
    ``low = 0``, where that is round half up.

    This is the hot path of every spiking forward, so it takes fewer passes than
    :func:`round_half_away` and gives the same numbers. The clamp comes first (rounding is
    monotone and the bounds are integers, so the order does not matter) and keeps ``|v| <= 2^16``.
    Then, with ``f = frac(v) = v - trunc(v)`` (exact), ``round_half_away(v) = trunc(v + f)``: ``v + f
    = trunc(v) + 2f`` moves one away from zero iff ``|f| >= 1/2``. The sum is exact while it stays in
    the binade of ``v`` (``|f| < 1/2``) and otherwise rounds on a grid no coarser than ``2 ulp(v)``,
    never up to the next integer, so no tie is lost to a rounding error. ``trunc(y)`` is taken as
    ``y - frac(y)`` (exact, and ``+0.0`` for a zero): ``torch.frac`` is vectorised on the CPU where
    ``torch.trunc`` is not (about 30x slower there)."""
    if torch.is_grad_enabled():  # integer counts have a zero derivative almost everywhere: nothing to trace
        with torch.no_grad():
            return quantize_counts(x, step, low, high)
    scaled = (x.float() / step).clamp_(low, high)
    fraction = torch.frac(scaled)
    scaled.add_(fraction)
    if torch.compiler.is_compiling():  # the same numbers; dynamo refuses out= on a strided view
        return scaled - torch.frac(scaled)
    return scaled.sub_(torch.frac(scaled, out=fraction))
