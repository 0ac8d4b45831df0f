"""Hugging Face causal LMs as our code calls them: their logits from ``input_ids`` alone, their
context length. Reading and writing them is :mod:`spikellm.checkpoints.hf`."""
from __future__ import annotations

from types import SimpleNamespace

from torch import Tensor, nn


def causal_lm_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Logits ``[B, T, vocab]`` of our models (which return them) and of HF ones (which wrap them)."""
    if getattr(model, "config", None) is not None and hasattr(model, "generation_config"):
        return model(input_ids=input_ids, use_cache=False).logits
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def max_positions(config) -> int | None:
    """The longest sequence a HF config's position embeddings allow (None: unbounded, e.g. RWKV)."""
    for name in ("max_position_embeddings", "context_length", "max_seq_len"):  # the last: our own models
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


class LogitsModel(nn.Module):
    """Wraps a HF causal LM so that ``forward(input_ids)`` returns its logits, as our models do
    (what perplexity, the zero-shot harness and calibration losses call)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model
        # what our evaluation reads (``config.max_seq_len``), beside the HF config itself
        self.config = SimpleNamespace(model_type=hf_model.config.model_type, hf=hf_model.config,
                                      max_seq_len=max_positions(hf_model.config) or 2048)

    def forward(self, input_ids: Tensor) -> Tensor:
        return causal_lm_logits(self.hf_model, input_ids)
