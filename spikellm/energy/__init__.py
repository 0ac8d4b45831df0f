"""Energy accounting: cost models, exact operation counts, an analytic estimator, reports."""
from spikellm.energy.cost import CostModel, EnergySplit, Operations, cost_model, load_cost_model

__all__ = ["CostModel", "EnergySplit", "Operations", "cost_model", "load_cost_model"]
from spikellm.energy.report import EnergyReport, LayerOps

__all__ += ["EnergyReport", "LayerOps"]
from spikellm.energy.counter import OperationCounter

__all__ += ["OperationCounter"]
from spikellm.energy.estimator import estimate_llama, llama2_7b

__all__ += ["estimate_llama", "llama2_7b"]
