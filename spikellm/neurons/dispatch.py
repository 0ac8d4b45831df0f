"""Which path computes an encoder's forward: the fused CPU encoder, PyTorch, or the Triton kernels.

Every ``*_reason`` lives here: each says why a fast path cannot compute an encoder (None when it
can). The fast paths compute ``clamp(round_half_away(x / Δ), low, high)`` with a per-token step
(given, or the bound of ``magnitude`` over ``step_levels``) and per-channel multipliers; an
encoder whose collapsed form is anything else stays on PyTorch.

The fused CPU encoder (:mod:`spikellm.ops.cpu_encode`) serves evaluation: a one-token decoding
step encodes a few hundred activations at a time, where PyTorch's ~10 small operations cost
several times the arithmetic; one C call computes the same numbers. It is taken only where it gives
exactly the PyTorch path's value and nothing else is needed:

* the collapsed form is the fused encoders' (:func:`fused_reason`);
* the input is a plain float32 CPU tensor of at most ``MAX_ELEMENTS``, needs no gradient, and is
  not being traced (``torch.jit.trace``, ``torch.compile``, ``torch.export`` need tensor operations);
* no observer (statistics, the energy counter's tally, a spike objective) watches the encoder or
  a sibling that shares its train;
* the buffers hold what the C code computes: float32 channel multipliers with counts below 2^24,
  a float32 learned step with no gradient wanted.

What depends on the encoder's attributes is planned once (:func:`_plan`, kept in the encoder until
an attribute is set); what depends on its buffers is checked on every call, since buffers change
in place (``load_state_dict``, ``.to()``, ``torch.func.functional_call``).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.nn.modules import module as registry

from spikellm.neurons import observers
from spikellm.neurons.functional import learned_step_quantize, lsq_gradient_scale
from spikellm.ops.cpu_encode import MAX_ELEMENTS, absmax_encoder, cpu_encoder, fused_encode, fused_encode_channels
from spikellm.ops.rounding import straight_through

#: the methods that define an encoder's collapsed form, as the fused encoders compute it
COLLAPSED_FORM = ("counts", "magnitude", "step_size", "_step_of", "token_step", "element_step", "count_bounds",
                  "outlier_counts", "encode", "forward")
# counts beyond this are not exact in the C code's int32 rounding nor in fp32
_MAX_COUNT = 2 ** 24


# ---- why a fast path cannot run an encoder ---------------------------------------------------
def counts_reason(encoder) -> str | None:
    """Why the encoder's collapsed form is not ``clamp(round_half_away(x / Δ), low, high)`` of its
    step, or None. An encoder that overrides a method of :data:`COLLAPSED_FORM` is left to the
    PyTorch path, unless the class that overrides it lists it in ``fused_overrides`` (as the
    contract, :class:`~spikellm.neurons.base.SpikeEncoder`, lists them all)."""
    if encoder.outlier_stream:
        return "an outlier stream beside the clipped train"
    if encoder.dead_zone > 0.5:
        return "a dead zone"
    if encoder.keep_top < 1.0:
        return "a per-token top-k"
    for name in COLLAPSED_FORM:
        owner = next(c for c in type(encoder).__mro__ if name in c.__dict__)
        if name not in owner.__dict__.get("fused_overrides", ()):
            return f"{owner.__name__} defines its own {name}()"
    return None


def static_fused_reason(encoder) -> str | None:
    """:func:`fused_reason` as far as the encoder's settings decide it (not its buffers)."""
    return "a per-channel (causal) step" if encoder.granularity != "token" else counts_reason(encoder)


def fused_reason(encoder) -> str | None:
    """Why the fused encoders (the Triton kernel and the CPU one) cannot compute the encoder's
    collapsed form, or None when they can."""
    reason = static_fused_reason(encoder)
    return "separate per-cluster steps" if reason is None and encoder.clusters_apart else reason


def kernel_reason(encoder) -> str | None:
    """Why the Triton kernels cannot run the encoder, or None: :func:`fused_reason`, and their int8 counts."""
    reason = fused_reason(encoder)
    return "counts beyond int8" if reason is None and encoder.largest_count > 127 else reason


def absmax_step(encoder) -> bool:
    """Whether the step is the plain per-token absmax over the levels (what the fused encoders
    compute by themselves); otherwise the encoder's ``token_step`` is handed to them."""
    return encoder.threshold == "bound" and encoder.gamma >= 1.0 and encoder.step_scale is None


def can_clip(encoder) -> bool:
    """Whether some activation can fall outside the window (then the straight-through gradient
    needs a mask). A per-token absmax or a causal per-channel running max covers the value itself."""
    covered = encoder.threshold == "bound" and (encoder.granularity == "channel" or encoder.gamma >= 1.0)
    return not (covered and encoder.step_scale is None and encoder.keeps_full_range)


