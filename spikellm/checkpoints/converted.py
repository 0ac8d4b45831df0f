"""A converted model on disk: a Hugging Face directory plus what makes it spiking.

``config.json`` holds the original model's config under ``hf_config`` (format 3; formats 1 and
2 hold it as the whole file) beside what ``transformers`` reads to load the directory as a
:class:`~spikellm.checkpoints.hub.SpikellmForCausalLM` (see :mod:`spikellm.checkpoints.auto`);
the tokenizer is the original model's. The weights (``model.safetensors``,
or shards with ``model.safetensors.index.json``) hold every quantized projection as packed
integers and scales (``<layer>.qweight``, ``.qscale``, ``.qgidx``: int4, ternary or int8), every
other tensor in the dtype the conversion held it (the source's: bf16 for a bf16 download), and
the encoders' buffers (OBS channel scales). ``spikellm.json`` records the neuron config it was
spikified with (weight quantizers folded: none), each projection's weight format, the activation
thresholds, and what each conversion stage did; the weights' metadata binds them to it.

:func:`load_converted` builds the model with empty parameters and reads each tensor into place
(packed weights dequantized once), offline. Version 1 files (float weights, a weight quantizer in
the record) still load: their quantizers are folded once at load.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from spikellm.io import atomic_directory
from spikellm.checkpoints.shards import DEFAULT_SHARD_BYTES, TensorFiles, weights_digest, write_tensors
from spikellm.checkpoints.weights import is_packed_tensor, read_packed, stored_tensors
from spikellm.errors import DataError

FORMAT = "spikellm-converted"
FORMAT_VERSION = 3
READS = (1, 2, 3)
RECORD = "spikellm.json"
DIGEST = "record_digest"
WEIGHTS_DIGEST = "weights_sha256"  # the record's key binding it to the weights' tensor digests


def record_digest(record: dict) -> str:
    """SHA-256 of what the record says the weights are (neuron, layers, thresholds)."""
    bound = {key: record.get(key) for key in ("neuron", "layers", "thresholds")}
    return hashlib.sha256(json.dumps(bound, sort_keys=True, default=str).encode()).hexdigest()


def save_converted(model: nn.Module, tokenizer, directory, record: dict, overwrite: bool = False,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES, hf_config: dict | None = None,
                   dtypes: dict[str, torch.dtype] | None = None) -> Path:
    """Write the spikified HF ``model`` (all of it or nothing) with ``tokenizer`` and ``record``
    (``neuron``, ``thresholds``, ``stages``, ``source``, ``metrics``, ``card``) to ``directory``:
    quantized projections packed, weight quantizers folded, sharded over ``max_shard_bytes``.
    ``model`` may also be the native :class:`~spikellm.models.llama.SpikingLlama` a converted LLaMA
    loads as; ``hf_config`` (its Hugging Face config as a dict) then says what it was converted from.
    ``dtypes``: the dtype to store named (file names) floating-point tensors in (else as held)."""
    from spikellm.checkpoints.auto import transformers_fields, write_transformers_files
    from spikellm.checkpoints.card import model_card
    from spikellm.checkpoints.weights import cast_as_stored, main_dtype
    from spikellm.models.spikify import spiking_modules

    native = hf_config is not None and not hasattr(model.config, "to_dict")
    hf_config = hf_config if hf_config is not None else model.config.to_dict()
    rename = _hf_name if native else (lambda name: name)
    layers, tensors = stored_tensors(model, spiking_modules(model))
    layers = {rename(name): info for name, info in layers.items()}
    neuron = dict(record.get("neuron") or {}, weight_quantizer=None) if record.get("neuron") else record.get("neuron")
    record = {"format": FORMAT, "version": FORMAT_VERSION, **record, "neuron": neuron, "layers": layers}
    config = {**transformers_fields(_config_object(hf_config), tokenizer, None), "format": FORMAT,
              "version": FORMAT_VERSION, "hf_config": hf_config}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        written, digests = {}, {}
        write_tensors(tmp, cast_as_stored(((rename(name), tensor) for name, tensor in tensors), dtypes, written),
                      {"format": FORMAT, DIGEST: record_digest(record)}, max_shard_bytes, digests)
        config["torch_dtype"] = main_dtype(written, model)
        record[WEIGHTS_DIGEST] = weights_digest(digests)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        tokenizer.save(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str))
        write_transformers_files(tmp, config)
        card = {**config, **record, "cost_model": (record.get("metrics") or {}).get("cost_model"),
                "card": conversion_card(record)}
        (tmp / "README.md").write_text(model_card(card, Path(directory).name))
    return Path(directory)


def _hf_name(name: str) -> str:
    """The ``transformers`` name of a native LLaMA's tensor (its body lives under ``model.``)."""
    return name if name.startswith("lm_head") else f"model.{name}"


