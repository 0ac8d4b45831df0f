"""Weight quantizers: fake-quantize a weight matrix in training, pack it at export."""
from spikellm.quant.weights import RoundToNearest, WeightQuantizer

__all__ = ["RoundToNearest", "WeightQuantizer"]
