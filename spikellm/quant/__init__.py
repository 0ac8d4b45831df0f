"""Weight quantizers: fake-quantize a weight matrix in training, pack it at export."""
from spikellm.quant.gptq import HessianAccumulator, gptq_layer, gptq_quantize
from spikellm.quant.ternary import TernaryAbsMean, TernaryGIFGrid
from spikellm.quant.weights import RoundToNearest, WeightQuantizer

__all__ = ["RoundToNearest", "WeightQuantizer", "TernaryAbsMean", "TernaryGIFGrid", "HessianAccumulator", "gptq_quantize", "gptq_layer"]
