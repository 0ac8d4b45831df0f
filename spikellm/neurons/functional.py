"""Pure functions behind the spike encoders (the math, free of module state).

Every encoder has two exact forms (DESIGN.md §2): a *collapsed* form that returns the integer
spike count of each activation in one pass, and a *temporal* form that simulates the neuron step
by step and returns the spike train. The functions here are written so that the two agree
bit for bit, including ties and outliers.
"""
from __future__ import annotations

import math

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


class _StraightThrough(torch.autograd.Function):
    """Returns ``quantized`` exactly; the gradient flows to ``x`` where ``passthrough`` is set."""

    @staticmethod
    def forward(ctx, x: Tensor, quantized: Tensor, passthrough: Tensor) -> Tensor:
        ctx.save_for_backward(passthrough)
        return quantized

    @staticmethod
    def backward(ctx, grad: Tensor):
        (passthrough,) = ctx.saved_tensors
        return grad * passthrough.to(grad.dtype), None, None


def straight_through(x: Tensor, quantized: Tensor, passthrough: Tensor) -> Tensor:
    """Straight-through estimator: forward value ``quantized``, gradient ``passthrough`` ⊙ ∂x.

    Unlike ``x + (q - x).detach()`` the forward value is ``q`` exactly, so the collapsed form of a
    spiking layer computes the same numbers as its exported, integer form.
    """
    return _StraightThrough.apply(x, quantized.to(x.dtype), passthrough)


def token_clip_bound(x: Tensor, gamma: float) -> Tensor:
    """Per-token clipping bound: the ``gamma`` quantile of ``|x|`` over the last dim, kept dim.

    ``gamma == 1`` is the absolute maximum. The quantile is the ``ceil(gamma * d)``-th smallest
    value (no interpolation), so it is one of the token's own magnitudes.
    """
    magnitude = x.detach().abs().float()
    if gamma >= 1.0:
        return magnitude.amax(dim=-1, keepdim=True)
    k = max(1, min(x.shape[-1], math.ceil(gamma * x.shape[-1])))
    return magnitude.kthvalue(k, dim=-1, keepdim=True).values


def symmetric_step(x: Tensor, levels: int, gamma: float, eps: float = 1e-8) -> Tensor:
    """Per-token step Δ mapping the clipping bound onto ``levels`` (= Q) positive counts."""
    return token_clip_bound(x, gamma).clamp_min(eps) / levels


def ternary_counts(x: Tensor, step: Tensor, max_count: int) -> Tensor:
    """Collapsed bidirectional ternary encoder: ``clamp(round_half_up(x / Δ), -c, c)`` (fp32)."""
    return round_half_up(x.float() / step).clamp(-max_count, max_count)


def ternary_spike_train(x: Tensor, step: Tensor, num_steps: int) -> Tensor:
    """Temporal bidirectional neuron: ``[T, *x.shape]`` spikes in {-1, 0, +1} (fp32).

    The membrane starts at ``x / Δ`` (in units of the threshold). Each step it fires +1 when
    ``u >= 1/2`` or -1 when ``u < -1/2`` and subtracts what it fired (soft reset). After at most
    T steps it stops, which is what clamps the count to ``±T`` (membrane clipping). The asymmetric
    comparison makes a tie fire towards +inf, matching :func:`round_half_up`; subtracting ±1 from
    the membrane is exact in fp32 whenever the neuron can still stop before T.
    """
    membrane = x.float() / step
    spikes = []
    for _ in range(num_steps):
        fired = (membrane >= 0.5).float() - (membrane < -0.5).float()
        membrane = membrane - fired
        spikes.append(fired)
    return torch.stack(spikes) if spikes else membrane.new_zeros((0, *x.shape))
