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


def quantile_bound(magnitude: Tensor, gamma: float) -> Tensor:
    """Per-token clipping bound: the ``gamma`` quantile of ``magnitude`` over the last dim, kept dim.

    ``gamma == 1`` is the maximum. The quantile is the ``ceil(gamma * d)``-th smallest value (no
    interpolation), so it is one of the token's own magnitudes.
    """
    if gamma >= 1.0:
        return magnitude.amax(dim=-1, keepdim=True)
    k = max(1, min(magnitude.shape[-1], math.ceil(gamma * magnitude.shape[-1])))
    return magnitude.kthvalue(k, dim=-1, keepdim=True).values


def causal_channel_bound(magnitude: Tensor) -> Tensor:
    """Per-channel clipping bound over tokens ``[..., T, C]``: the running maximum up to each token,
    so a token's step never depends on later tokens (no leak of the future in a causal model)."""
    return magnitude.cummax(dim=-2).values


def quantize_counts(x: Tensor, step: Tensor, low, high) -> Tensor:
    """Collapsed form of every encoder: ``clamp(round_half_up(x / Δ), low, high)`` in fp32 (bounds
    ints or per-channel tensors; ``x / Δ = ±inf`` saturates). In place on its own temporaries,
    since it runs on every projection input of every training step."""
    scaled = x.float() / step
    whole = torch.floor(scaled)
    fraction = scaled.sub_(whole)  # exact, see round_half_up
    return whole.add_(fraction.ge_(0.5)).clamp_(low, high)


def ternary_spike_train(x: Tensor, step: Tensor, num_steps: int, limit=None) -> Tensor:
    """Temporal bidirectional neuron: ``[T, *x.shape]`` spikes in {-1, 0, +1} (fp32).

    The membrane starts at ``x / Δ`` (in units of the threshold). Each step it fires +1 when
    ``u >= 1/2`` or -1 when ``u < -1/2`` and subtracts what it fired (soft reset). It stops after
    T steps, or after ``limit`` spikes (an int or a per-channel tensor, for channels given fewer
    steps than T), which is what clamps the count (membrane clipping). The asymmetric comparison
    makes a tie fire towards +inf, matching :func:`round_half_up`; subtracting ±1 from the
    membrane is exact in fp32 whenever the neuron can still stop before its limit.
    """
    membrane = x.float() / step
    budget = None if limit is None or isinstance(limit, int) and limit >= num_steps else limit
    emitted = torch.zeros_like(membrane)
    spikes = []
    for _ in range(num_steps):
        fired = (membrane >= 0.5).float() - (membrane < -0.5).float()
        if budget is not None:
            fired = fired * (emitted.abs() < budget)
            emitted = emitted + fired
        membrane = membrane - fired
        spikes.append(fired)
    return torch.stack(spikes) if spikes else membrane.new_zeros((0, *x.shape))


class _LearnedStep(torch.autograd.Function):
    """LSQ: value ``n · Δ``; ∂/∂x straight through inside the window, ∂/∂Δ = ``n - x/Δ`` inside and
    ``n`` (the bound) outside, passed to the step's scale ``s`` through ``Δ = s · Δ₀``."""

    @staticmethod
    def forward(ctx, x, scale, counts, step, inside, grad_scale):
        ctx.save_for_backward(x, scale, counts, step, inside)
        ctx.grad_scale = grad_scale
        return (counts * step).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, scale, counts, step, inside = ctx.saved_tensors
        grad32 = grad.float()
        d_value_d_step = torch.where(inside, counts - x.float() / step, counts)
        # Δ = Δ₀ · |s| (clamped away from 0), so ∂Δ/∂s = Δ / s, sign included
        signed_scale = scale.detach()
        grad_scale = (grad32 * d_value_d_step * step).sum() / torch.where(
            signed_scale.abs() < 1e-4, torch.full_like(signed_scale, float("inf")), signed_scale)
        return grad * inside.to(grad.dtype), (grad_scale * ctx.grad_scale).reshape(scale.shape), None, None, None, None


def learned_step_quantize(x: Tensor, scale: Tensor, counts: Tensor, step: Tensor, inside: Tensor,
                          grad_scale: float) -> Tensor:
    """``counts · step`` exactly, with the LSQ gradient to ``scale`` (``step = scale · Δ₀``),
    multiplied by ``grad_scale`` (LSQ's ``1 / sqrt(N · Q)``)."""
    return _LearnedStep.apply(x, scale, counts, step, inside, grad_scale)


class _SurrogateSpike(torch.autograd.Function):
    """Forward: the neuron's exact firing decision; backward: the arctan surrogate derivative
    ``α/2 / (1 + (π/2 · α · d)²)`` of the distance ``d`` to the threshold (SpikingJelly's ATan)."""

    @staticmethod
    def forward(ctx, distance: Tensor, fired: Tensor, alpha: float) -> Tensor:
        ctx.save_for_backward(distance)
        ctx.alpha = alpha
        return fired

    @staticmethod
    def backward(ctx, grad: Tensor):
        (distance,) = ctx.saved_tensors
        alpha = ctx.alpha
        return grad * (alpha / 2) / (1 + (math.pi / 2 * alpha * distance) ** 2), None, None


def ternary_surrogate_value(x: Tensor, step: Tensor, num_steps: int, limit=None, alpha: float = 2.0) -> Tensor:
    """``Δ · Σ_t s_t`` of :func:`ternary_spike_train`, differentiable in ``x`` by surrogate gradients.

    The same neuron, step for step (so the value is exactly the decoded count times Δ), with each
    firing decision given the arctan surrogate derivative and the gradient flowing through the
    soft reset, as when a spiking network is trained unrolled in time.
    """
    membrane = x.float() / step
    budget = None if limit is None or isinstance(limit, int) and limit >= num_steps else limit
    emitted = torch.zeros_like(membrane)
    for _ in range(num_steps):
        up = _SurrogateSpike.apply(membrane - 0.5, (membrane >= 0.5).float(), alpha)
        down = _SurrogateSpike.apply(-0.5 - membrane, (membrane < -0.5).float(), alpha)
        fired = up - down
        if budget is not None:
            fired = fired * (emitted.detach().abs() < budget)
        emitted = emitted + fired
        membrane = membrane - fired
    return emitted * step
