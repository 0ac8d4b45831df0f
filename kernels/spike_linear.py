"""Spike-driven linear layer: integer spike counts (or a spike train) × integer weights.

``out[m, n] = (Σ_k n[m, k] · q[n, k]) · Δ[m] · s[n] (+ bias[n])``: every product is a small
integer, so the sum is an exact integer (int32), which is what a neuromorphic core computes as
additions of weight rows selected by spikes; the two scales multiply once at the end. A spike
train ``[T, M, K]`` with integer time weights ``w_t`` (1 for rate codes, ``2^(T-1-t)`` for
bit planes) gives the same sum, ``Σ_t w_t (s_t · q)``.

Event-driven: a ``[BLOCK_M, BLOCK_K]`` tile of spikes that is all zero loads no weights and does
no work, so the work falls with the firing rate where zeros cluster (a token's quiet channels,
late time steps of a train). The kernel is exact, so it equals :func:`spike_linear_reference`
bit for bit (the int32 sum converted to fp32, then ``· Δ · s`` in that order).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from spikellm.kernels.packing import FORMATS, decode_field, packed_width


def spike_linear_reference(spikes: Tensor, weight: Tensor, step: Tensor, weight_scale: Tensor,
                           bias: Tensor | None = None, time_weights: Tensor | None = None) -> Tensor:
    """``spikes [M, K]`` counts or ``[T, M, K]`` train, ``weight [N, K]`` integers, ``step [M]``,
    ``weight_scale [N]`` → ``[M, N]`` fp32 (float64 sums of integers are exact below 2^53)."""
    if spikes.dim() == 3:
        weights = torch.ones(spikes.shape[0]) if time_weights is None else time_weights
        counts = sum(float(w) * s.double() for w, s in zip(weights.tolist(), spikes))
    else:
        counts = spikes.double()
    total = (counts @ weight.double().T).float()
    out = total * step.reshape(-1, 1).float() * weight_scale.reshape(1, -1).float()
    return out if bias is None else out + bias.float()


@triton.jit
def _weight_tile(w_ptr, rk, rn, K, N, packed_cols, PER_BYTE: tl.constexpr, SIGNED_NIBBLE: tl.constexpr):
    """``[BLOCK_K, BLOCK_N]`` int8 weights, unpacked in registers from the packed rows."""
    w_mask = (rk[:, None] < K) & (rn[None, :] < N)
    if PER_BYTE == 1:
        return tl.load(w_ptr + rn[None, :] * packed_cols + rk[:, None], mask=w_mask, other=0)
    byte = tl.load(w_ptr + rn[None, :] * packed_cols + rk[:, None] // PER_BYTE, mask=w_mask, other=0).to(tl.int32)
    return tl.where(w_mask, decode_field(byte, rk[:, None], PER_BYTE, SIGNED_NIBBLE), 0).to(tl.int8)


@triton.jit
def _spike_linear_kernel(s_ptr, w_ptr, tw_ptr, step_ptr, ws_ptr, b_ptr, out_ptr, M, N, K, T, packed_cols,
                         PER_BYTE: tl.constexpr, SIGNED_NIBBLE: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for t in range(0, T):
        time_weight = tl.load(tw_ptr + t)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            s_mask = (rm[:, None] < M) & (rk[None, :] < K)
            s = tl.load(s_ptr + t * M * K + rm[:, None] * K + rk[None, :], mask=s_mask, other=0)
            if tl.max(tl.max(tl.abs(s.to(tl.int32)), axis=1), axis=0) != 0:  # event-driven: skip silent tiles
                w = _weight_tile(w_ptr, rk, rn, K, N, packed_cols, PER_BYTE, SIGNED_NIBBLE)
                acc += tl.dot(s, w, out_dtype=tl.int32) * time_weight
    step = tl.load(step_ptr + rm, mask=rm < M, other=0.0)
    scale = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    out = acc.to(tl.float32) * step[:, None] * scale[None, :]
    if HAS_BIAS:
        out = out + tl.load(b_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], out, mask=(rm[:, None] < M) & (rn[None, :] < N))


def spike_linear(spikes: Tensor, weight: Tensor, step: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
                 time_weights: Tensor | None = None, weight_format: str = "int8", block_m: int = 16,
                 block_n: int = 64, block_k: int = 64) -> Tensor:
    """The spike-driven linear as a Triton kernel (see the module docstring).

    Args:
        spikes: int8 counts ``[M, K]`` or an int8 train ``[T, M, K]`` (values in [-127, 127]).
        weight: integer weights ``[N, K]`` as int8 (``weight_format="int8"``), or packed by
            :func:`~spikellm.kernels.pack_weights` (``"int4"``, ``"ternary"``; uint8 ``[N, ⌈K/per byte⌉]``),
            unpacked tile by tile in registers: the packed bytes are all that is read from memory.
        step: ``[M]`` per-token step Δ; weight_scale: ``[N]`` per-output-channel scale.
        bias: optional ``[N]``; time_weights: int ``[T]`` for a train (default all ones).

    Returns:
        ``[M, N]`` fp32, equal to :func:`spike_linear_reference`.
    """
    train = spikes if spikes.dim() == 3 else spikes.unsqueeze(0)
    if weight_format not in FORMATS:
        raise ValueError(f"unknown weight format {weight_format!r}; one of {', '.join(FORMATS)}")
    expected = torch.int8 if weight_format == "int8" else torch.uint8
    if train.dtype != torch.int8 or weight.dtype != expected:
        raise TypeError(f"spike_linear takes int8 spikes and {expected} {weight_format} weights, "
                        f"got {train.dtype} and {weight.dtype}")
    steps, m, k = train.shape
    n = weight.shape[0]
    if weight.shape[1] != packed_width(k, weight_format):
        raise ValueError(f"spikes have {k} channels but the {weight_format} weight {tuple(weight.shape)} "
                         f"holds {weight.shape[1]} bytes per row, not {packed_width(k, weight_format)}")
    tw = (torch.ones(steps) if time_weights is None else time_weights).to(device=train.device, dtype=torch.int32)
    out = torch.empty(m, n, dtype=torch.float32, device=train.device)
    step = step.reshape(-1).float().contiguous()
    weight_scale = weight_scale.reshape(-1).float().contiguous()
    bias_arg = bias.float().contiguous() if bias is not None else weight_scale
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _spike_linear_kernel[grid](train.contiguous(), weight.contiguous(), tw, step, weight_scale, bias_arg, out,
                               m, n, k, steps, weight.shape[1], PER_BYTE=FORMATS[weight_format],
                               SIGNED_NIBBLE=weight_format == "int4", HAS_BIAS=bias is not None, BLOCK_M=block_m,
                               BLOCK_N=block_n, BLOCK_K=block_k,
                               # no fused multiply-add in the epilogue, so the bias sum rounds as the reference's
                               enable_fp_fusion=False)
    return out
