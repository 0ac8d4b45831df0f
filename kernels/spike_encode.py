"""Fused spike encoder: activations → integer counts, the per-token step and firing statistics in
one pass over ``x`` (DESIGN.md §2: the collapsed form every encoder shares).

Every uniform-count encoder (ternary, IF, GIF, bit-plane) computes
``n = clamp(round_half_away(x / Δ), low, high)`` (ties away from zero, so signed counts are
symmetric) with ``Δ = bound / levels`` per token; the bound is the token's ``max|x|`` (signed) or
``max(relu(x))`` (unsigned). With a per-channel step multiplier ``m`` (Optimal Brain Spiking) a
channel uses ``Δ/m`` and bounds ``m·low, m·high``. The kernel computes exactly
:func:`encode_counts_reference` (the library's own arithmetic: the fraction test of
``round_half_away`` on ``|x / Δ|``), so the counts are equal, not close.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def encode_counts_reference(x: Tensor, levels: int, low: int, high: int, signed: bool = True,
                            step: Tensor | None = None, channel_scale: Tensor | None = None):
    """``(counts [M, K] fp32, step [M, 1], count mass Σ|n| [M], non-zero counts [M])`` for ``x [M, K]``."""
    from spikellm.ops.cpu_encode import encode_reference

    _, counts, step = encode_reference(x, levels, low, high, signed, None if step is None else step.reshape(-1, 1).float(),
                                       channel_scale)
    return counts, step, counts.abs().sum(-1), (counts != 0).sum(-1).float()


@triton.jit
def _encode_kernel(x_ptr, step_ptr, scale_ptr, counts_ptr, mass_ptr, nonzero_ptr, n_cols, low, high, levels,
                   HAS_STEP: tl.constexpr, SIGNED: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_STEP:
        step = tl.load(step_ptr + row)
    else:
        if SIGNED:
            magnitude = tl.abs(x)
        else:
            magnitude = tl.maximum(x, 0.0)
        # tl.div_rn, not `/`: on CUDA `/` is div.full.f32 (up to 2 ulp), and a count that sits on a
        # rounding boundary would then differ from the PyTorch reference
        step = tl.div_rn(tl.maximum(tl.max(magnitude, axis=0), 1e-8), levels)
        tl.store(step_ptr + row, step)
    lo = tl.zeros([BLOCK], dtype=tl.float32) + low
    hi = tl.zeros([BLOCK], dtype=tl.float32) + high
    element_step = tl.zeros([BLOCK], dtype=tl.float32) + step
    if HAS_SCALE:
        scale = tl.load(scale_ptr + cols, mask=inside, other=1.0)
        element_step = tl.div_rn(element_step, scale)
        lo = lo * scale
        hi = hi * scale
    scaled = tl.div_rn(x, element_step)
    # round half away from zero on |x / Δ|, whose fraction is exact (see round_half_away)
    magnitude = tl.abs(scaled)
    whole = tl.floor(magnitude)
    rounded = whole + ((magnitude - whole) >= 0.5).to(tl.float32)
    counts = tl.where(scaled < 0, -rounded, rounded)
    counts = tl.minimum(tl.maximum(counts, lo), hi)
    counts = tl.where(inside, counts, 0.0)
    tl.store(counts_ptr + row * n_cols + cols, counts.to(counts_ptr.dtype.element_ty), mask=inside)
    tl.store(mass_ptr + row, tl.sum(tl.abs(counts), axis=0))
    tl.store(nonzero_ptr + row, tl.sum((counts != 0).to(tl.float32), axis=0))


def encode_counts(x: Tensor, levels: int, low: int, high: int, signed: bool = True, step: Tensor | None = None,
                  channel_scale: Tensor | None = None):
    """The fused encoder: ``x [M, K]`` → ``(counts [M, K], step [M, 1] fp32, Σ|n| [M], non-zeros [M])``.

    ``counts`` are int8 when every bound fits in int8, else int32. ``step`` given: used as is (a
    γ-quantile or learned step computed by the encoder); None: the absmax step, in the kernel.
    One program per row, the whole row in one block (K ≤ 65,536).
    """
    if x.dim() != 2:
        raise ValueError(f"encode_counts takes x [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    biggest = max(abs(low), abs(high)) * (1 if channel_scale is None else int(channel_scale.max()))
    dtype = torch.int8 if biggest <= 127 else torch.int32
    x = x.contiguous()
    counts = torch.empty(m, k, dtype=dtype, device=x.device)
    step_out = (torch.empty(m, dtype=torch.float32, device=x.device) if step is None
                else step.reshape(-1).float().contiguous())
    mass = torch.empty(m, dtype=torch.float32, device=x.device)
    nonzero = torch.empty(m, dtype=torch.float32, device=x.device)
    scale = channel_scale.float().contiguous() if channel_scale is not None else step_out
    _encode_kernel[(m,)](x, step_out, scale, counts, mass, nonzero, k, float(low), float(high), float(levels),
                         HAS_STEP=step is not None, SIGNED=signed, HAS_SCALE=channel_scale is not None,
                         BLOCK=triton.next_power_of_2(k))
    return counts, step_out.reshape(-1, 1), mass, nonzero