def _config_object(hf_config: dict):
    from types import SimpleNamespace

    return SimpleNamespace(**hf_config)


def conversion_card(record: dict) -> dict:
    """The model card's figures of a conversion: its record's metrics and what it started from."""
    metrics = record.get("metrics") or {}
    final = metrics.get("final_ppl")
    card = {"base model": record.get("source"), "perplexity": None if final is None else round(float(final), 4),
            "stages": ", ".join(record.get("stages") or {}) or "none", **(record.get("card") or {})}
    for key in ("fp_ppl", "spiking_ppl"):
        if metrics.get(key) is not None:
            card[key.replace("_", " ")] = round(float(metrics[key]), 4)
    for key, name in (("energy_per_token_after_J", "energy per token (J)"),
                      ("dense_energy_per_token_J", "dense energy per token (J)"),
                      ("spikes_per_activation", "spikes per activation")):
        if metrics.get(key) is not None:
            card[name] = metrics[key]
    return {key: value for key, value in card.items() if value is not None}


def converted_hf_config(directory: Path):
    """The Hugging Face config of the model a converted directory holds: ``hf_config`` of its
    ``config.json`` (format 3), or that file itself (formats 1 and 2)."""
    from spikellm.checkpoints.hf import hf_config

    try:
        written = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        written = None
    if not isinstance(written, dict) or not isinstance(written.get("hf_config"), dict):
        return hf_config(directory, key="ckpt")  # readable, of a supported architecture
    import transformers

    from spikellm.checkpoints.hf import check_architecture

    fields = dict(written["hf_config"])
    try:
        config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (KeyError, ValueError, TypeError) as error:
        raise DataError(f"{directory}/config.json: its hf_config cannot be read ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:160] if str(error) else ''}); convert the model again") from None
    return check_architecture(config, directory, key="ckpt")


def read_record(directory) -> dict:
    path = Path(directory) / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path} cannot be read ({type(error).__name__}: {error}); the converted model is "
                        "incomplete, convert it again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") not in READS:
        found = (record.get("format"), record.get("version")) if isinstance(record, dict) else (None, None)
        raise DataError(f"{path} is not a spikellm converted model of format version "
                        f"{' or '.join(map(str, READS))} (found {found[0]!r} v{found[1]!r})")
    if not isinstance(record.get("layers") or {}, dict):
        raise DataError(f"{path}: its layers record is not an object; convert the model again")
    from spikellm.config.trust import check_trusted

    check_trusted({"neuron": record.get("neuron")}, path)  # what a converted model rebuilds is our own code only
    return record


