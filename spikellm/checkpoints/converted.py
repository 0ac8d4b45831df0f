"""A converted model on disk: a Hugging Face directory plus what makes it spiking.

``config.json`` and the tokenizer are the original model's; ``model.safetensors`` holds the
converted weights (quantized values, folded smoothing) and the encoders' buffers (OBS channel
scales); ``spikellm.json`` records the neuron config it was spikified with, the activation
thresholds, and what each conversion stage did. :func:`load_converted` rebuilds the model from
these alone, offline; eval.py calls it for any directory holding a ``spikellm.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from spikellm.errors import DataError
from spikellm.checkpoints.atomic import atomic_directory

FORMAT = "spikellm-converted"
FORMAT_VERSION = 1
RECORD = "spikellm.json"


def save_converted(model: nn.Module, tokenizer, directory, record: dict, overwrite: bool = False) -> Path:
    """Write the spikified HF ``model`` (all of it or nothing) with ``tokenizer`` and ``record``
    (``neuron``, ``thresholds``, ``stages``, ``source``, ``metrics``) to ``directory``."""
    from safetensors.torch import save_model

    with atomic_directory(directory, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save(tmp)
        (tmp / RECORD).write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **record}, indent=2,
                                             default=str))
    return Path(directory)


def read_record(directory) -> dict:
    path = Path(directory) / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path} cannot be read ({type(error).__name__}: {error}); the converted model is "
                        "incomplete, convert it again") from None
    if record.get("format") != FORMAT or record.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} is not a spikellm converted model of format version {FORMAT_VERSION} "
                        f"(found {record.get('format')!r} v{record.get('version')!r})")
    from spikellm.config.trust import check_trusted

    check_trusted({"neuron": record.get("neuron")}, path)  # what a converted model rebuilds is our own code only
    return record


def load_converted(directory) -> tuple[nn.Module, dict]:
    """The spiking model saved by :func:`save_converted` (eval mode, fp32) and its record."""
    import transformers

    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from spikellm.models.spikify import spikify_from_config
    from spikellm.sparsity import install_thresholds

    from spikellm.checkpoints.hf import hf_config

    directory = Path(directory)
    record = read_record(directory)  # validated and its neuron config checked: once
    config = hf_config(directory, key="ckpt")  # readable, of a supported architecture
    model = transformers.AutoModelForCausalLM.from_config(config)
    spikify_from_config(model, record.get("neuron"))
    weights = directory / "model.safetensors"
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (OSError, SafetensorError, RuntimeError) as error:
        raise DataError(f"{weights} cannot be loaded ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                        "it may be truncated: convert the model again") from None
    if missing or unexpected:
        raise DataError(f"{weights} does not match the model {RECORD} describes "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if record.get("thresholds"):
        install_thresholds(model, record["thresholds"], names=list(record["thresholds"]))
    return model.eval(), record
