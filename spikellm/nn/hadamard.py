"""Old home of :mod:`spikellm.ops.hadamard` (moved down so that ``quant.gptq`` can rotate without
importing ``nn``): spikellm/checkpoint.py still imports it from here. Delete once nothing does."""
from spikellm.ops.hadamard import hadamard_block, hadamard_transform

__all__ = ["hadamard_block", "hadamard_transform"]
