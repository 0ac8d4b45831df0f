"""Hugging Face model directories: read one from local disk (never the hub), and write our own
dense :class:`~spikellm.models.llama.SpikingLlama` as one (so a model trained here goes through
the same conversion pipelines as a downloaded checkpoint, and runs in plain ``transformers``)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from spikellm.checkpoints.atomic import atomic_directory
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
    if config.model_type not in SPIKING_PROJECTIONS:
        raise ConfigError(key, f"{directory} ({config.model_type})", f"unsupported architecture; {SUPPORTED}")
    return config


def load_hf_causal_lm(hf_path, key: str = "hf_path", dtype: torch.dtype = torch.float32, config=None) -> nn.Module:
    """The ``AutoModelForCausalLM`` in local directory ``hf_path`` (never the hub), in eval mode.

    An architecture :func:`~spikellm.models.spikify.spikify` does not support is refused before
    any weight is read, with the list of supported ones. ``key`` names the setting in errors
    (``hf_path``: built from the ``model`` group, which prefixes ``model.``). ``config``: the
    directory's :func:`hf_config`, when the caller has already read (and so checked) it.
    """
    import transformers

    from safetensors import SafetensorError

    config = config if config is not None else hf_config(hf_path, key)
    directory = Path(str(hf_path)).expanduser()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, config=config, local_files_only=True,
                                                                  dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        detail = (str(error).splitlines() or [""])[0][:200]
        raise DataError(f"the weights in {_weight_files(directory)} cannot be loaded ({type(error).__name__}: "
                        f"{detail}); they may be truncated or not match config.json") from None
    return model.eval()


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
