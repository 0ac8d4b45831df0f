"""Per-input-channel step allocation (Optimal Brain Spiking, as SpikeLLM allocates steps).

The chosen channels get ``m = 2^addbit`` times the steps: a step ``Δ/m`` and counts up to ``m``
times larger. The allocation is two buffers saved with the model; which channels are chosen is
:mod:`spikellm.neurons.saliency`'s job.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from spikellm.checks import check_bool, check_int
from spikellm.errors import ConfigError


class ChannelAllocation(nn.Module):
    """The allocation every encoder carries (``channel_scale``: ``[C]`` step multipliers, or None)."""

    min_count: int
    max_count: int
    fused_overrides = ("count_bounds",)  # the fused encoders take the channel multipliers

    def __init__(self):
        super().__init__()
        self.register_buffer("channel_scale", None)  # [C] step multiplier per input channel, or None
        # set (True) when the allocated channels take their per-token bound among themselves
        self.register_buffer("separate_clusters", None)

    def allocate_channels(self, salient: Tensor, addbit: int, separate: bool = False) -> None:
        """Give the channels where ``salient`` ([C] bool) is set ``2^addbit`` times the steps;
        ``separate``: they and the other channels take their per-token bounds apart."""
        addbit = check_int("addbit", addbit, 0, 8)
        if salient.dim() != 1 or salient.dtype != torch.bool:
            raise ConfigError("salient", tuple(salient.shape), "must be a 1-D bool mask over input channels")
        self.channel_scale = torch.where(salient, 2.0 ** addbit, 1.0).to(salient.device)
        self.separate_clusters = torch.tensor(bool(check_bool("separate", separate)), device=salient.device)

    @property
    def clusters_apart(self) -> bool:
        """Whether allocated channels and the others take their per-token bounds apart."""
        return self.separate_clusters is not None and bool(self.separate_clusters)

    def count_bounds(self):
        """``(low, high)`` count bounds: ints, or ``[C]`` tensors once channels are allocated."""
        if self.channel_scale is None:
            return self.min_count, self.max_count
        return self.min_count * self.channel_scale, self.max_count * self.channel_scale

    @property
    def largest_count(self) -> int:
        """The largest count magnitude of any channel (allocated channels included)."""
        scale = 1 if self.channel_scale is None else int(self.channel_scale.max().item())
        return max(abs(self.min_count), abs(self.max_count)) * scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # an allocation saved with the model creates the buffers a freshly built encoder lacks
        for name in ("channel_scale", "separate_clusters"):
            saved = state_dict.get(prefix + name)
            if saved is not None and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(saved))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
