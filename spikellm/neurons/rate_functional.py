"""Pure functions behind the rate, GIF and bit-plane encoders (DESIGN.md §3.1, §3.3, §3.4).

All three share one collapsed form, a uniform quantizer onto ``0..2^b-1`` (unsigned) or
``±(2^(b-1)-1)`` (signed), and differ only in how the count is fired over time. Their temporal
forms charge the neuron with the integer count ``n`` (float → integer count → spike train, the
two-step encoding of SDLLM; on hardware the membrane is an integer register). Every membrane
value is then an integer below ``2^17``, exact in fp32, so ``decode(train) == n`` holds bit for
bit for every finite input, ties and outliers included, without depending on float summation.
"""
from __future__ import annotations

import torch
from torch import Tensor



def count_limit(bits: int, signed: bool) -> int:
    """Largest count magnitude: ``2^(b-1) - 1`` signed (symmetric, one bit is the sign), else ``2^b - 1``."""
    return 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1


def if_neuron_soft_reset(currents: Tensor, threshold: float | Tensor) -> Tensor:
    """Integrate-and-fire neuron with soft reset, ``[T, ...]`` currents → ``[T, ...]`` {0, 1} spikes.

    SpikingJelly ``IFNode(v_reset=None)`` semantics, membrane starting at 0:
    ``H[t] = V[t-1] + X[t]``; ``S[t] = H[t] >= v_th``; ``V[t] = H[t] - S[t] · v_th``.
    """
    spikes = currents.new_empty(currents.shape)
    membrane = currents.new_zeros(currents.shape[1:])
    for t, current in enumerate(currents):
        charged = membrane + current
        spikes[t] = (charged >= threshold).to(currents.dtype)
        membrane = charged - spikes[t] * threshold
    return spikes


def if_spike_train(counts: Tensor, num_steps: int) -> Tensor:
    """Rate-coded IF train of integer ``counts`` (``|n| <= T``): ``[T, *counts.shape]`` in {-1, 0, 1}.

    A constant current ``|n|`` per step against threshold ``T`` (current ``n/T`` in threshold
    units, scaled by T so every membrane value is an integer below ``2T``) fires exactly ``|n|``
    evenly spread spikes: ``S[t] = floor((t+1)|n|/T) - floor(t|n|/T)``. Signed counts use two such
    neurons, a positive and a negative channel, of which at most one is charged: ``sign(n) · S``.
    """
    current = counts.abs().expand(num_steps, *counts.shape)
    return counts.sign() * if_neuron_soft_reset(current, float(num_steps))


def gif_spike_train(counts: Tensor, levels: int, num_steps: int) -> Tensor:
    """Generalized IF (SpikeLLM): ``[T, *counts.shape]`` multi-level spikes in ``-(L-1)..L-1``.

    The membrane starts at the count; each step fires ``clamp(u, -(L-1), L-1)`` and subtracts what
    it fired, so ``T = ceil(|n|_max / (L-1))`` steps empty it whenever ``T · (L-1) >= |n|``.
    """
    top = levels - 1
    membrane = counts.clone()
    spikes = counts.new_zeros((num_steps, *counts.shape))
    for t in range(num_steps):
        spikes[t] = membrane.clamp(-top, top)
        membrane = membrane - spikes[t]
    return spikes


def gif_spikes_per_count(counts: Tensor, levels: int) -> Tensor:
    """Non-zero GIF spikes of a count: ``ceil(|n| / (L-1))`` (every spike but the last is full).

    In float, which is exact for ``|n| < 2^24``: a correctly rounded ``a / b`` of integers below
    2^24 lands on the integer ``k`` only when the quotient is ``k`` (a non-integer quotient is at
    least ``1/b`` from every integer, more than half an ulp), and it runs at the speed of one
    division where an integer floor division is about 40x slower on the CPU. NaN stays NaN."""
    return counts.abs().div_(levels - 1).ceil_()


def bitplane_weights(num_steps: int) -> Tensor:
    """MSB-first plane weights ``2^(T-1-t)``, ``[T]`` fp32."""
    return 2.0 ** torch.arange(num_steps - 1, -1, -1, dtype=torch.float32)


def bitplane_spike_train(counts: Tensor, num_steps: int) -> Tensor:
    """Bit planes of ``|n| < 2^T``, MSB first, carrying the sign: ``[T, *counts.shape]`` in {-1, 0, 1}.

    A neuron whose threshold halves every step: it fires when ``u >= 2^(T-1-t)`` and subtracts
    that threshold, which reads out the binary digits of the count.
    """
    magnitude = counts.abs()
    spikes = counts.new_zeros((num_steps, *counts.shape))
    for t, weight in enumerate(bitplane_weights(num_steps).tolist()):
        fired = (magnitude >= weight).to(counts.dtype)
        magnitude = magnitude - fired * weight
        spikes[t] = counts.sign() * fired
    return spikes


def popcount(counts: Tensor, bits: int = 24) -> Tensor:
    """Set bits of ``|n|`` for integer-valued float counts with ``|n| < 2^bits`` (``bits <= 24``),
    in ``counts.dtype``: ``popcount(a) = a - Σ_{k=1}^{bits-1} floor(a / 2^k)`` (each halving
    drops one copy of every bit above the lowest). Every operation is exact on integers below
    2^24 and vectorised, where int64 bit twiddling is about 10x slower on the CPU; give ``bits``
    (the code's bit length) to take ``bits - 1`` halvings instead of 23. NaN stays NaN."""
    magnitude = counts.abs()
    result = magnitude.clone()
    halved = torch.empty_like(magnitude)
    for k in range(1, max(1, min(bits, 24))):
        result.sub_(torch.mul(magnitude, 2.0 ** -k, out=halved).floor_())
    return result
