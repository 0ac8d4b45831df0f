"""Spike-driven building blocks."""
from spikellm.nn.spiking_linear import SpikingLinear

__all__ = ["SpikingLinear"]
