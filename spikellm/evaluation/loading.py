"""Load what eval.py evaluates: a training checkpoint, or a local Hugging Face model (spikified with
a ``neuron`` config on the fly), always with its tokenizer. Every failure is one clear line."""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from spikellm.config import build_attention_encoder, build_neuron, check_trusted
from spikellm.data.tokenizer import Tokenizer, build_tokenizer
from spikellm.errors import ConfigError, DataError

@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer, and where it came from (recorded in results.json)."""

    model: nn.Module
    tokenizer: Tokenizer
    source: str
    config: dict = field(default_factory=dict)


def load_model(ckpt: str | Path, neuron: dict | None = None, device: str = "cpu", backend: str = "auto") -> LoadedModel:
    """``ckpt`` is a Lightning checkpoint written by train.py, a spiking checkpoint directory
    (:mod:`spikellm.checkpoint`; ``backend`` picks kernels or reference), or a local Hugging Face
    model directory (``config.json`` + weights + tokenizer). ``neuron`` (a neuron config group as
    a dict) replaces a training checkpoint's encoders, or spikifies a Hugging Face model."""
    from spikellm.checkpoint import is_spiking_checkpoint

    path = Path(ckpt).expanduser()
    if not path.exists():
        raise ConfigError("ckpt", str(ckpt), "no such file or directory; pass a checkpoint written by train.py "
                                             "(outputs/.../checkpoints/last.ckpt) or a local Hugging Face model directory")
    if path.is_dir() and is_spiking_checkpoint(path):
        return _load_spiking(path, neuron, device, backend)
    loaded = _load_hf(path, neuron) if path.is_dir() else _load_checkpoint(path, neuron)
    loaded.model.to(device).eval()
    return loaded


def _load_spiking(path: Path, neuron: dict | None, device: str, backend: str) -> LoadedModel:
    from spikellm.checkpoint import load_spiking_checkpoint

    if neuron is not None:
        raise ConfigError("neuron", neuron.get("name"), "a spiking checkpoint carries its own encoders; drop the override")
    model, tokenizer, config = load_spiking_checkpoint(path, backend=backend, device=device)
    routed = sum(layer.kernel_forward is not None for layer in model.spiking_linears().values())
    return LoadedModel(model, tokenizer, str(path), {"model": config["model"], "neuron": config["neuron"],
                                                     "backend": "triton" if routed else "torch",
                                                     "kernel_layers": routed})


def _load_checkpoint(path: Path, neuron: dict | None) -> LoadedModel:
    from spikellm.training.task import CausalLMTask

    try:
        # weights_only: a checkpoint is data, never code to run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, KeyError) as error:
        raise DataError(f"{path} is not a readable checkpoint ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:160]}); it may be truncated or not written by train.py") from None
    if not isinstance(state, dict) or "state_dict" not in state or "hyper_parameters" not in state:
        raise DataError(f"{path} is not a train.py checkpoint: it has no state_dict and hyper_parameters")
    if not isinstance(state["hyper_parameters"], dict) or not isinstance(state["state_dict"], dict):
        raise DataError(f"{path} is not a train.py checkpoint: its hyper_parameters or state_dict is not a mapping")
    # the model and neuron configs in it name classes to build: only spikellm's own, before anything is built
    check_trusted(state["hyper_parameters"], path, "hyper_parameters")
    hparams = dict(state["hyper_parameters"])
    if neuron is not None:
        hparams["neuron"] = neuron
    try:
        task = CausalLMTask(**hparams)
    except TypeError as error:  # hyper_parameters that CausalLMTask does not take (or lacks)
        raise DataError(f"{path}: its hyper_parameters do not describe a train.py model ({error})") from None
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    missing, unexpected = task.model.load_state_dict(weights, strict=False)
    parameters = dict(task.model.named_parameters())
    missing = [k for k in missing if k in parameters]
    if missing or unexpected:
        raise DataError(f"{path}: weights do not match the model its config describes "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    tokenizer_state = next((v.get("tokenizer") for k, v in state.items()
                            if k.endswith("DataModule") and isinstance(v, dict)), None)
    if tokenizer_state is None:
        raise DataError(f"{path} carries no tokenizer (written before checkpoints stored one); retrain, "
                        "or evaluate a Hugging Face model directory that has its tokenizer")
    try:
        tokenizer = Tokenizer.from_state(tokenizer_state)
    except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception on a corrupt JSON
        raise DataError(f"{path}: the tokenizer it carries cannot be read ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:160] if str(error) else ''})") from None
    if tokenizer.vocab_size > task.model.config.vocab_size:
        raise DataError(f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{task.model.config.vocab_size}")
    return LoadedModel(task.model, tokenizer, str(path), {"model": hparams["model"], "neuron": hparams.get("neuron")})


def _load_hf(path: Path, neuron: dict | None) -> LoadedModel:
    """A converted model (``spikellm.json``), a HF LLaMA (native, so spiking attention works), or
    another supported architecture spikified in place."""

    from spikellm.models.hf import LogitsModel, check_hf_dir, hf_config, load_hf_causal_lm
    from spikellm.models.llama import from_hf_llama
    from spikellm.models.spikify import spikify_from_config
    from spikellm.posttrain.export import RECORD, load_converted, read_record

    check_hf_dir(path, key="ckpt")
    config = hf_config(path, key="ckpt")  # config.json readable and of a supported architecture
    tokenizer = build_tokenizer([], vocab_size=0, tokenizer_path=str(path))
    if (path / RECORD).is_file():
        if neuron is not None:
            raise ConfigError("neuron", neuron.get("name"), f"a converted model ({RECORD}) carries its own encoders; "
                                                            "drop the neuron override")
        # its neuron config names the encoders to build: only spikellm's own, before anything is built
        check_trusted({"neuron": read_record(path).get("neuron")}, path / RECORD)
        model, record = load_converted(path)
        return LoadedModel(LogitsModel(model), tokenizer, str(path),
                           {"hf_model_type": model.config.model_type, "neuron": record.get("neuron"),
                            "converted": {k: record.get(k) for k in ("source", "task_name", "metrics")}})
    hf_model = load_hf_causal_lm(path, key="ckpt")
    if config.model_type == "llama":
        encoder, weight_quantizer = build_neuron(neuron)
        model = from_hf_llama(hf_model, encoder, weight_quantizer)
        attention = build_attention_encoder(neuron)
        if attention is not None:
            for layer in model.layers:
                layer.self_attn.spike_products(attention)
    else:
        if build_attention_encoder(neuron) is not None:
            raise ConfigError("neuron.attention", "set", f"spiking attention products run on LLaMA only, "
                                                         f"not {config.model_type}")
        model = LogitsModel(spikify_from_config(hf_model, neuron))
    return LoadedModel(model, tokenizer, str(path), {"hf_model_type": config.model_type, "neuron": neuron})


__all__ = ["LoadedModel", "load_model"]
