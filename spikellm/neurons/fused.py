"""The evaluation fast path of an encoder: its forward by the fused CPU encoder (:mod:`spikellm.ops.cpu_encode`).

A one-token decoding step encodes a few hundred activations at a time, where PyTorch's ~10 small
operations cost several times the arithmetic; one C call computes the same numbers. It is taken
only where it gives exactly the PyTorch path's value and nothing else is needed:

* the encoder's collapsed form is the fused encoders' (:meth:`SpikeEncoder.fused_reason`: no
  per-channel causal step, no separate clusters, no method of the collapsed form overridden);
* the input is a plain float32 CPU tensor of at most ``MAX_ELEMENTS``, needs no gradient, and is
  not being traced (``torch.jit.trace``, ``torch.compile``, ``torch.export`` need tensor operations);
* nothing records (statistics, the energy counter's tally, a spike objective) on the encoder or
  on a sibling that shares its train;
* the buffers hold what the C code computes: float32 channel multipliers with counts below 2^24,
  a float32 learned step with no gradient wanted.

What depends on the encoder's attributes is planned once (:func:`plan`, kept in the encoder until
an attribute is set); what depends on its buffers is checked on every call, since buffers change
in place (``load_state_dict``, ``.to()``, ``torch.func.functional_call``).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules import module as registry

from spikellm.ops.cpu_encode import MAX_ELEMENTS, absmax_encoder, cpu_encoder, fused_encode, fused_encode_channels

# counts beyond this are not exact in the C code's int32 rounding nor in fp32
_MAX_COUNT = 2 ** 24


def takes(x: Tensor) -> bool:
    """Whether ``x`` is an input the fused CPU encoder can take in place of PyTorch."""
    return (type(x) is Tensor and x.is_cpu and x.dtype == torch.float32 and not x.requires_grad
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling() and x.numel() <= MAX_ELEMENTS)


def plan(encoder):
    """``encode(x) -> n·Δ or None`` (None: the buffers ask for the PyTorch path on this call), or
    False where the attributes already rule the fused encoder out."""
    if encoder.records() or encoder.static_fused_reason() is not None or cpu_encoder() is None:
        return False
    levels, low, high = encoder.step_levels, encoder.min_count, encoder.max_count
    signed = low < 0
    buffers = encoder._buffers  # read on every call: buffers change in place

    def encode(x: Tensor) -> Tensor | None:
        if not _buffers_fit(encoder):
            return None
        learned = encoder.step_scale
        if learned is not None and (learned.dtype != torch.float32 or learned.requires_grad and torch.is_grad_enabled()):
            return None
        step = None if encoder.absmax_step else encoder.token_step(x)
        return fused_encode(x, levels, low, high, signed=signed, step=step, channel_scale=buffers["channel_scale"],
                            want_step=False)[0]

    if not encoder.absmax_step:
        return encode
    lean = absmax_encoder(levels, low, high, signed)  # the common case: one frame, one allocation

    def encode_absmax(x: Tensor) -> Tensor | None:
        return lean(x) if buffers["channel_scale"] is None else encode(x)

    return encode_absmax


def forward_value(encoder, x: Tensor, siblings) -> Tensor | None:
    """The encoder's evaluation forward by the fused CPU encoder, or None for the PyTorch path."""
    if not takes(x):
        return None
    fused = encoder.__dict__.get("_fused")
    if fused is None:
        fused = encoder.__dict__["_fused"] = plan(encoder)
    if fused is False or (siblings and any(e.records() for e in siblings)):
        return None
    return fused(x)


def continued_value(encoder, x: Tensor, previous: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """``(n·Δ, bound)`` of one new token of a per-channel (causal) code whose running bound is
    ``previous`` by the fused CPU encoder, or None for the PyTorch path."""
    if not (takes(x) and x.shape[-2] == 1 and (previous is None or previous.dtype == torch.float32)):
        return None
    fused = encoder.__dict__.get("_fused_channels")
    if fused is None:
        fused = encoder.__dict__["_fused_channels"] = (
            encoder.granularity == "channel" and encoder.counts_reason() is None and encoder.step_scale is None
            and not encoder.records() and cpu_encoder() is not None)
    # the PyTorch path calls the encoder: hooks (the energy counter's, a user's) must see that call
    if not fused or encoder._buffers["channel_scale"] is not None or _hooked(encoder):
        return None
    return fused_encode_channels(x, previous, encoder.step_levels, encoder.min_count, encoder.max_count,
                                 signed=encoder.min_count < 0)


def _buffers_fit(encoder) -> bool:
    scale = encoder._buffers["channel_scale"]
    # the settings were checked when planned: only what the buffers decide is left
    return scale is None or (scale.dtype == torch.float32 and not encoder.clusters_apart
                             and encoder.largest_count < _MAX_COUNT)


def _hooked(module) -> bool:
    # torch keeps global module hooks in these two dicts and has no public way to ask for them
    return bool(module._forward_hooks or module._forward_pre_hooks or registry._global_forward_hooks
                or registry._global_forward_pre_hooks)
