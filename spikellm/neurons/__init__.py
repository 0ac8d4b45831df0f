"""Spike encoders: activations → integer spike counts (collapsed) or spike trains (temporal)."""
from spikellm.neurons.base import SpikeEncoder
from spikellm.neurons.ternary import TernaryEncoder

__all__ = ["SpikeEncoder", "TernaryEncoder"]