# ---- the forwards ----------------------------------------------------------------------------
def forward(encoder, x: Tensor, siblings=()) -> Tensor:
    """``n · Δ`` in ``x.dtype`` (see :meth:`SpikeEncoder.forward`), by the fused CPU encoder where
    it may, else PyTorch with its observers told and the straight-through (or LSQ) gradient."""
    value = _fused_value(encoder, x, siblings)
    if value is not None:
        return value
    counts, step = encoder.encode(x)
    grad_mode = torch.is_grad_enabled()
    learned = encoder.step_scale
    needs_grad = grad_mode and (x.requires_grad or (learned is not None and learned.requires_grad))
    # a fresh context each time: one object entered twice around a graph break leaves torch.compile's
    # resumed code with gradients off
    with torch.no_grad() if grad_mode else contextlib.nullcontext():
        outliers = encoder.outlier_counts(x, step, counts)
    # outside no_grad: a spike objective's term carries a gradient
    observers.observe(encoder, siblings, counts, outliers, x if needs_grad else None)
    with torch.no_grad() if grad_mode else contextlib.nullcontext():
        if not needs_grad:  # evaluation: the value alone, no clipping window to keep
            total = counts.mul_(step) if outliers is None else (counts + outliers).mul_(step)
            return total.to(x.dtype)
        total = counts if outliers is None else counts + outliers
        inside = encoder.inside_window(x, step) if can_clip(encoder) else None
    if learned is None:
        return straight_through(x, total * step, inside)
    return learned_step_quantize(x, learned, total, step, inside, lsq_gradient_scale(x, encoder.max_count))


def continued(encoder, x: Tensor, previous: Tensor | None) -> tuple[Tensor, Tensor]:
    """See :meth:`SpikeEncoder.encode_continued`."""
    value = _continued_value(encoder, x, previous)
    if value is not None:
        return value
    bound = encoder.magnitude(x).amax(dim=-2, keepdim=True)
    if previous is None:
        return encoder(x), bound
    # the carried bound as a first row: the running maximum then starts from it (and that row is dropped)
    encoded = encoder(torch.cat([previous.to(x.dtype), x], dim=-2))[..., 1:, :]
    return encoded, torch.maximum(previous, bound)


# ---- the fused CPU encoder ---------------------------------------------------------------------
def takes(x: Tensor) -> bool:
    """Whether ``x`` is an input the fused CPU encoder can take in place of PyTorch."""
    return (type(x) is Tensor and x.is_cpu and x.dtype == torch.float32 and not x.requires_grad
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling() and x.numel() <= MAX_ELEMENTS)


def _plan(encoder):
    """``encode(x) -> n·Δ or None`` (None: the buffers ask for the PyTorch path on this call), or
    False where the attributes already rule the fused encoder out."""
    if encoder.observers or static_fused_reason(encoder) is not None or cpu_encoder() is None:
        return False
    levels, low, high = encoder.step_levels, encoder.min_count, encoder.max_count
    signed = low < 0
    buffers = encoder._buffers  # read on every call: buffers change in place
    plain_step = absmax_step(encoder)

    def encode(x: Tensor) -> Tensor | None:
        if not _buffers_fit(encoder):
            return None
        learned = encoder.step_scale
        if learned is not None and (learned.dtype != torch.float32
                                    or learned.requires_grad and torch.is_grad_enabled()):
            return None
        step = None if plain_step else encoder.token_step(x)
        return fused_encode(x, levels, low, high, signed=signed, step=step, channel_scale=buffers["channel_scale"],
                            want_step=False)[0]

    if not plain_step:
        return encode
    lean = absmax_encoder(levels, low, high, signed)  # the common case: one frame, one allocation

    def encode_absmax(x: Tensor) -> Tensor | None:
        return lean(x) if buffers["channel_scale"] is None else encode(x)

    return encode_absmax


def _fused_value(encoder, x: Tensor, siblings) -> Tensor | None:
    if not takes(x):
        return None
    fused = encoder.__dict__.get("_fused")
    if fused is None:
        fused = encoder.__dict__["_fused"] = _plan(encoder)
    if fused is False or any(e.observers for e in siblings):
        return None
    return fused(x)


def _continued_value(encoder, x: Tensor, previous: Tensor | None) -> tuple[Tensor, Tensor] | None:
    if not (takes(x) and x.shape[-2] == 1 and (previous is None or previous.dtype == torch.float32)):
        return None
    fused = encoder.__dict__.get("_fused_channels")
    if fused is None:
        fused = encoder.__dict__["_fused_channels"] = (
            encoder.granularity == "channel" and counts_reason(encoder) is None and encoder.step_scale is None
            and not encoder.observers and cpu_encoder() is not None)
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
