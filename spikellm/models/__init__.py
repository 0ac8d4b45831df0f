"""Model definitions."""
from spikellm.models.llama import LlamaConfig, SpikingLlama, from_hf_llama

__all__ = ["LlamaConfig", "SpikingLlama", "from_hf_llama"]
