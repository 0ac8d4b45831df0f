"""Packed integer weights: int4 (two per byte), ternary (four per byte, 2 bits each), int8 as is.

Packing runs once, at export, in PyTorch (:func:`pack_weights`); unpacking runs at load time on
the device the model runs on: the Triton kernel :func:`unpack_weights` on a GPU (or under the
Triton interpreter), :func:`unpack_weights_reference` otherwise. Rows (output channels) are packed
independently; the last byte of a row is zero-padded when ``in_features`` is not a multiple of
the values per byte.

Codes: int4 stores ``q & 0xF`` (two's complement nibble, low nibble first); ternary stores
``q + 1`` in {0, 1, 2} in 2-bit fields, lowest bits first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

FORMATS = {"int4": 2, "ternary": 4, "int8": 1}  # values per byte
RANGES = {"int4": (-8, 7), "ternary": (-1, 1), "int8": (-128, 127)}


def _check(fmt: str) -> int:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def packed_width(in_features: int, fmt: str) -> int:
    """Bytes per row of a packed ``[out, in_features]`` matrix."""
    per_byte = _check(fmt)
    return -(-in_features // per_byte)


def pack_weights(q: Tensor, fmt: str) -> Tensor:
    """``q [N, K]`` integer-valued (any dtype) → ``[N, packed_width(K)]`` uint8 (int8 for int8)."""
    per_byte = _check(fmt)
    low, high = RANGES[fmt]
    if q.dim() != 2:
        raise ValueError(f"pack_weights takes a 2-D [out, in] matrix, got shape {tuple(q.shape)}")
    # checked before narrowing: a cast to int16 would wrap 65537 into range
    if q.numel() and (q.min().item() < low or q.max().item() > high):
        raise ValueError(f"{fmt} weights must lie in [{low}, {high}], got [{q.min().item()}, {q.max().item()}]")
    q = q.to(torch.int16)
    if fmt == "int8":
        return q.to(torch.int8).contiguous()
    n, k = q.shape
    width = packed_width(k, fmt)
    padded = torch.zeros(n, width * per_byte, dtype=torch.int16, device=q.device)
    padded[:, :k] = q
    bits = 8 // per_byte
    codes = (padded & 0xF) if fmt == "int4" else (padded + 1)
    fields = codes.reshape(n, width, per_byte)
    packed = torch.zeros(n, width, dtype=torch.int16, device=q.device)
    for i in range(per_byte):
        packed |= fields[:, :, i] << (bits * i)
    return packed.to(torch.uint8).contiguous()


def unpack_weights_reference(packed: Tensor, in_features: int, fmt: str) -> Tensor:
    """Inverse of :func:`pack_weights`: ``[N, in_features]`` int8."""
    per_byte = _check(fmt)
    if fmt == "int8":
        return packed.to(torch.int8)[:, :in_features]
    bits = 8 // per_byte
    mask = (1 << bits) - 1
    wide = packed.to(torch.int16)
    fields = torch.stack([(wide >> (bits * i)) & mask for i in range(per_byte)], dim=-1).reshape(packed.shape[0], -1)
    fields = fields[:, :in_features]
    values = torch.where(fields >= 8, fields - 16, fields) if fmt == "int4" else fields - 1
    return values.to(torch.int8)


@triton.jit
def decode_field(byte, col, PER_BYTE: tl.constexpr, SIGNED_NIBBLE: tl.constexpr):
    """The weight of column ``col`` from its packed int32 ``byte`` (the codes of the module docstring):
    shared by the unpacking kernel and the spike-driven linear, which unpacks in registers."""
    BITS: tl.constexpr = 8 // PER_BYTE
    field = (byte >> ((col % PER_BYTE) * BITS)) & ((1 << BITS) - 1)
    if SIGNED_NIBBLE:
        value = tl.where(field >= 8, field - 16, field)
    else:
        value = field - 1
    return value


@triton.jit
def _unpack_kernel(packed_ptr, out_ptr, n_cols, packed_cols, PER_BYTE: tl.constexpr, SIGNED_NIBBLE: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < n_cols
    byte = tl.load(packed_ptr + row * packed_cols + cols // PER_BYTE, mask=inside, other=0).to(tl.int32)
    value = decode_field(byte, cols, PER_BYTE, SIGNED_NIBBLE)
    tl.store(out_ptr + row * n_cols + cols, value.to(tl.int8), mask=inside)


def unpack_weights(packed: Tensor, in_features: int, fmt: str) -> Tensor:
    """:func:`unpack_weights_reference` as a Triton kernel: ``packed [N, W]`` → ``[N, in_features]`` int8."""
    per_byte = _check(fmt)
    if fmt == "int8":
        return unpack_weights_reference(packed, in_features, fmt)
    packed = packed.contiguous()
    out = torch.empty(packed.shape[0], in_features, dtype=torch.int8, device=packed.device)
    block = 1024
    grid = (packed.shape[0], triton.cdiv(in_features, block))
    _unpack_kernel[grid](packed, out, in_features, packed.shape[1], PER_BYTE=per_byte,
                         SIGNED_NIBBLE=fmt == "int4", BLOCK=block)
    return out
