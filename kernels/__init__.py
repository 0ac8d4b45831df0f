"""Triton kernels, each beside its pure-PyTorch reference (installed as ``spikellm.kernels``).

- :mod:`~spikellm.kernels.packing`: int4 / ternary / int8 weight packing, Triton unpacking;
- :mod:`~spikellm.kernels.spike_encode`: the fused encoder (counts, step, statistics in one pass);
- :mod:`~spikellm.kernels.spike_linear`: the spike-driven, event-driven integer linear layer;
- :mod:`~spikellm.kernels.recurrence`: the MatMul-free LM's gated linear recurrence, float and fixed point.

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set before the first import); :func:`kernels_usable` says which.
"""
import os

import torch

from spikellm.kernels.packing import pack_weights, packed_width, unpack_weights, unpack_weights_reference
from spikellm.kernels.spike_encode import encode_counts, encode_counts_reference
# not the dispatcher ``recurrence``: that name would hide the submodule spikellm.kernels.recurrence
from spikellm.kernels.recurrence import (fixed_point_recurrence, fixed_point_recurrence_reference, linear_recurrence,
                                         linear_recurrence_reference)
from spikellm.kernels.spike_linear import spike_linear, spike_linear_reference


def kernels_usable(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``: CUDA, or anything under the interpreter."""
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


__all__ = ["pack_weights", "packed_width", "unpack_weights", "unpack_weights_reference", "encode_counts",
           "encode_counts_reference", "spike_linear", "spike_linear_reference", "linear_recurrence",
           "linear_recurrence_reference", "fixed_point_recurrence", "fixed_point_recurrence_reference",
           "kernels_usable"]
