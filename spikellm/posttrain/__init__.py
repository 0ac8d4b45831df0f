"""Post-training conversion of pretrained causal LMs into spiking ones (DESIGN.md §5): the stages
an experiment's ``convert.stages`` lists, and the pipeline that runs them."""
from spikellm.posttrain.stages import GPTQ, BlockCalibration, DistillationQAT, OptimalBrainSpiking, Sparsify

__all__ = ["OptimalBrainSpiking", "BlockCalibration", "GPTQ", "Sparsify", "DistillationQAT"]
