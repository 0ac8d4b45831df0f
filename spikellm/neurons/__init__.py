"""Spike encoders: activations → integer spike counts (collapsed) or spike trains (temporal)."""
from spikellm.neurons.base import SpikeEncoder
from spikellm.neurons.bitplane import BitPlaneEncoder
from spikellm.neurons.gif import GIFEncoder
from spikellm.neurons.integrate_fire import IFEncoder
from spikellm.neurons.ternary import TernaryEncoder

__all__ = ["SpikeEncoder", "TernaryEncoder", "IFEncoder", "GIFEncoder", "BitPlaneEncoder"]
