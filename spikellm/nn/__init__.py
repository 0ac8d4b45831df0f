"""Spike-driven building blocks."""
from spikellm.nn.spiking_linear import SpikingLinear, shared_input_linears

__all__ = ["SpikingLinear", "shared_input_linears"]
