"""Pure functions behind the spike encoders (the math, free of module state).

Every encoder has two exact forms (DESIGN.md §2): a *collapsed* form that returns the integer
spike count of each activation in one pass, and a *temporal* form that simulates the neuron step
by step and returns the spike train. The functions here are written so that the two agree
bit for bit, including ties and outliers.

The rounding of the collapsed form, :func:`~spikellm.ops.rounding.quantize_counts`, lives in
:mod:`spikellm.ops.rounding`, which the weight quantizers and the kernels share.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from spikellm.errors import ConfigError


def quantile_bound(magnitude: Tensor, gamma: float) -> Tensor:
    """Per-token clipping bound: the ``gamma`` quantile of ``magnitude`` over the last dim, kept dim.

    ``gamma == 1`` is the maximum. The quantile is the ``ceil(gamma * d)``-th smallest value (no
    interpolation), so it is one of the token's own magnitudes. A token whose quantile is 0 (at
    least ``ceil(gamma * d)`` of its entries exactly zero: ReLU-sparse inputs such as OPT's fc2 or
    RWKV's, or inputs after activation sparsification) takes its maximum instead, as with ``gamma = 1``:
    a zero bound would give a vanishing step and saturate every non-zero at ``±Q``, while the
    maximum fits them all. An all-zero token keeps the bound 0 (the step is floored, its counts 0).
    """
    absmax = magnitude.amax(dim=-1, keepdim=True)
    if gamma >= 1.0:
        return absmax
    k = max(1, min(magnitude.shape[-1], math.ceil(gamma * magnitude.shape[-1])))
    above = magnitude.shape[-1] - k + 1  # the k-th smallest is the smallest of the `above` largest
    if above <= magnitude.shape[-1] // 8:  # a high quantile: a partial top-k is 2-7x faster than kthvalue
        quantile = magnitude.topk(above, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    else:
        quantile = magnitude.kthvalue(k, dim=-1, keepdim=True).values
    return torch.where(quantile == 0, absmax, quantile)


def causal_channel_bound(magnitude: Tensor) -> Tensor:
    """Per-channel clipping bound over tokens ``[..., T, C]``: the running maximum up to each token,
    so a token's step never depends on later tokens (no leak of the future in a causal model)."""
    return magnitude.cummax(dim=-2).values


def check_threshold_options(granularity: str, threshold: str, gamma: float) -> None:
    """Refuse the combinations of threshold options that would silently do something else."""
    if granularity == "channel" and (gamma < 1.0 or threshold != "bound"):
        raise ConfigError("gamma" if gamma < 1.0 else "threshold", gamma if gamma < 1.0 else threshold,
                          "granularity=channel takes the causal running max per channel; it has no γ-quantile "
                          "or mean threshold: use gamma=1.0, threshold=bound")
    if threshold == "mean" and gamma < 1.0:
        raise ConfigError("gamma", gamma, "threshold=mean sets Δ = mean(|x|)/threshold_k and has no clipping "
                          "quantile: use gamma=1.0 with it")


def dynamic_step(magnitude: Tensor, threshold: str, threshold_k: float, granularity: str, gamma: float,
                 step_levels: int) -> Tensor:
    """The dynamic step Δ of ``magnitude`` (fp32): ``mean(|x|) / k`` per token (``threshold="mean"``),
    or a bound over ``step_levels``: the γ-quantile per token, or the causal running max per channel."""
    if threshold == "mean":
        step = magnitude.mean(dim=-1, keepdim=True).clamp_min_(1e-8)
        return step if threshold_k == 1.0 else step / threshold_k  # / 1 is exact: skip it
    bound = causal_channel_bound(magnitude) if granularity == "channel" else quantile_bound(magnitude, gamma)
    return bound.clamp_min(1e-8) / step_levels


def lsq_gradient_scale(x: Tensor, max_count: int) -> float:
    """LSQ's ``g = 1 / sqrt(N_F · Q_P)``, ``N_F`` the features of one example (Esser et al.:
    "the number of features in a layer"): one sequence's ``x[0].numel()``, so the scale does
    not shrink with the batch size; ``Q_P`` the top count."""
    features = x[0].numel() if x.dim() > 1 else x.numel()
    return 1.0 / math.sqrt(max(1, features) * max(1, max_count))


def _ternary_decisions(membrane: Tensor, emitted: Tensor) -> tuple[Tensor, Tensor]:
    """The ternary neuron's firing decisions for this step, fp32 0/1 ``(up, down)``: the thresholds
    ``±1/2``, both inclusive, and the polarity lock (no spike against the sign already emitted)."""
    return ((membrane >= 0.5) & (emitted >= 0)).float(), ((membrane <= -0.5) & (emitted <= 0)).float()


def ternary_spike_train(x: Tensor, step: Tensor, num_steps: int, limit=None) -> Tensor:
    """Temporal bidirectional neuron: ``[T, *x.shape]`` spikes in {-1, 0, +1} (fp32).

    The membrane starts at ``u = x / Δ`` (in units of the threshold). Each step it fires +1 when
    ``u >= 1/2`` or -1 when ``u <= -1/2`` and subtracts what it fired (soft reset). The polarity
    is locked by the first spike: a neuron that has fired +1 never fires -1 within the train, and
    the other way round (its emitted count never changes sign), so the residual ``∓1/2`` a tie
    leaves behind does not fire back. Both thresholds inclusive and the lock make the count
    ``sign(u) · floor(|u| + 1/2)``, :func:`~spikellm.ops.rounding.round_half_away`: the mirror input fires the mirror
    train. It stops after T steps, or after ``limit`` spikes (an int or a per-channel tensor, for
    channels given fewer steps than T), which is what clamps the count (membrane clipping).
    Subtracting ±1 from the membrane is exact in fp32 whenever the neuron can still stop before
    its limit (``|u| < 2^24``); beyond, it fires every step up to its limit, as the count
    saturates. A NaN membrane never fires.
    """
    membrane = x.float() / step
    budget = None if limit is None or isinstance(limit, int) and limit >= num_steps else limit
    emitted = torch.zeros_like(membrane)
    spikes = []
    for _ in range(num_steps):
        up, down = _ternary_decisions(membrane, emitted)
        fired = up - down
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
    soft reset, as when a spiking network is trained unrolled in time. The polarity lock gates the
    firing only: a locked threshold still passes its surrogate derivative, as one not reached
    does (the gradient differs from an unlocked neuron's only at exact ties); a spent spike budget
    stops both.
    """
    membrane = x.float() / step
    budget = None if limit is None or isinstance(limit, int) and limit >= num_steps else limit
    emitted = torch.zeros_like(membrane)
    for _ in range(num_steps):
        up, down = _ternary_decisions(membrane.detach(), emitted.detach())
        fired = _SurrogateSpike.apply(membrane - 0.5, up, alpha) - _SurrogateSpike.apply(-0.5 - membrane, down, alpha)
        if budget is not None:
            fired = fired * (emitted.detach().abs() < budget)
        emitted = emitted + fired
        membrane = membrane - fired
    return emitted * step
