"""The spiking checkpoint: what a trained spiking LLaMA is, written for inference, never pickled.

A directory holding

- ``config.json``: format and version, the model config, the neuron config, every projection's
  encoder and weight format (``int4``, ``int8``, ``ternary`` packed integers with per-row/group
  scales, or ``float``), the cost model of its energy figures;
- ``model.safetensors`` (or shards ``model-0000i-of-0000N.safetensors`` with
  ``model.safetensors.index.json`` when larger than a shard, as ``transformers`` writes them): the
  packed integer weights (``<layer>.qweight``), their scales (``<layer>.qscale``) and, where
  columns pick their scale, ``<layer>.qgidx``; every other parameter; and the encoders' buffers
  (step allocations, cluster flags, learned step scales);
- the tokenizer, and ``README.md``, a model card with the evaluation and energy figures
  (:mod:`spikellm.checkpoints.card`);
- what ``transformers`` reads (:mod:`spikellm.checkpoints.auto`): ``model_type``, ``auto_map``...
  in ``config.json`` (outside the digest), ``generation_config.json`` and ``modeling_spikellm.py``,
  so ``AutoModelForCausalLM.from_pretrained(directory)`` loads it (:mod:`spikellm.checkpoints.hub`).

:func:`load_spiking_checkpoint` rebuilds the model from these alone. A projection's weight is
rebuilt as ``integers · scale`` with the very operations its quantizer used, so the loaded model's
outputs are bit-identical to the model that wrote it (``backend="torch"``). ``backend="triton"``
runs each integer projection through the fused encoder and the spike-driven linear kernel
(:mod:`spikellm.kernels`): exact integer sums, equal to the float path up to its rounding.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from spikellm.errors import ConfigError, DataError
from spikellm.io import atomic_directory
from spikellm.checkpoints.shards import DEFAULT_SHARD_BYTES, WEIGHTS, TensorFiles, weights_digest, write_tensors
from spikellm.checkpoints.weights import cast_as_stored, is_packed_tensor, main_dtype, read_packed, stored_tensors
from spikellm.nn.spiking_linear import SpikingLinear
from spikellm.nn.storage import assign_parameters, empty_names, empty_parameters

FORMAT = "spikellm-spiking-checkpoint"
VERSION = 1
DIGEST = "config_digest"  # the weights' metadata key binding them to config.json
WEIGHTS_DIGEST = "weights_sha256"  # config.json's key binding it to the weights' tensor digests
BACKENDS = ("auto", "torch", "triton")


@torch.no_grad()
def save_spiking_checkpoint(model, directory, *, model_config: dict, neuron: dict | None, tokenizer,
                            card: dict | None = None, cost_model: str | None = None, overwrite: bool = False,
                            thresholds: dict[str, float] | None = None,
                            max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                            dtypes: dict[str, torch.dtype] | None = None) -> Path:
    """Write ``model`` (a :class:`~spikellm.models.llama.SpikingLlama` or a
    :class:`~spikellm.models.matmulfree.MatMulFreeLM`) as a spiking checkpoint; ``thresholds``:
    activation-sparsity thresholds (:mod:`spikellm.sparsity`) by layer name, reinstalled on load.
    Weights over ``max_shard_bytes`` are sharded with an index, as ``transformers`` does.
    ``dtypes``: the dtype to store named floating-point tensors in (else as held)."""
    from spikellm.checkpoints.auto import transformers_fields, write_transformers_files
    from spikellm.checkpoints.card import model_card

    layers, tensors = stored_tensors(model, model.spiking_linears())
    config = {"format": FORMAT, "version": VERSION, "model": model_config, "neuron": neuron, "layers": layers,
              "cost_model": cost_model, "card": card or {}, "thresholds": dict(thresholds or {})}
    # what transformers reads (AutoModelForCausalLM, pipeline, lm-eval's hf model): not bound by the digest
    config.update(transformers_fields(model.config, tokenizer, None))
    written: dict = {}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        digests: dict[str, str] = {}
        write_tensors(tmp, cast_as_stored(tensors, dtypes, written), {"format": FORMAT, DIGEST: config_digest(config)},
                      max_shard_bytes, digests)
        config["torch_dtype"] = main_dtype(written, model)
        config[WEIGHTS_DIGEST] = weights_digest(digests)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        tokenizer.save(tmp)
        write_transformers_files(tmp, config)
        (tmp / "README.md").write_text(model_card(config, Path(directory).name))
    return Path(directory)


def config_digest(config: dict) -> str:
    """SHA-256 of what config.json says the weights are (model, neuron, layers, thresholds), stored
    in the weights' metadata: an edit of config.json that keeps the tensor shapes (another
    ``n_heads``, another encoder) would otherwise load, and evaluate, a different model silently."""
    import hashlib

    bound = {key: config.get(key) for key in ("model", "neuron", "layers", "thresholds")}
    return hashlib.sha256(json.dumps(bound, sort_keys=True, default=str).encode()).hexdigest()


def read_config(directory) -> dict:
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path} cannot be read ({type(error).__name__}: {error}); the checkpoint is incomplete") from None
    if not isinstance(config, dict):
        raise DataError(f"{path} holds a JSON {type(config).__name__}, not an object; it is not a spikellm spiking checkpoint")
    if config.get("format") != FORMAT:
        raise DataError(f"{path} is not a spikellm spiking checkpoint (format {config.get('format')!r})")
    if config.get("version") != VERSION:
        raise DataError(f"{path} has format version {config.get('version')!r}; this spikellm reads version {VERSION}")
    if not isinstance(config.get("model"), dict) or not isinstance(config.get("layers"), dict) or not isinstance(
            config.get("neuron") or {}, dict):
        raise DataError(f"{path} lacks its model, layers or neuron record (or one is not an object); "
                        "the checkpoint is incomplete")
    from spikellm.config.trust import check_trusted

    # the model and neuron configs name the classes to build: only spikellm's own, before anything is built
    check_trusted({"model": config.get("model"), "neuron": config.get("neuron")}, path)
    return config


def is_spiking_checkpoint(directory) -> bool:
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


@torch.no_grad()
def load_spiking_checkpoint(directory, backend: str = "auto", device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32):
    """``(model in eval mode, tokenizer, config)`` from a directory written by :func:`save_spiking_checkpoint`.

    The model is built without memory and each tensor read into place (packed weights
    dequantized once, to ``dtype``): loading holds the model and one tensor more.
    ``backend``: ``torch`` (the float collapsed form, bit-identical to the writer), ``triton``
    (the kernels; CUDA or the Triton interpreter), ``auto`` (triton on a CUDA device, else torch).
    Anything missing, corrupt or inconsistent is a DataError naming it; no partial model is returned.
    """
    from spikellm.config import build, build_attention_encoder, build_neuron
    from spikellm.data.tokenizer import model_tokenizer

    if backend not in BACKENDS:
        raise ConfigError("backend", backend, "must be one of: " + ", ".join(BACKENDS))
    directory = Path(directory)
    config = read_config(directory)
    files = TensorFiles(directory, fix="export the checkpoint again")
    neuron = config.get("neuron")
    encoder, _ = build_neuron(neuron)
    # the per-layer record is what the weights were written under; the neuron block may have been edited
    rotations = {bool(info.get("rotate", False)) for info in config["layers"].values() if isinstance(info, dict)}
    rotate = rotations.pop() if len(rotations) == 1 else bool((neuron or {}).get("rotate", False))
    model_config = build(config["model"], "model")
    if not callable(getattr(model_config, "build", None)):
        raise DataError(f"{directory}/config.json: model._target_={config['model'].get('_target_')!r} is not a "
                        "model config (LlamaConfig, MatMulFreeConfig)")
    with empty_parameters():
        model = model_config.build(encoder, None, attention_encoder=build_attention_encoder(neuron), rotate=rotate)
    modules = dict(model.named_modules())
    for name, info in config["layers"].items():
        layer = modules.get(name)
        if not isinstance(info, dict) or not isinstance(layer, SpikingLinear) or (
                layer.in_features, layer.out_features) != (info.get("in_features"), info.get("out_features")):
            raise DataError(f"{directory}: layer {name!r} of config.json does not match the model it describes")
        if bool(layer.rotate) != bool(info.get("rotate", False)):
            raise DataError(f"{directory}: layer {name!r} is recorded with rotate={info.get('rotate')} but the model "
                            "rotates its layers uniformly; mixed rotation is not a format this spikellm reads")
    weights = files.directory / WEIGHTS
    expected = set(model.state_dict())
    try:
        with files.progress(f"loading {directory.name}"):
            packed = read_packed(files, config["layers"], weights)
            plain = [name for name in files.names() if not is_packed_tensor(name, packed)]
            unexpected = assign_parameters(model, ((name, files.get(name)) for name in plain), packed, dtype)
    except ValueError as error:  # a shape mismatch: config.json describes another model than the weights
        raise DataError(f"{weights} does not match config.json: {error}") from None
    for name in packed:
        modules[name].rotation_folded = torch.tensor(True)  # the weight is stored rotated
    tied = {"lm_head.weight"} if getattr(model.config, "tie_embeddings", False) else set()
    given = set(plain) | {f"{name}.weight" for name in packed}
    missing = sorted(expected - given - tied) + [n for n in empty_names(model) if n not in expected]
    if missing or unexpected:
        raise DataError(f"{weights} does not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    # an edit that keeps every shape (another n_heads, another encoder) passes the checks above;
    # checkpoints written before the digest have none
    if config.get("model_type") is not None and config.get(WEIGHTS_DIGEST) is None:
        # written with the transformers fields, so with digests: a config.json without one was edited
        raise DataError(f"{directory}/config.json lacks the digest of its weights ({WEIGHTS_DIGEST}) that every "
                        "checkpoint written with transformers fields carries: export the checkpoint again")
    files.check_digest(config.get(WEIGHTS_DIGEST), "config.json")
    written = files.metadata.get(DIGEST)
    if written is not None and written != config_digest(config):
        raise DataError(f"{directory}/config.json is not the one its weights were written with (its model, neuron "
                        "or layer record was edited): restore it, or export the model again")
    if config.get("thresholds"):
        from spikellm.sparsity import install_thresholds

        try:
            install_thresholds(model, config["thresholds"], names=list(config["thresholds"]))
        except (ConfigError, AttributeError) as error:
            raise DataError(f"{directory}/config.json: its activation thresholds name layers the model "
                            f"does not have ({error})") from None
    model.to(device).eval()
    if backend == "triton" or (backend == "auto" and torch.device(device).type == "cuda"):
        from spikellm.nn.kernel_linear import use_kernels

        use_kernels(model)
    tokenizer = model_tokenizer(directory)
    if tokenizer.vocab_size > model.config.vocab_size:  # ids the embedding has no row for
        raise DataError(f"{directory}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.config.vocab_size} embeddings; the tokenizer is not the one it was trained with")
    return model, tokenizer, config


def load_spiking_model(checkpoint: str | Path) -> torch.nn.Module:
    """The model of a spiking checkpoint alone (torch backend): ``model=native`` of train.py's conversion."""
    return load_spiking_checkpoint(checkpoint, backend="torch")[0]


def read_model(path: Path, *, neuron=None, device="cpu", backend: str = "auto", dtype=torch.float32, key: str = "ckpt"):
    """:func:`load_spiking_checkpoint` as :func:`~spikellm.checkpoints.load_model` reads every format."""
    from spikellm.checkpoints.loaded import LoadedModel

    model, tokenizer, config = load_spiking_checkpoint(path, backend=backend, device=device, dtype=dtype)
    routed = sum(layer.kernel_forward is not None for layer in model.spiking_linears().values())
    return LoadedModel(model, tokenizer, str(path), {"model": config["model"], "neuron": config["neuron"],
                                                     "backend": "triton" if routed else "torch",
                                                     "kernel_layers": routed})
