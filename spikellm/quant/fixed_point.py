"""Fixed-point arithmetic for the hardware-aware mode of the MatMul-free LM (arXiv 2503.18002).

A neuromorphic core such as Loihi 2 has integer adders, multipliers and shifts but no floating
point, so every value that is not already a spike count is held as an integer ``v`` meaning
``v · 2^-frac_bits``, and the non-linear functions become what such a core computes cheaply:

* :func:`to_fixed`: round half up onto the ``2^-frac_bits`` grid and saturate to ``bits`` bits;
* :func:`lut`: a function read from a table indexed by the input on a coarse fixed-point grid
  (sigmoid, SiLU), its entries rounded to the output grid;
* :func:`rsqrt_fixed`: RMSNorm's inverse square root as a shift by the exponent and a table on
  the mantissa, i.e. ``1/√m`` rounded to ``mantissa_bits`` significant bits.

Every function returns floats that lie exactly on its grid, with a straight-through gradient, so
the same code evaluates the integer model and fine-tunes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spikellm.checks import check_float, check_int
from spikellm.errors import ConfigError
from spikellm.ops.rounding import round_half_up, straight_through


@dataclass(frozen=True)
class HardwareQuant:
    """Bit widths of the hardware-aware mode.

    Args:
        activation_bits, activation_frac_bits: projection outputs, the residual stream and norm
            outputs, as signed fixed point (the Loihi 2 model's 24-bit activations).
        state_frac_bits: fractional bits of the recurrent state and of the forget gate, so the
            state update ``h ← (f·h) >> F + x`` is one integer multiply, shift and add per channel.
        gate_frac_bits: output grid of the sigmoid and SiLU tables.
        lut_frac_bits, lut_range: input grid ``2^-lut_frac_bits`` of the tables over
            ``[-lut_range, lut_range)``; inputs outside saturate (σ is 0 or 1 within 2^-12 there).
        norm_mantissa_bits: significant bits of RMSNorm's ``1/√(mean x²)``.
        weight_frac_bits: grid of the norms' gains.
    """

    activation_bits: int = 24
    activation_frac_bits: int = 16
    state_frac_bits: int = 16
    gate_frac_bits: int = 12
    lut_frac_bits: int = 6
    lut_range: float = 8.0
    norm_mantissa_bits: int = 12
    weight_frac_bits: int = 12

    def __post_init__(self):
        check_int("activation_bits", self.activation_bits, 8, 32)
        for key in ("activation_frac_bits", "state_frac_bits", "gate_frac_bits", "weight_frac_bits"):
            check_int(key, getattr(self, key), 1, 24)
        if self.activation_frac_bits >= self.activation_bits:
            raise ConfigError("activation_frac_bits", self.activation_frac_bits,
                              f"must be below activation_bits={self.activation_bits}, leaving integer bits")
        check_int("lut_frac_bits", self.lut_frac_bits, 0, 12)
        check_float("lut_range", self.lut_range, 0.0, 1024.0, low_open=True)
        check_int("norm_mantissa_bits", self.norm_mantissa_bits, 2, 23)

    @property
    def lut_entries(self) -> int:
        """Entries of each table: what the chip stores per function."""
        return int(2 * self.lut_range * 2 ** self.lut_frac_bits)


def to_fixed(x: Tensor, frac_bits: int, bits: int | None = None) -> Tensor:
    """``x`` rounded half up to a multiple of ``2^-frac_bits`` and saturated to signed ``bits`` bits."""
    scale = 2.0 ** frac_bits
    integers = round_half_up(x.detach().float() * scale)
    if bits is not None:
        integers = integers.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return straight_through(x, integers / scale, None)


def lut(fn, x: Tensor, spec: HardwareQuant) -> Tensor:
    """``fn(x)`` as a table lookup: ``x`` on the table's input grid (saturating), ``fn`` rounded to
    the gate grid. The gradient is that of ``fn`` at ``x`` (a smooth surrogate of the table)."""
    step = 2.0 ** -spec.lut_frac_bits
    index = round_half_up(x.detach().float() / step).clamp(-spec.lut_range / step, spec.lut_range / step - 1)
    table_value = round_half_up(fn(index * step) * 2.0 ** spec.gate_frac_bits) / 2.0 ** spec.gate_frac_bits
    smooth = fn(x)
    return smooth + (table_value.to(smooth.dtype) - smooth).detach()


def rsqrt_fixed(mean_square: Tensor, mantissa_bits: int) -> Tensor:
    """``1/√m`` with ``mantissa_bits`` significant bits: ``2^-e/2`` is a shift, the mantissa a table."""
    exact = torch.rsqrt(mean_square)
    exponent = torch.floor(torch.log2(exact.detach()))
    unit = 2.0 ** (exponent - (mantissa_bits - 1))
    return exact + (round_half_up(exact.detach() / unit) * unit - exact).detach()
