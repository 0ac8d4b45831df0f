"""Gated linear recurrence of the MatMul-free LM's MLGRU token mixer: ``h_t = f_t ⊙ h_{t-1} + x_t``.

The MLGRU (Zhu et al., "Scalable MatMul-free Language Modeling") mixes tokens with
``f_t = σ(W_f x_t)``, ``c_t = SiLU(W_c x_t)`` and ``h_t = f_t ⊙ h_{t-1} + (1 - f_t) ⊙ c_t``; the
caller forms ``x_t = (1 - f_t) ⊙ c_t``, so what is left is a diagonal (elementwise) linear
recurrence over ``[B, T, D]``: every channel of every sequence is an independent scalar scan.
Gradients are a scan in reverse, with ``g_t = ∂L/∂h_t`` (the upstream state gradient plus what
flows back from ``h_{t+1}``)::

    g_T = dstates_T + dfinal,   g_t = dstates_t + f_{t+1} g_{t+1}
    d inputs_t = g_t,   d forget_t = g_t ⊙ h_{t-1},   d initial = f_1 ⊙ g_1     (h_0 = initial)

Shape of the kernel: one program per (sequence, block of channels) walks the T steps in order
with the state in fp32 registers. Each element of ``f`` and ``x`` is read once and each state
written once, which is the least memory traffic the scan can have, and it is memory traffic
that bounds it (two flops per element). Channels are the parallel axis; the only serial part
is the chain of T dependent multiply-adds per program, a few cycles each, since the loads of a
step do not depend on the state and can be issued ahead. A parallel (associative) scan over T,
with ``(f₂, x₂)∘(f₁, x₁) = (f₂f₁, f₂x₁ + x₂)``, would take log T passes or a second chunk pass
and extra reads and writes; it pays only when B·D/BLOCK programs are too few to occupy the GPU
*and* T is long. For the models here (D of a few hundred to a couple of thousand channels,
B·D in the thousands, T up to a few thousand) the sequential scan is launch- and
bandwidth-bound already, and at token-by-token inference T = 1 and there is nothing to
parallelise over time at all; the carried state (``final``, kept in fp32) makes chunked runs
equal to one run over the whole sequence.

Two implementations with one contract: :func:`linear_recurrence_reference`, the PyTorch path used
on CPU (a loop over T inside an autograd Function whose backward is the reverse scan, so memory
does not grow with T autograd nodes), and :func:`linear_recurrence`, the Triton kernels.
:func:`recurrence` picks the kernel for CUDA tensors and the reference otherwise.

The integer variant, :func:`fixed_point_recurrence` (kernel) and
:func:`fixed_point_recurrence_reference`, is the hardware-aware (Loihi-style fixed-point) form:
int32 states and inputs, an unsigned gate with ``frac_bits`` fractional bits (``0 … 2^frac_bits``
stands for 0 … 1), the product in int64 and shifted back with rounding half up::

    h_t = sat32(((f_t · h_{t-1} + 2^(frac_bits-1)) >> frac_bits) + x_t)

where ``>>`` is the arithmetic (flooring) shift and ``sat32`` saturates to the int32 range, as a
fixed-point accumulator does. Kernel and reference are equal bit for bit. With a gate ≤ 1 each
step's rounding error is at most half a unit of the last place and is damped by later gates, so
after t steps ``|h_t - h_t^exact| ≤ t/2`` units.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def _check_shapes(name: str, forget: Tensor, inputs: Tensor, initial: Tensor | None) -> tuple[int, int, int]:
    if forget.dim() != 3 or inputs.dim() != 3:
        raise ValueError(f"{name} takes forget and inputs [B, T, D], got shapes {tuple(forget.shape)} "
                         f"and {tuple(inputs.shape)}")
    if forget.shape != inputs.shape:
        raise ValueError(f"{name}: forget {tuple(forget.shape)} and inputs {tuple(inputs.shape)} "
                         f"must have the same shape [B, T, D]")
    b, t, d = inputs.shape
    if 0 in (b, t, d):
        raise ValueError(f"{name} needs B, T, D ≥ 1, got inputs of shape {tuple(inputs.shape)}")
    if initial is not None and tuple(initial.shape) != (b, d):
        raise ValueError(f"{name}: initial must be [B, D] = {(b, d)} for inputs {tuple(inputs.shape)}, "
                         f"got {tuple(initial.shape)}")
    tensors = [forget, inputs] + ([] if initial is None else [initial])
    if any(x.device != inputs.device for x in tensors):
        raise ValueError(f"{name}: forget, inputs and initial must be on one device, got "
                         f"{', '.join(str(x.device) for x in tensors)}")
    return b, t, d


def _check_float(name: str, forget: Tensor, inputs: Tensor, initial: Tensor | None) -> tuple[int, int, int]:
    shape = _check_shapes(name, forget, inputs, initial)
    for label, x in (("forget", forget), ("inputs", inputs), ("initial", initial)):
        if x is not None and not x.is_floating_point():
            raise TypeError(f"{name} takes floating-point tensors, got {label} of dtype {x.dtype}")
    return shape


# ---- float recurrence: PyTorch reference ------------------------------------------------------

def _linear_recurrence_loop(forget: Tensor, inputs: Tensor, initial: Tensor | None = None):
    """The recurrence as a plain loop, differentiated by autograd node by node (tests only)."""
    f, x = forget.float(), inputs.float()
    h = x.new_zeros(x.shape[0], x.shape[2]) if initial is None else initial.float()
    states = []
    for t in range(x.shape[1]):
        h = f[:, t] * h + x[:, t]
        states.append(h)
    return torch.stack(states, 1).to(inputs.dtype), h


class _ReferenceScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forget, inputs, initial):
        f, x = forget.float(), inputs.float()
        h = x.new_zeros(x.shape[0], x.shape[2]) if initial is None else initial.float()
        states = torch.empty_like(x)
        for t in range(x.shape[1]):
            h = f[:, t] * h + x[:, t]
            states[:, t] = h
        ctx.dtypes = forget.dtype, inputs.dtype, None if initial is None else initial.dtype
        ctx.save_for_backward(forget, states, initial)
        return states.to(inputs.dtype), h

    @staticmethod
    def backward(ctx, dstates, dfinal):
        forget, states, initial = ctx.saved_tensors
        forget_dtype, inputs_dtype, initial_dtype = ctx.dtypes
        f, dstates = forget.float(), dstates.float()
        g = dfinal.float()
        dforget, dinputs = torch.empty_like(states), torch.empty_like(states)
        for t in range(states.shape[1] - 1, -1, -1):
            g = g + dstates[:, t]
            dinputs[:, t] = g
            if t > 0:
                dforget[:, t] = g * states[:, t - 1]
            elif initial is not None:
                dforget[:, t] = g * initial.float()
            else:
                dforget[:, t] = 0.0
            g = g * f[:, t]
        dinitial = None if initial is None else g.to(initial_dtype)
        return dforget.to(forget_dtype), dinputs.to(inputs_dtype), dinitial


def linear_recurrence_reference(forget: Tensor, inputs: Tensor, initial: Tensor | None = None
                                ) -> tuple[Tensor, Tensor]:
    """``h_t = f_t ⊙ h_{t-1} + x_t`` in PyTorch: a loop over T in fp32, its backward the reverse scan.

    Args:
        forget: gates ``f [B, T, D]`` (fp32, fp16 or bf16).
        inputs: ``x [B, T, D]``, the same shape (the MLGRU passes ``(1 - f) ⊙ c``).
        initial: ``h_0 [B, D]``, any float dtype, or None for zeros.

    Returns:
        ``(states [B, T, D] in inputs.dtype, final [B, D] fp32)``: the final state stays in fp32
        so that it can be passed back as ``initial`` for the next chunk without losing precision.
        Differentiable in all three arguments.
    """
    _check_float("linear_recurrence_reference", forget, inputs, initial)
    return _ReferenceScan.apply(forget, inputs, initial)


# ---- float recurrence: Triton -----------------------------------------------------------------

@triton.jit
def _scan_forward_kernel(f_ptr, x_ptr, h0_ptr, states_ptr, final_ptr, T, D,
                         HAS_INITIAL: tl.constexpr, BLOCK: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < D
    if HAS_INITIAL:
        h = tl.load(h0_ptr + seq * D + cols, mask=inside, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK], dtype=tl.float32)
    offsets = seq * T * D + cols
    for _ in range(0, T):
        # fp32 right after the load: the interpreter's bf16 arithmetic is not IEEE
        f = tl.load(f_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        h = f * h + x
        tl.store(states_ptr + offsets, h.to(states_ptr.dtype.element_ty), mask=inside)
        offsets += D
    tl.store(final_ptr + seq * D + cols, h, mask=inside)


@triton.jit
def _scan_backward_kernel(f_ptr, states_ptr, h0_ptr, dstates_ptr, dfinal_ptr, df_ptr, dx_ptr, dh0_ptr, T, D,
                          HAS_INITIAL: tl.constexpr, BLOCK: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < D
    g = tl.load(dfinal_ptr + seq * D + cols, mask=inside, other=0.0).to(tl.float32)
    offsets = seq * T * D + (T - 1) * D + cols
    for _ in range(0, T - 1):  # steps T-1 … 1, whose previous state is a stored state
        g += tl.load(dstates_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offsets, g.to(dx_ptr.dtype.element_ty), mask=inside)
        previous = tl.load(states_ptr + offsets - D, mask=inside, other=0.0).to(tl.float32)
        tl.store(df_ptr + offsets, (g * previous).to(df_ptr.dtype.element_ty), mask=inside)
        g = g * tl.load(f_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        offsets -= D
    # step 0: the previous state is the initial one
    g += tl.load(dstates_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offsets, g.to(dx_ptr.dtype.element_ty), mask=inside)
    if HAS_INITIAL:
        previous = tl.load(h0_ptr + seq * D + cols, mask=inside, other=0.0).to(tl.float32)
    else:
        previous = tl.zeros([BLOCK], dtype=tl.float32)
    tl.store(df_ptr + offsets, (g * previous).to(df_ptr.dtype.element_ty), mask=inside)
    if HAS_INITIAL:
        g = g * tl.load(f_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(dh0_ptr + seq * D + cols, g.to(dh0_ptr.dtype.element_ty), mask=inside)


def _launch(d: int, block_d: int):
    if block_d < 1 or block_d & (block_d - 1):
        raise ValueError(f"block_d must be a power of two, got {block_d}")
    block = min(triton.next_power_of_2(d), block_d)
    return block, max(1, min(4, block // 32))


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forget, inputs, initial, block_d):
        b, t, d = inputs.shape
        forget, inputs = forget.contiguous(), inputs.contiguous()
        initial = None if initial is None else initial.contiguous()
        states = torch.empty_like(inputs)
        final = torch.empty(b, d, dtype=torch.float32, device=inputs.device)
        block, warps = _launch(d, block_d)
        _scan_forward_kernel[(b, triton.cdiv(d, block))](
            forget, inputs, final if initial is None else initial, states, final, t, d,
            HAS_INITIAL=initial is not None, BLOCK=block, num_warps=warps,
            # no fused multiply-add: the same roundings as the reference's f * h + x
            enable_fp_fusion=False)
        ctx.block_d = block_d
        ctx.save_for_backward(forget, states, initial)
        return states, final

    @staticmethod
    def backward(ctx, dstates, dfinal):
        forget, states, initial = ctx.saved_tensors
        b, t, d = states.shape
        dforget = torch.empty_like(forget)
        dinputs = torch.empty_like(states)
        dinitial = None if initial is None else torch.empty_like(initial)
        block, warps = _launch(d, ctx.block_d)
        _scan_backward_kernel[(b, triton.cdiv(d, block))](
            forget, states, dforget if initial is None else initial, dstates.contiguous(), dfinal.contiguous(),
            dforget, dinputs, dforget if dinitial is None else dinitial, t, d,
            HAS_INITIAL=initial is not None, BLOCK=block, num_warps=warps, enable_fp_fusion=False)
        return dforget, dinputs, dinitial, None


def linear_recurrence(forget: Tensor, inputs: Tensor, initial: Tensor | None = None, *, block_d: int = 128
                      ) -> tuple[Tensor, Tensor]:
    """``h_t = f_t ⊙ h_{t-1} + x_t`` as Triton kernels (forward scan, reverse-scan backward).

    Args:
        forget: gates ``f [B, T, D]`` (fp32, fp16 or bf16; made contiguous).
        inputs: ``x [B, T, D]``, the same shape (its own float dtype).
        initial: ``h_0 [B, D]``, any float dtype, or None for zeros.
        block_d: channels per program (a power of two, capped at the next power of two ≥ D);
            the grid is ``(B, ⌈D / block⌉)`` and each program loops over the T steps.

    Returns:
        ``(states [B, T, D] in inputs.dtype, final [B, D] fp32)``, as
        :func:`linear_recurrence_reference`, and differentiable in all three arguments. The state
        is carried in fp32; the backward reads the previous states from ``states``, so for fp16 /
        bf16 inputs ``d forget`` uses states rounded to that dtype (the reference keeps them fp32).
    """
    _check_float("linear_recurrence", forget, inputs, initial)
    return _TritonScan.apply(forget, inputs, initial, block_d)


def recurrence(forget: Tensor, inputs: Tensor, initial: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The MLGRU recurrence the model calls: :func:`linear_recurrence` on CUDA tensors, else the reference.

    ``forget, inputs [B, T, D]``, ``initial [B, D]`` or None → ``(states [B, T, D], final [B, D] fp32)``.
    """
    if inputs.is_cuda:
        return linear_recurrence(forget, inputs, initial)
    return linear_recurrence_reference(forget, inputs, initial)


