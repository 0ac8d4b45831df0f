"""The ``transformers`` config of a spikellm model directory (``model_type: "spikellm"``).

It imports only ``transformers.configuration_utils``, so :mod:`spikellm.checkpoints.auto` can
register it with ``AutoConfig`` while ``transformers`` is still loading its modeling code.
"""
from __future__ import annotations

from transformers.configuration_utils import PreTrainedConfig

from spikellm.checkpoints.auto import MODEL_TYPE


class SpikellmConfig(PreTrainedConfig):
    """A spikellm model directory's ``config.json`` as ``transformers`` reads it: the fields its
    generation, pipelines and lm-eval look at (vocabulary, width, depth, context, special tokens),
    and spikellm's own record (``format``, ``model``, ``neuron``, ``layers``... of a spiking
    checkpoint; ``format`` and ``hf_config`` of a converted model) as further attributes.
    The model itself is read by :func:`spikellm.checkpoints.load_model`, from the files."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 2048
    hidden_size: int = 256
    num_hidden_layers: int = 4
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True


__all__ = ["SpikellmConfig"]
