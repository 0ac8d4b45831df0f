"""What a module that multiplies activations by activations declares to the operation counter.

Projections are :class:`~spikellm.nn.spiking_linear.SpikingLinear` layers, which the counter
knows; the other matmul work of a model (attention's ``Q·Kᵀ`` and ``P·V``, a recurrence's
element-wise products) lives in modules of each architecture. Each such module carries a
``matmul_work`` attribute, one of the declarations below, and the counter
(:class:`spikellm.energy.OperationCounter`) prices whatever declares it, without knowing the
module's class: the native LLaMA's attention and the MatMul-free LM's recurrence declare it in
their own code, and :func:`spikellm.models.spikify.declare_attention_work` declares it on the
attention modules of every supported Hugging Face architecture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from torch import nn

#: ``window(inputs, kwargs) -> (batch, start, new tokens, cached)`` of one forward, read before it
#: runs: its sequences, where its queries start in the sequence (the cached length), how many there
#: are, and whether a cache holds the earlier keys
Window = Callable[[tuple, dict], tuple[int, int, int, bool]]


@dataclass
class AttentionWork:
    """Causal (grouped-query) attention: each new query ``i`` multiplies the keys ``0..i`` and the
    probabilities by the values, ``2 · head_dim`` MACs per (query head, pair). ``encoder``: the
    ``{"key", "value"}`` spike encoders of spiking attention products, or None (floating point)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    window: Window
    encoder: Mapping[str, nn.Module] | None = None


@dataclass
class RecurrenceWork:
    """An element-wise recurrence over ``inputs[0]`` ``[B, T, dim]``: ``macs_per_element`` products
    per channel and token (the MatMul-free LM's ``f·h + (1 - f)·c``: 2)."""

    macs_per_element: int = 2


__all__ = ["AttentionWork", "RecurrenceWork", "Window"]