# ---- fixed-point recurrence -------------------------------------------------------------------

def _check_fixed(name: str, forget_q: Tensor, inputs_q: Tensor, frac_bits: int, initial_q: Tensor | None):
    shape = _check_shapes(name, forget_q, inputs_q, initial_q)
    for label, x in (("forget_q", forget_q), ("inputs_q", inputs_q), ("initial_q", initial_q)):
        if x is not None and x.dtype != torch.int32:
            raise TypeError(f"{name} takes int32 tensors, got {label} of dtype {x.dtype}")
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 1 <= frac_bits <= 30:
        raise ValueError(f"{name}: frac_bits must be an int in [1, 30] (the gate 2^frac_bits fits int32), "
                         f"got {frac_bits!r}")
    return shape


def fixed_point_recurrence_reference(forget_q: Tensor, inputs_q: Tensor, frac_bits: int,
                                     initial_q: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``h_t = sat32(((f_t·h_{t-1} + 2^(frac_bits-1)) >> frac_bits) + x_t)`` in int64 PyTorch.

    Args:
        forget_q: int32 ``[B, T, D]`` gates, unsigned fixed point with ``frac_bits`` fractional
            bits (``0 … 2^frac_bits`` for 0 … 1; the range is not checked, and any int32 gate
            gives a well-defined result since the int64 product cannot overflow).
        inputs_q: int32 ``[B, T, D]`` fixed-point inputs (any scale; the states share it).
        frac_bits: 1 … 30.
        initial_q: int32 ``[B, D]`` or None for zeros.

    Returns:
        ``(states int32 [B, T, D], final int32 [B, D])``. No gradients.
    """
    _check_fixed("fixed_point_recurrence_reference", forget_q, inputs_q, frac_bits, initial_q)
    f, x = forget_q.long(), inputs_q.long()
    h = x.new_zeros(x.shape[0], x.shape[2]) if initial_q is None else initial_q.long()
    half = 1 << (frac_bits - 1)
    states = torch.empty_like(inputs_q)
    for t in range(x.shape[1]):
        h = (((f[:, t] * h + half) >> frac_bits) + x[:, t]).clamp(INT32_MIN, INT32_MAX)
        states[:, t] = h
    return states, h.int()


@triton.jit
def _fixed_point_kernel(f_ptr, x_ptr, h0_ptr, states_ptr, final_ptr, T, D, HALF, FRAC_BITS: tl.constexpr,
                        HAS_INITIAL: tl.constexpr, BLOCK: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < D
    if HAS_INITIAL:
        h = tl.load(h0_ptr + seq * D + cols, mask=inside, other=0).to(tl.int64)
    else:
        h = tl.zeros([BLOCK], dtype=tl.int64)
    offsets = seq * T * D + cols
    for _ in range(0, T):
        f = tl.load(f_ptr + offsets, mask=inside, other=0).to(tl.int64)
        x = tl.load(x_ptr + offsets, mask=inside, other=0).to(tl.int64)
        h = ((f * h + HALF) >> FRAC_BITS) + x  # >> on a signed int64: arithmetic, flooring
        h = tl.minimum(tl.maximum(h, -2147483648), 2147483647)
        tl.store(states_ptr + offsets, h.to(tl.int32), mask=inside)
        offsets += D
    tl.store(final_ptr + seq * D + cols, h.to(tl.int32), mask=inside)


def fixed_point_recurrence(forget_q: Tensor, inputs_q: Tensor, frac_bits: int, initial_q: Tensor | None = None,
                           *, block_d: int = 128) -> tuple[Tensor, Tensor]:
    """The fixed-point recurrence as a Triton kernel, equal bit for bit to :func:`fixed_point_recurrence_reference`.

    ``forget_q, inputs_q`` int32 ``[B, T, D]``, ``initial_q`` int32 ``[B, D]`` or None, ``frac_bits``
    in 1 … 30 → ``(states int32 [B, T, D], final int32 [B, D])``. No gradients.
    """
    _check_fixed("fixed_point_recurrence", forget_q, inputs_q, frac_bits, initial_q)
    b, t, d = inputs_q.shape
    forget_q, inputs_q = forget_q.contiguous(), inputs_q.contiguous()
    states = torch.empty_like(inputs_q)
    final = torch.empty(b, d, dtype=torch.int32, device=inputs_q.device)
    block, warps = _launch(d, block_d)
    _fixed_point_kernel[(b, triton.cdiv(d, block))](
        forget_q, inputs_q, final if initial_q is None else initial_q.contiguous(), states, final, t, d,
        1 << (frac_bits - 1), FRAC_BITS=frac_bits, HAS_INITIAL=initial_q is not None, BLOCK=block,
        num_warps=warps)
    return states, final
