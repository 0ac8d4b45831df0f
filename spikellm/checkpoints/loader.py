"""One loader for every model file: :func:`load_model` recognises the format (:data:`FORMATS`),
reads it through its own module, which validates it and checks what it names once, and returns the
model in eval mode with its tokenizer and its record. eval.py, the lm-eval adapter, generation and
users call this and nothing else."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from spikellm.errors import ConfigError

log = logging.getLogger(__name__)

#: every on-disk format :func:`load_model` reads, with what it is (for messages and docs/model_files.md)
FORMATS = {
    "lightning": "a Lightning checkpoint written by train.py (<run>/checkpoints/last.ckpt)",
    "spiking": "a spiking checkpoint directory (<run>/spiking_checkpoint): packed integer weights and encoders",
    "converted": "a converted Hugging Face model (a directory with spikellm.json, written by a conversion)",
    "hf": "a local Hugging Face model directory (config.json, weights, tokenizer), spikified with neuron=...",
}


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer, the format it was read from, where from, and its record
    (model and neuron configs, backend...; written into results.json)."""

    model: nn.Module
    tokenizer: object
    source: str
    config: dict = field(default_factory=dict)
    format: str = ""


def detect_format(path: str | Path, key: str = "ckpt") -> str:
    """The :data:`FORMATS` name of ``path``, from its layout alone (nothing is loaded); a path that
    is none of them is a ConfigError naming ``key`` and what it should be."""
    from spikellm.checkpoints.converted import RECORD
    from spikellm.checkpoints.spiking import is_spiking_checkpoint

    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(key, str(path), "no such file or directory; pass " + _any_format())
    if path.is_file():
        return "lightning"
    if is_spiking_checkpoint(path):
        return "spiking"
    if (path / RECORD).is_file():
        return "converted"
    if (path / "config.json").is_file():
        return "hf"
    raise ConfigError(key, str(path), "is not a model directory (no config.json); pass " + _any_format())


def _any_format() -> str:
    return "; ".join(FORMATS.values())


def load_model(path: str | Path, neuron: dict | None = None, device: str = "cpu", backend: str = "auto",
               key: str = "ckpt", dtype="auto") -> LoadedModel:
    """The model in the file or directory ``path`` (any of :data:`FORMATS`), in eval mode on
    ``device``, with its tokenizer and record.

    ``neuron`` (a neuron config group as a dict) replaces a training checkpoint's encoders or
    spikifies a Hugging Face model; spiking and converted models carry their own and refuse it.
    ``backend`` (spiking checkpoints): ``triton`` kernels, the ``torch`` reference, or ``auto``.
    ``dtype``: ``auto`` (fp32 on a CPU, the stored dtype on a GPU), ``float32``, ``bfloat16`` or
    ``float16``. Every format is read into a model built with empty parameters, one tensor at a
    time, so loading holds the model once; weight quantizers are folded (applied once), so the
    loaded model never quantizes a weight again.
    Every failure is one line: a ConfigError naming ``key``, or a DataError naming the file."""
    from spikellm.checkpoints.hf import parse_dtype
    from spikellm.nn.spiking_linear import fold_weight_quantizers
    from spikellm.nn.storage import trim_heap

    began = time.perf_counter()
    fmt = detect_format(path, key)
    path = Path(path).expanduser()
    if neuron is not None and fmt in ("spiking", "converted"):
        raise ConfigError("neuron", neuron.get("name"), f"{FORMATS[fmt].split(' (')[0]} carries its own encoders; "
                                                        "drop the neuron override")
    dtype = parse_dtype(dtype, "dtype")
    if dtype is None and torch.device(device).type == "cpu":
        dtype = torch.float32  # CPUs compute bf16 slowly or not at all; the stored dtype on a GPU
    if fmt == "spiking":
        loaded = _load_spiking(path, device, backend, dtype)
    elif fmt == "lightning":
        from spikellm.checkpoints.lightning import load_training_checkpoint

        model, tokenizer, record = load_training_checkpoint(path, neuron, dtype=dtype)
        loaded = LoadedModel(model, tokenizer, str(path), record)
    elif fmt == "converted":
        loaded = _load_converted(path, dtype)
    else:
        loaded = _load_hf(path, neuron, key, dtype)
    loaded.format = fmt
    fold_weight_quantizers(loaded.model)
    loaded.model.to(device).eval()
    trim_heap()  # what reading and dequantizing freed goes back now, not at some later peak
    parameters = list({id(p): p for p in loaded.model.parameters()}.values())
    log.info("loaded %s: %.3g B parameters, %.2f GB, in %.1f s", path.name,
             sum(p.numel() for p in parameters) / 1e9, sum(p.numel() * p.element_size() for p in parameters) / 1e9,
             time.perf_counter() - began)
    return loaded


def _load_spiking(path: Path, device: str, backend: str, dtype) -> LoadedModel:
    from spikellm.checkpoints.spiking import load_spiking_checkpoint

    model, tokenizer, config = load_spiking_checkpoint(path, backend=backend, device=device, dtype=dtype)
    routed = sum(layer.kernel_forward is not None for layer in model.spiking_linears().values())
    return LoadedModel(model, tokenizer, str(path), {"model": config["model"], "neuron": config["neuron"],
                                                     "backend": "triton" if routed else "torch",
                                                     "kernel_layers": routed})


def _load_converted(path: Path, dtype) -> LoadedModel:
    from spikellm.checkpoints.converted import load_converted
    from spikellm.data.tokenizer import model_tokenizer
    from spikellm.models.hf import LogitsModel

    model, record = load_converted(path, dtype, native=True)  # a LLaMA as our own: shared encodings, our cache
    tokenizer = model_tokenizer(path)
    model_type = getattr(model.config, "model_type", "llama")
    return LoadedModel(model if hasattr(model, "spiking_linears") else LogitsModel(model), tokenizer, str(path),
                       {"hf_model_type": model_type, "neuron": record.get("neuron"),
                        "converted": {k: record.get(k) for k in ("source", "task_name", "metrics")}})


def _load_hf(path: Path, neuron: dict | None, key: str, dtype) -> LoadedModel:
    """A HF LLaMA (native, so spiking attention works), or another supported architecture
    spikified in place."""
    from spikellm.checkpoints.hf import hf_config, load_hf_causal_lm, load_hf_llama
    from spikellm.config import build_attention_encoder, build_neuron
    from spikellm.data.tokenizer import model_tokenizer
    from spikellm.models.hf import LogitsModel
    from spikellm.models.spikify import spikify_from_config

    config = hf_config(path, key=key)  # config.json readable and of a supported architecture
    tokenizer = model_tokenizer(path)
    if config.model_type == "llama":
        encoder, weight_quantizer = build_neuron(neuron)
        model = load_hf_llama(path, config, encoder, weight_quantizer, dtype)
        attention = build_attention_encoder(neuron)
        if attention is not None:
            for layer in model.layers:
                layer.self_attn.spike_products(attention)
    else:
        if build_attention_encoder(neuron) is not None:
            raise ConfigError("neuron.attention", "set", f"spiking attention products run on LLaMA only, "
                                                         f"not {config.model_type}")
        model = LogitsModel(spikify_from_config(load_hf_causal_lm(path, key=key, config=config, dtype=dtype), neuron))
    return LoadedModel(model, tokenizer, str(path), {"hf_model_type": config.model_type, "neuron": neuron})


__all__ = ["FORMATS", "LoadedModel", "detect_format", "load_model"]
