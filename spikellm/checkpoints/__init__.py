"""Every model file spikellm reads or writes, one module per on-disk format (written through
:mod:`spikellm.io`, so never left half-done):

- :mod:`~spikellm.checkpoints.lightning`: train.py's ``.ckpt`` (atomic saves, the one reader);
- :mod:`~spikellm.checkpoints.spiking`: the spiking checkpoint (packed integer weights, encoders);
- :mod:`~spikellm.checkpoints.converted`: a converted Hugging Face model (``spikellm.json``);
- :mod:`~spikellm.checkpoints.hf`: Hugging Face directories, read and written;
- :mod:`~spikellm.checkpoints.loader`: :func:`load_model`, which recognises any of them;
- :mod:`~spikellm.checkpoints.auto`, :mod:`~spikellm.checkpoints.hub_config`,
  :mod:`~spikellm.checkpoints.hub`, :mod:`~spikellm.checkpoints.registration`: the same
  directories as ``transformers`` models (``AutoModelForCausalLM``), and
  :mod:`~spikellm.checkpoints.card`, their model card.

Imports here are lazy: importing one of them loads no other.
"""
from __future__ import annotations

_EXPORTS = {"FORMATS": "loader", "LoadedModel": "loader", "detect_format": "loader", "load_model": "loader"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"spikellm.checkpoints.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'spikellm.checkpoints' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