@torch.no_grad()
def load_converted(directory, dtype: torch.dtype | None = torch.float32, native: bool = False) -> tuple[nn.Module, dict]:
    """The spiking model saved by :func:`save_converted` (eval mode) and its record, in ``dtype``
    (None: as stored). ``native``: a LLaMA comes back as our :class:`~spikellm.models.llama.SpikingLlama`
    (its names are the Hugging Face ones without ``model.``; it encodes q/k/v and gate/up once each
    and decodes with its own KV cache), which computes what ``transformers``' LLaMA computes
    (to ≤ 1e-5); otherwise, and for every other architecture, the spikified ``transformers`` model."""
    from spikellm.models.spikify import spiking_modules
    from spikellm.nn.spiking_linear import fold_weight_quantizers
    from spikellm.nn.storage import assign_parameters, empty_names
    from spikellm.sparsity import install_thresholds

    directory = Path(directory)
    record = read_record(directory)  # validated and its neuron config checked: once
    config = converted_hf_config(directory)  # readable, of a supported architecture
    files = TensorFiles(directory, fix="convert the model again")
    model, rename = _skeleton(config, record.get("neuron"), native)
    where = files.directory / "model.safetensors"
    expected = set(model.state_dict())
    try:
        with files.progress(f"loading {directory.name}"):
            packed = {rename(name): weight for name, weight in
                      read_packed(files, record.get("layers") or {}, where).items()}
            plain = [name for name in files.names() if not is_packed_tensor(rename(name), packed)]
            if dtype is None:  # as stored: the dtype of the tensors kept as they were
                dtype = next((files.dtype(n) for n in plain if files.dtype(n).is_floating_point), torch.float32)
            unexpected = assign_parameters(model, ((rename(name), files.get(name)) for name in plain), packed, dtype)
    except ValueError as error:
        raise DataError(f"{where} does not match the model {RECORD} describes: {error}") from None
    given = {rename(name) for name in plain} | {f"{name}.weight" for name in packed}
    tied = {name for name in expected - given if name.endswith("lm_head.weight")} if getattr(
        config, "tie_word_embeddings", False) else set()
    missing = sorted(expected - given - tied) + [n for n in empty_names(model) if n not in expected]
    if missing or unexpected:
        raise DataError(f"{where} does not match the model {RECORD} describes "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if record.get("version", 0) >= 3 and record.get(WEIGHTS_DIGEST) is None:  # format 3 always carries one
        raise DataError(f"{directory / RECORD} lacks the digest of its weights ({WEIGHTS_DIGEST}) that format 3 "
                        "carries: it was edited; convert the model again")
    files.check_digest(record.get(WEIGHTS_DIGEST), RECORD)
    written = files.metadata.get(DIGEST)
    if written is not None and written != record_digest(record):
        raise DataError(f"{directory / RECORD} is not the one its weights were written with (its neuron, layers "
                        "or thresholds were edited): restore it, or convert the model again")
    layers = spiking_modules(model)
    for name in packed:
        layers[name].rotation_folded = torch.tensor(True)
    fold_weight_quantizers(model)  # a version-1 record keeps its quantizer: applied once, here
    if record.get("thresholds"):
        thresholds = {rename(name): value for name, value in record["thresholds"].items()}
        install_thresholds(model, thresholds, names=list(thresholds))
    return model.eval(), record


def _skeleton(config, neuron: dict | None, native: bool):
    """``(model with empty parameters, rename: file name -> model name)`` for a converted model."""
    import transformers

    from spikellm.errors import ConfigError
    from spikellm.models.spikify import spikify_from_config
    from spikellm.nn.storage import empty_parameters

    if native and config.model_type == "llama":
        from spikellm.config import build_neuron
        from spikellm.models.llama import config_from_hf

        try:
            ours = config_from_hf(config)
        except ConfigError:  # biases, scaled RoPE: transformers' own LLaMA computes those
            ours = None
        if ours is not None:
            encoder, weight_quantizer = build_neuron(neuron)
            options = neuron or {}
            with empty_parameters():
                model = ours.build(encoder, weight_quantizer, unroll=bool(options.get("unroll", False)),
                                   rotate=bool(options.get("rotate", False)))
            return model, lambda name: name.removeprefix("model.")
    with empty_parameters():
        model = transformers.AutoModelForCausalLM.from_config(config)
    spikify_from_config(model, neuron)
    return model, lambda name: name


def read_model(path: Path, *, neuron=None, device="cpu", backend: str = "auto", dtype=torch.float32, key: str = "ckpt"):
    """A converted model as :func:`~spikellm.checkpoints.load_model` reads every format: a LLaMA as
    our own (shared encodings, our cache), another architecture as its spikified HF model."""
    from spikellm.checkpoints.loaded import LoadedModel
    from spikellm.data.tokenizer import model_tokenizer
    from spikellm.models.hf import LogitsModel

    model, record = load_converted(path, dtype, native=True)
    tokenizer = model_tokenizer(path)
    model_type = getattr(model.config, "model_type", "llama")
    return LoadedModel(model if hasattr(model, "spiking_linears") else LogitsModel(model), tokenizer, str(path),
                       {"hf_model_type": model_type, "neuron": record.get("neuron"),
                        "converted": {k: record.get(k) for k in ("source", "task_name", "metrics")}})
