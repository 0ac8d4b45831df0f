"""What ``transformers`` reads in a spikellm model directory, and the registration of its classes.

Every model directory spikellm writes (a spiking checkpoint, a converted model) is also a
``transformers`` model: its ``config.json`` carries, beside spikellm's own record,
``model_type: "spikellm"``, ``architectures``, ``auto_map`` (to :data:`MODELING_FILE`, a thin file
written beside the weights for ``trust_remote_code=True``), ``torch_dtype``, the context length and
the special tokens; ``generation_config.json`` holds the decoding defaults. The classes themselves
live in :mod:`spikellm.checkpoints.hub`, registered by :mod:`spikellm.checkpoints.registration`.
This module imports nothing of ``transformers``: every writer uses it.
"""
from __future__ import annotations

import json
from pathlib import Path

from spikellm.version import __version__

MODEL_TYPE = "spikellm"
ARCHITECTURE = "SpikellmForCausalLM"
MODELING_FILE = "modeling_spikellm.py"
AUTO_MAP = {"AutoConfig": "modeling_spikellm.SpikellmConfig",
            "AutoModelForCausalLM": "modeling_spikellm.SpikellmForCausalLM"}
GENERATION_FILE = "generation_config.json"

# transformers' check_imports finds the missing package in this import and says which one to install
MODELING_SOURCE = '''"""Loads this spiking model in ``transformers`` with ``trust_remote_code=True``.

Its code is the spikellm package, not this file: ``pip install spikellm``. With spikellm installed,
``import spikellm`` registers the same classes, and ``trust_remote_code`` is not needed.
"""
from spikellm.checkpoints.hub import SpikellmConfig, SpikellmForCausalLM

__all__ = ["SpikellmConfig", "SpikellmForCausalLM"]
'''


def transformers_fields(model_config, tokenizer, dtype) -> dict:
    """The ``config.json`` entries ``transformers`` reads for a model of ``model_config`` (ours:
    ``LlamaConfig`` / ``MatMulFreeConfig``; or a Hugging Face config) with ``tokenizer``, whose
    floating-point tensors are mostly stored in ``dtype`` (None: the writer sets it once written)."""
    def first(*names, default=None):
        return next((getattr(model_config, n) for n in names if getattr(model_config, n, None) is not None), default)


    eos, bos = int(tokenizer.eos_id), getattr(tokenizer, "bos_id", None)
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "auto_map": dict(AUTO_MAP),
        "torch_dtype": None if dtype is None else str(dtype).removeprefix("torch."), "spikellm_version": __version__,
        "vocab_size": int(first("vocab_size")), "hidden_size": int(first("dim", "hidden_size", "n_embd")),
        "num_hidden_layers": int(first("n_layers", "num_hidden_layers", "n_layer")),
        "max_position_embeddings": int(first("max_seq_len", "max_position_embeddings", "n_positions",
                                             "context_length", default=4096)),
        "tie_word_embeddings": bool(first("tie_embeddings", "tie_word_embeddings", default=False)),
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos,
    }


def write_transformers_files(directory: Path, fields: dict) -> None:
    """The modeling file and ``generation_config.json`` of a model directory being written."""
    (directory / MODELING_FILE).write_text(MODELING_SOURCE)
    generation = {"bos_token_id": fields.get("bos_token_id"), "eos_token_id": fields["eos_token_id"],
                  "pad_token_id": fields["pad_token_id"], "do_sample": False}
    (directory / GENERATION_FILE).write_text(json.dumps(generation, indent=2) + "\n")
