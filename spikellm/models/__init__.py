"""Model definitions."""
from spikellm.models.llama import LlamaConfig, SpikingLlama, from_hf_llama
from spikellm.models.matmulfree import MatMulFreeConfig, MatMulFreeLM, set_hardware_mode

__all__ = ["LlamaConfig", "MatMulFreeConfig", "MatMulFreeLM", "SpikingLlama", "from_hf_llama", "set_hardware_mode"]
