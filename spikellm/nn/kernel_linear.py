"""The inference path of a loaded spiking checkpoint through the Triton kernels.

:func:`use_kernels` gives every eligible :class:`SpikingLinear` of a model a ``kernel_forward``:
the fused encoder turns its input into int8 counts and a per-token step, and the spike-driven
linear kernel sums ``counts × integer weights`` exactly (int32), reading the packed int4 /
ternary / int8 weights and unpacking them in registers, and applies the two scales. A
channel given ``m`` times the steps (Optimal Brain Spiking) has its counts brought to the common
step ``Δ / max m`` (``n · max m / m``, still an integer), so one per-token step remains.

Eligible: a uniform-count encoder (ternary, IF, GIF, bit-plane) on per-token steps, no outlier
stream and no separate clusters, counts within int8, and integer weights with one scale per
output channel. Others keep the float collapsed form, which computes the same function.
"""
from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import Tensor, nn

from spikellm.neurons import dispatch, observers
from spikellm.nn.spiking_linear import SpikingLinear
from spikellm.ops.hadamard import hadamard_transform

log = logging.getLogger(__name__)


def kernel_reason(layer: SpikingLinear) -> str | None:
    """Why ``layer`` cannot run on the kernels, or None when it can: the encoder says whether the
    fused encoder computes its counts (:func:`~spikellm.neurons.dispatch.kernel_reason`),
    the layer whether its weights are integers with one scale per row."""
    if layer.encoder is None:
        return "no spike encoder (a float input)"
    packed = layer.packed
    if packed is None:
        return "float weights (no integer weight format)"
    if packed.groups != 1 or packed.group_index is not None:
        return "group-wise weight scales"
    if layer.unroll:
        return "unrolled in time"
    return dispatch.kernel_reason(layer.encoder)


def kernel_eligible(layer: SpikingLinear) -> bool:
    return kernel_reason(layer) is None


def _kernel_forward(layer: SpikingLinear, x: Tensor) -> Tensor:
    from spikellm.kernels import encode_counts, spike_linear

    encoder = layer.encoder
    rows = x.reshape(-1, layer.in_features).float()
    if layer.rotate:
        rows = hadamard_transform(rows)
    given_step = None if dispatch.absmax_step(encoder) else encoder.token_step(rows).reshape(-1)
    scale = encoder.channel_scale
    counts, step, _, _ = encode_counts(rows, encoder.step_levels, encoder.min_count, encoder.max_count,
                                       signed=encoder.min_count < 0, step=given_step, channel_scale=scale)
    if encoder.observers:  # counted as the float path's spikes
        observers.observe(encoder, (), counts.float().reshape(*x.shape[:-1], layer.in_features), None)
    if scale is not None:  # one common step Δ / max m: integer counts n · max m / m
        top = scale.max()
        counts = (counts.float() * (top / scale)).to(torch.int8)
        step = step / top
    packed = layer.packed
    out = spike_linear(counts, packed.data, step.reshape(-1), packed.scales.reshape(-1), layer.bias,
                       weight_format=packed.fmt)
    return out.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)


def use_kernels(model: nn.Module) -> dict[str, bool]:
    """Route every eligible projection of ``model`` through the kernels; ``{name: routed}``."""
    routed, reasons = {}, Counter()
    for name, layer in model.named_modules():
        if not isinstance(layer, SpikingLinear):
            continue
        reason = kernel_reason(layer)
        routed[name] = reason is None
        reasons[reason] += reason is not None
        if routed[name]:
            layer.packed = layer.packed.to(layer.weight.device)
            layer.kernel_forward = _kernel_forward
    if routed and not all(routed.values()):  # say what stays on the PyTorch path, and why
        why = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common() if reason)
        log.warning("the Triton kernels run %d of %d projections; the others run in PyTorch: %s",
                    sum(routed.values()), len(routed), why)
    return routed
