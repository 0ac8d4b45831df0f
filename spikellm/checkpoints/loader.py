"""One loader for every model file: :func:`load_model` recognises the format (:data:`FORMATS`),
reads it through its own module, which validates it and checks what it names once, and returns the
model in eval mode with its tokenizer and its record. eval.py, the lm-eval adapter, generation and
users call this and nothing else."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from spikellm.checkpoints.loaded import LoadedModel
from spikellm.errors import ConfigError

log = logging.getLogger(__name__)

#: every on-disk format :func:`load_model` reads, with what it is (for messages and docs/model_files.md)
FORMATS = {
    "lightning": "a Lightning checkpoint written by train.py (<run>/checkpoints/last.ckpt)",
    "spiking": "a spiking checkpoint directory (<run>/spiking_checkpoint): packed integer weights and encoders",
    "converted": "a converted Hugging Face model (a directory with spikellm.json, written by a conversion)",
    "hf": "a local Hugging Face model directory (config.json, weights, tokenizer), spikified with neuron=...",
}


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
    loaded = _reader(fmt)(path, neuron=neuron, device=device, backend=backend, dtype=dtype, key=key)
    loaded.format = fmt
    fold_weight_quantizers(loaded.model)
    loaded.model.to(device).eval()
    trim_heap()  # what reading and dequantizing freed goes back now, not at some later peak
    parameters = list({id(p): p for p in loaded.model.parameters()}.values())
    log.info("loaded %s: %.3g B parameters, %.2f GB, in %.1f s", path.name,
             sum(p.numel() for p in parameters) / 1e9, sum(p.numel() * p.element_size() for p in parameters) / 1e9,
             time.perf_counter() - began)
    return loaded


def _reader(fmt: str):
    """The ``read_model(path, *, neuron, device, backend, dtype, key) -> LoadedModel`` of a format's module."""
    if fmt == "spiking":
        from spikellm.checkpoints.spiking import read_model
    elif fmt == "lightning":
        from spikellm.checkpoints.lightning import read_model
    elif fmt == "converted":
        from spikellm.checkpoints.converted import read_model
    else:
        from spikellm.checkpoints.hf import read_model
    return read_model


__all__ = ["FORMATS", "LoadedModel", "detect_format", "load_model"]
