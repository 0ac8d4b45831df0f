"""Hugging Face model directories: read one from local disk (never the hub), and write our own
dense :class:`~spikellm.models.llama.SpikingLlama` as one (so a model trained here goes through
the same conversion pipelines as a downloaded checkpoint, and runs in plain ``transformers``)."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn

from spikellm.io import atomic_directory
from spikellm.errors import ConfigError, DataError
from spikellm.models.spikify import SPIKING_PROJECTIONS, SUPPORTED


def check_hf_dir(path, key: str = "model.hf_path") -> Path:
    """``path`` as a Path if it is a local Hugging Face model directory, else a ConfigError saying so."""
    if path is None or str(path) in ("", "???"):
        raise ConfigError(key, "???" if path is None else path, "pass a local Hugging Face model directory (config.json, weights, tokenizer), "
                                     f"e.g. {key}=/models/Llama-2-7b-hf")
    directory = Path(str(path)).expanduser()
    if not directory.is_dir():
        raise ConfigError(key, str(path), "no such directory; weights are never downloaded at run time: "
                                          "download the model first (huggingface-cli download) and pass its directory")
    if not (directory / "config.json").is_file():
        raise ConfigError(key, str(path), "has no config.json: it is not a Hugging Face model directory")
    return directory


def hf_config(hf_path, key: str = "model.hf_path"):
    """The ``AutoConfig`` of a local model directory, refused (with the supported list) when
    :func:`~spikellm.models.spikify.spikify` does not know its architecture. Reads config.json only."""
    import transformers

    directory = check_hf_dir(hf_path, key)
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"{directory}/config.json cannot be read ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:160]})") from None
    return check_architecture(config, directory, key)


def check_architecture(config, directory, key: str):
    """``config``, refused (with the supported list) when its architecture cannot be spikified."""
    if config.model_type not in SPIKING_PROJECTIONS:
        raise ConfigError(key, f"{directory} ({config.model_type})", f"unsupported architecture; {SUPPORTED}")
    return config


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(value, key: str = "dtype") -> torch.dtype | None:
    """``auto``/None (None: the caller's default), a torch dtype, or one of :data:`DTYPES` by name."""
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(key, value, "must be auto, float32, bfloat16 or float16")
    return DTYPES[name]


def stored_dtype(directory, config=None) -> torch.dtype:
    """The dtype a Hugging Face directory's weights are stored in: its config's ``dtype`` (or
    ``torch_dtype``), else that of its first floating-point tensor, else fp32."""
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    try:
        parsed = parse_dtype(declared)
    except ConfigError:
        parsed = None
    if parsed is not None:
        return parsed
    from spikellm.checkpoints.shards import TensorFiles, has_weights

    if has_weights(directory):
        files = TensorFiles(directory)
        for name in files.names():
            if files.dtype(name).is_floating_point:
                return files.dtype(name)
    return torch.float32


def load_hf_causal_lm(hf_path, key: str = "hf_path", dtype: torch.dtype | str | None = torch.float32,
                      config=None, blocks_on_disk: bool = False) -> nn.Module:
    """The ``AutoModelForCausalLM`` in local directory ``hf_path`` (never the hub), in eval mode,
    in ``dtype`` (``auto``/None: the dtype it is stored in).

    The model is built without memory and each tensor of its safetensors files read into place,
    shard by shard (a directory with pickled ``.bin`` weights only goes through ``transformers``).
    An architecture :func:`~spikellm.models.spikify.spikify` does not support is refused before
    any weight is read, with the list of supported ones. ``key`` names the setting in errors
    (``hf_path``: built from the ``model`` group, which prefixes ``model.``). ``config``: the
    directory's :func:`hf_config`, when the caller has already read (and so checked) it.
    ``blocks_on_disk``: the decoder blocks' tensors stay in their files until a block needs them
    (:func:`~spikellm.nn.storage.keep_on_disk`; a conversion, which runs one block at a time).
    """
    import transformers

    from spikellm.checkpoints.shards import has_weights
    from spikellm.nn.storage import empty_parameters

    config = config if config is not None else hf_config(hf_path, key)
    directory = Path(str(hf_path)).expanduser()
    dtype = parse_dtype(dtype, key) or stored_dtype(directory, config)
    if not has_weights(directory):
        return _transformers_load(directory, config, dtype)
    with empty_parameters():
        model = transformers.AutoModelForCausalLM.from_config(config)
    on_disk = None
    from spikellm.models.spikify import block_prefixes, layout_of

    if blocks_on_disk and layout_of(model).weights_stay:

        blocks = tuple(block_prefixes(model))  # "model.layers.<i>."
        on_disk = lambda name: name.startswith(blocks)  # noqa: E731
    fill_from_files(model, directory, dtype, prefix=getattr(model, "base_model_prefix", "") or "", on_disk=on_disk)
    return model.eval()


def fill_from_files(model: nn.Module, directory: Path, dtype: torch.dtype, prefix: str = "",
                    rename=None, on_disk=None) -> None:
    """Read the tensors of a model directory into ``model`` (built with empty parameters), one at a
    time, in ``dtype``. Names are the model's own, or differ by the base model's ``prefix``
    (``model.``) as some checkpoints store them; ``rename(name)`` maps names first (None: drop).
    Parameters whose (model) name ``on_disk(name)`` accepts are not read: they stay in the file
    until used (:func:`~spikellm.nn.storage.keep_on_disk`), checked for shape now.
    A tensor the model does not have, or a parameter no file has, is a DataError."""
    from spikellm.checkpoints.shards import TensorFiles
    from spikellm.nn.storage import assign_parameters, empty_names, keep_on_disk

    fix = "download the model again"
    files = TensorFiles(directory, fix=fix)
    expected = set(model.state_dict())
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]

    def model_name(name: str) -> str | None:
        name = rename(name) if rename is not None else name
        if name is None or name in expected:
            return name
        for candidate in (f"{prefix}.{name}", name.removeprefix(f"{prefix}.")) if prefix else ():
            if candidate in expected:
                return candidate
        if name.endswith("rotary_emb.inv_freq") or any(p.search(name) for p in ignored):
            return None  # buffers older checkpoints stored, which the model computes itself
        return name

    names = [(model_name(name), name) for name in files.names()]
    later = [(ours, theirs) for ours, theirs in names if ours is not None and on_disk is not None and on_disk(ours)]
    now = [(ours, theirs) for ours, theirs in names if ours is not None and (ours, theirs) not in later]
    try:
        with files.progress(f"loading {directory.name}"):
            unexpected = assign_parameters(model, ((ours, files.get(theirs)) for ours, theirs in now), dtype=dtype)
        # an empty stand-in of the file's shape now (checked against the model's), the values when needed
        unexpected += assign_parameters(model, ((ours, torch.zeros((), dtype=dtype).expand(files.shape(theirs)))
                                                for ours, theirs in later))
        parameters = dict(model.named_parameters(remove_duplicate=False))
        for ours, theirs in later:
            if ours in parameters:
                keep_on_disk(parameters[ours], lambda theirs=theirs: files.get(theirs, dtype))
    except ValueError as error:
        raise DataError(f"the weights in {_weight_files(directory)} do not match config.json: {error}") from None
    missing = empty_names(model)
    if missing or unexpected:
        raise DataError(f"the weights in {_weight_files(directory)} do not match config.json (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}); {fix}")


