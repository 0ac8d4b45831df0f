"""Training: the LightningModule and the main job."""
from spikellm.training.task import CausalLMTask

__all__ = ["CausalLMTask"]
