"""Weight quantizers (DESIGN.md §4): a module that maps a float weight to its quantized value."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from spikellm.errors import ConfigError
from spikellm.checks import check_int
from spikellm.ops.rounding import round_half_up, straight_through


class WeightQuantizer(nn.Module):
    """Base class: ``forward(weight) -> fake-quantized weight`` with a straight-through gradient."""

    bits: int


class RoundToNearest(WeightQuantizer):
    """Symmetric round-to-nearest int-b, per output channel or per group of input columns.

    Args:
        bits: b; integers in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` times a per-row (or per-group) scale.
        group_size: columns sharing one scale; ``None`` for one scale per output channel.
    """

    def __init__(self, bits: int = 4, group_size: int | None = None):
        super().__init__()
        self.bits = check_int("bits", bits, 2, 16)
        self.group_size = None if group_size is None else check_int("group_size", group_size, 1)
        self.max_int = 2 ** (self.bits - 1) - 1  # the largest integer of the symmetric grid

    def scales_and_integers(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Per-group scales ``[out, groups, 1]`` and integer weights ``[out, groups, group]``."""
        out_features, in_features = weight.shape
        group = self.group_size or in_features
        if in_features % group:
            raise ConfigError("group_size", self.group_size, f"must divide the layer width {in_features}")
        grouped = weight.detach().float().reshape(out_features, in_features // group, group)
        scale = grouped.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / self.max_int
        return scale, round_half_up(grouped / scale).clamp(-self.max_int, self.max_int)

    def forward(self, weight: Tensor) -> Tensor:
        scale, integers = self.scales_and_integers(weight)
        quantized = (integers * scale).reshape(weight.shape)
        return straight_through(weight, quantized, torch.ones_like(weight, dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}"