def _transformers_load(directory: Path, config, dtype: torch.dtype) -> nn.Module:
    import transformers

    from safetensors import SafetensorError

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, config=config, local_files_only=True,
                                                                  dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as error:
        if _refused_pickle(error):
            raise DataError(f"the weights in {_weight_files(directory)} are a pickle that holds code or objects "
                            "other than tensors, which spikellm refuses to run; convert them to safetensors (in an "
                            "environment you trust: save_pretrained(..., safe_serialization=True))") from None
        detail = (str(error).splitlines() or [""])[0][:200]
        raise DataError(f"the weights in {_weight_files(directory)} cannot be loaded ({type(error).__name__}: "
                        f"{detail}); they may be truncated or not match config.json") from None
    return model.eval()


def _refused_pickle(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is ``torch.load(weights_only=True)`` refusing a pickle."""
    while error is not None:
        if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def load_hf_llama(directory, config, encoder=None, weight_quantizer=None, dtype: torch.dtype = torch.float32):
    """A :class:`~spikellm.models.llama.SpikingLlama` holding the weights of the Hugging Face LLaMA
    in ``directory`` (whose :func:`hf_config` is ``config``), read into place in ``dtype``."""
    from spikellm.checkpoints.shards import has_weights
    from spikellm.models.llama import config_from_hf, from_hf_llama
    from spikellm.nn.storage import empty_parameters

    directory = Path(directory)
    if not has_weights(directory):
        hf_model = _transformers_load(directory, config, dtype or stored_dtype(directory, config))
        return from_hf_llama(hf_model, encoder, weight_quantizer)
    with empty_parameters():
        model = config_from_hf(config).build(encoder, weight_quantizer)
    fill_from_files(model, directory, dtype, rename=lambda name: name.removeprefix("model."))
    return model


def _weight_files(directory: Path) -> str:
    """The weight file(s) of a model directory, for an error message: ``<dir>/model.safetensors``."""
    files = sorted(p.name for p in directory.glob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    if len(files) == 1:
        return str(directory / files[0])
    return f"{directory} ({', '.join(files[:4])}{', ...' if len(files) > 4 else ''})" if files else str(directory)


def to_hf_llama(model, dequantize: bool = False) -> nn.Module:
    """A ``transformers.LlamaForCausalLM`` with the weights of a :class:`SpikingLlama`.

    A spiking model is refused unless ``dequantize``: then each projection gets the weight it
    multiplies (quantized values, as floats) and the encoders are dropped, for users who want the
    weights' accuracy in plain ``transformers``; its activations are floating point there.
    """
    import transformers

    from spikellm.models.llama import SpikingLlama

    if not isinstance(model, SpikingLlama):
        raise ConfigError("model", type(model).__name__, "only a SpikingLlama exports to a Hugging Face LLaMA")
    layers = model.spiking_linears()
    if any(m.rotate for m in layers.values()):
        raise ConfigError("model", "rotate=true", "a rotated model's projections expect rotated inputs, which a "
                                                  "Hugging Face LLaMA does not compute")
    spiking = [name for name, m in layers.items() if m.encoder is not None or m.weight_quantizer is not None]
    if not dequantize and (spiking or any(layer.self_attn.encoder is not None for layer in model.layers)):
        raise ConfigError("model", "spiking", "export the dense model (trained with neuron=none), or dequantize: "
                                              "a spiking model's encoders have no place in a Hugging Face LLaMA")
    cfg = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attention_bias=False, mlp_bias=False,
    )
    hf_model = transformers.LlamaForCausalLM(hf_config)
    effective = {f"{name}.weight": m.effective_weight().detach() for name, m in layers.items()}
    state = {("" if key.startswith("lm_head") else "model.") + key: effective.get(key, value)
             for key, value in model.state_dict().items() if key in dict(model.named_parameters())
             or key == "lm_head.weight"}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError("model", f"missing={missing[:3]} unexpected={unexpected[:3]}",
                          "does not map onto a Hugging Face LLaMA")
    return hf_model.eval()


def save_hf_llama(model, tokenizer, directory, dequantize: bool = True) -> Path:
    """Write ``model`` (a SpikingLlama; see :func:`to_hf_llama`) and its tokenizer as a Hugging Face
    model directory, atomically: a directory that exists afterwards is complete; an existing one
    is refused."""
    hf_model = to_hf_llama(model, dequantize=dequantize)
    with atomic_directory(directory) as tmp:
        hf_model.save_pretrained(tmp)  # transformers >= 5 writes safetensors only: nothing pickled
        tokenizer.save(tmp)
    return Path(directory)


def read_model(path: Path, *, neuron=None, device="cpu", backend: str = "auto", dtype=torch.float32,
               key: str = "ckpt"):
    """A local Hugging Face model as :func:`~spikellm.checkpoints.load_model` reads every format:
    a LLaMA read into our own (so spiking attention works), another supported architecture
    spikified in place (:func:`~spikellm.models.spikify.spiking_causal_lm`)."""
    from spikellm.checkpoints.loaded import LoadedModel
    from spikellm.config import build_attention_encoder, build_neuron
    from spikellm.data.tokenizer import model_tokenizer
    from spikellm.models.spikify import spiking_causal_lm

    config = hf_config(path, key=key)  # config.json readable and of a supported architecture
    tokenizer = model_tokenizer(path)
    if config.model_type == "llama":
        encoder, weight_quantizer = build_neuron(neuron)
        model = load_hf_llama(path, config, encoder, weight_quantizer, dtype)
        attention = build_attention_encoder(neuron)
        if attention is not None:
            model.spike_attention(attention)
    else:
        if build_attention_encoder(neuron) is not None:
            raise ConfigError("neuron.attention", "set", f"spiking attention products run on LLaMA only, "
                                                         f"not {config.model_type}")
        model = spiking_causal_lm(load_hf_causal_lm(path, key=key, config=config, dtype=dtype), neuron)
    return LoadedModel(model, tokenizer, str(path), {"hf_model_type": config.model_type, "neuron": neuron})
