"""What every model-file reader returns: the model in eval mode, its tokenizer and its record."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer, the format it was read from, where from, and its record
    (model and neuron configs, backend...; written into results.json)."""

    model: nn.Module
    tokenizer: object
    source: str
    config: dict = field(default_factory=dict)
    format: str = ""
