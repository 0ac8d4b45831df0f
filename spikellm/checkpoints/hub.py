"""spikellm models as ``transformers`` models: ``AutoModelForCausalLM``, ``generate``, ``pipeline``,
``lm_eval --model hf``, ``save_pretrained`` / ``push_to_hub``.

:class:`SpikellmForCausalLM` is a thin ``PreTrainedModel`` around the very module
:func:`~spikellm.checkpoints.load_model` returns (its ``.model``): the same weights, encoders and
code, so its logits, spikes and energy are spikellm's. ``from_pretrained`` reads the directory (or
Hub repository) with :func:`~spikellm.checkpoints.load_model`; ``save_pretrained`` writes the
format it came from (packed weights, encoders, record, card) again. Decoding keeps the model's own
state in a :class:`SpikingCache`: keys, values and the per-channel running maxima of spiking
attention (:class:`~spikellm.models.llama.KVCache`), or the MatMul-free LM's recurrent states; a
spikified ``transformers`` model keeps its own cache.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from spikellm.checkpoints.auto import GENERATION_FILE, MODEL_TYPE, transformers_fields
from spikellm.checkpoints.hub_config import SpikellmConfig
from spikellm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# from_pretrained options that ask for something a spikellm model cannot be (it is quantized and
# placed by spikellm): refused, not ignored
_REFUSED = ("quantization_config", "load_in_4bit", "load_in_8bit", "gguf_file", "tp_plan", "adapter_name")


class SpikingCache(Cache):
    """A spikellm model's decoding state as ``generate`` carries it from step to step: ``state``
    (what the model's ``new_state()`` made: a :class:`~spikellm.models.llama.KVCache`, or the
    MatMul-free LM's :class:`~spikellm.models.matmulfree.RecurrentState`) and the number of
    tokens it holds."""

    def __init__(self):
        super().__init__(layers=[])
        self.state, self.length = None, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reset(self) -> None:
        self.state, self.length = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows ``beam_idx`` (beam search)."""
        self.state = _map_rows(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state = _map_rows(self.state, lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = _map_rows(self.state, lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a spiking model's cache cannot be cropped (its per-channel running maxima and "
                                  "recurrent states only grow): generate without an assistant model")


def _map_rows(state, apply):
    """``state`` with ``apply`` on every tensor's batch rows."""
    if state is None:
        return None
    from spikellm.models.matmulfree import RecurrentState

    if isinstance(state, RecurrentState):  # one [B, dim] per layer
        state.layers = None if state.layers is None else [apply(t) for t in state.layers]
        return state
    for layer in state.layers:  # a KVCache
        if layer.keys is not None:
            layer.keys, layer.values = apply(layer.keys), apply(layer.values)
        layer.bounds = {role: apply(bound) for role, bound in layer.bounds.items()}
    return state


class SpikellmForCausalLM(PreTrainedModel, GenerationMixin):
    """A spikellm model (native spiking LLaMA, with or without spiking attention; the MatMul-free
    LM; a spikified ``transformers`` model) as a ``transformers`` causal LM.

    Build it with :meth:`from_pretrained` (a directory spikellm wrote, or a Hub repository of one);
    ``.model`` is the spikellm module itself, what spikellm's energy counter and
    :func:`~spikellm.generation.generation_energy` read."""

    config_class = SpikellmConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: SpikellmConfig, model: torch.nn.Module | None = None, tokenizer=None,
                 source_format: str = "spiking", record: dict | None = None):
        super().__init__(config)
        if model is None:
            raise ConfigError("model", None, "a SpikellmForCausalLM wraps a spikellm model: build it with "
                                             "SpikellmForCausalLM.from_pretrained(<directory or Hub repo>)")
        self.model = model
        # what save_pretrained writes again: the tokenizer, the format, a converted model's record
        self.spikellm_tokenizer, self.source_format, self.spikellm_record = tokenizer, source_format, record
        self.stored_dtypes: dict[str, torch.dtype] | None = None  # by file tensor name, from from_pretrained
        self.post_init()

    @property
    def spikellm_model(self) -> torch.nn.Module:
        """The spikellm module itself: what :func:`~spikellm.generation.generate`, the energy
        counter and spikellm's evaluation call (the same weights and encoders)."""
        return self.model

    # the weights are the loaded ones and their ties the spikellm model's own: nothing to initialise or tie
    def init_weights(self):
        pass

    def _init_weights(self, module):
        pass

    def tie_weights(self, *args, **kwargs):
        pass

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the first forward makes its own SpikingCache (a spikified HF model: its own cache)

    def get_input_embeddings(self):
        inner = _hf_model(self.model) or self.model
        return inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else inner.embed_tokens

    def get_output_embeddings(self):
        inner = _hf_model(self.model) or self.model
        return inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else inner.lm_head

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """``input_ids [B, T]`` → ``CausalLMOutputWithPast`` (logits ``[B, T, vocab]``; the loss of
        ``labels``, shifted, -100 ignored, as ``transformers`` computes it; the cache with
        ``use_cache``). ``attention_mask [B, past + T]``: 0 at left padding; positions count tokens
        only (``position_ids`` are derived from it, not read)."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("a spikellm model takes input_ids (inputs_embeds are not supported)")
        hf_model = _hf_model(self.model)
        if hf_model is not None:  # a spikified transformers model: its own forward and cache
            out = hf_model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                           use_cache=use_cache, **kwargs)
            logits, cache = out.logits, getattr(out, "past_key_values", None)
        else:
            logits, cache = self._spikellm_forward(input_ids, attention_mask, past_key_values, use_cache)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def _spikellm_forward(self, input_ids, attention_mask, cache, use_cache):
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if cache is None and use_cache:
            cache = SpikingCache()
        elif cache is not None and not isinstance(cache, SpikingCache):
            raise ValueError(f"past_key_values of a spikellm model is a SpikingCache, not {type(cache).__name__} "
                             "(leave it unset: the first forward makes one)")
        # no padding: the unmasked path, the very computation spikellm's own generation runs
        mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        if cache is not None and cache.state is None:
            cache.state = self.model.new_state()  # the decoding protocol of every spikellm model
        logits = self.model(input_ids, state=None if cache is None else cache.state, attention_mask=mask)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return logits, cache

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config: SpikellmConfig | None = None,
                        dtype="auto", torch_dtype=None, device_map=None, backend: str = "auto", revision=None,
                        cache_dir=None, token=None, local_files_only: bool = False, subfolder: str = "",
                        **kwargs) -> "SpikellmForCausalLM":
        """The model a spikellm directory holds (any format :func:`~spikellm.checkpoints.load_model`
        reads), or a Hub repository of one (downloaded first). ``dtype``/``torch_dtype``: ``auto``
        (fp32 on a CPU, the stored dtype on a GPU) or a dtype; ``device_map``: a device (``cpu``,
        ``cuda``, ``auto``: CUDA when there is one); ``backend`` (spiking checkpoints): ``torch``,
        ``triton`` or ``auto``."""
        from spikellm.checkpoints.loader import load_model

        if model_args:
            raise ConfigError("model_args", model_args, "a spikellm model takes no positional arguments")
        for key in _REFUSED:
            if kwargs.get(key):
                raise ConfigError(key, kwargs[key], "a spikellm model is already quantized and placed by spikellm: "
                                                    "drop this option")
        directory = _local_directory(str(pretrained_model_name_or_path), revision, cache_dir, token,
                                     local_files_only, subfolder)
        loaded = load_model(directory, device=_device(device_map), backend=backend,
                            dtype=torch_dtype if torch_dtype is not None else dtype)
        if not isinstance(config, SpikellmConfig):
            config = config_of(directory, loaded)
        record = None
        if loaded.format == "converted":
            from spikellm.checkpoints.converted import read_record

            record = read_record(directory)
        model = cls(config, loaded.model, loaded.tokenizer, loaded.format, record)
        if directory.is_dir():  # save_pretrained writes each tensor in the dtype it was read from
            from spikellm.checkpoints.shards import TensorFiles

            files = TensorFiles(directory)
            model.stored_dtypes = {name: files.dtype(name) for name in files.names()
                                   if files.dtype(name).is_floating_point}
        model.name_or_path = config.name_or_path = str(pretrained_model_name_or_path)
        if (directory / GENERATION_FILE).is_file():
            model.generation_config = GenerationConfig.from_pretrained(directory)
        return model.eval()

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict: dict | None = None,
                        push_to_hub: bool = False, max_shard_size: int | str = "5GB", **kwargs):
        """Write the model in the spikellm format it was read from (a spiking checkpoint: also for
        a train.py checkpoint; a converted model), replacing ``save_directory`` whole and atomically;
        reading it back gives the same tensors bit for bit. ``push_to_hub``: then upload it
        (``repo_id``, ``token``... as ``transformers`` takes them)."""
        if state_dict is not None:
            raise ConfigError("state_dict", "given", "a spikellm model writes its own packed weights: drop state_dict")
        if not is_main_process:
            return None
        directory = Path(save_directory)
        self._write(directory, _shard_bytes(max_shard_size))
        if push_to_hub:  # the written directory, whole (what from_pretrained reads back)
            from huggingface_hub import HfApi

            api = HfApi(token=kwargs.pop("token", None))
            repo_id = api.create_repo(kwargs.pop("repo_id", None) or directory.name, exist_ok=True,
                                      private=kwargs.pop("private", None)).repo_id
            api.upload_folder(repo_id=repo_id, folder_path=directory, repo_type="model",
                              commit_message=kwargs.pop("commit_message", None) or "Upload spikellm model",
                              create_pr=kwargs.pop("create_pr", False))
        return None

    def _write(self, directory: Path, max_shard_bytes: int) -> None:
        record = self.config.to_dict()
        if self.source_format == "converted":
            from spikellm.checkpoints.converted import save_converted

            written = {k: v for k, v in self.spikellm_record.items() if k not in ("format", "version", "layers")}
            save_converted(_hf_model(self.model) or self.model, self.spikellm_tokenizer, directory, written,
                           overwrite=True, max_shard_bytes=max_shard_bytes, hf_config=record.get("hf_config"),
                           dtypes=self.stored_dtypes)
        elif self.source_format in ("spiking", "lightning"):
            from spikellm.checkpoints.spiking import save_spiking_checkpoint

            save_spiking_checkpoint(self.model, directory, model_config=record["model"], neuron=record.get("neuron"),
                                    tokenizer=self.spikellm_tokenizer, card=record.get("card"),
                                    cost_model=record.get("cost_model"), thresholds=record.get("thresholds"),
                                    overwrite=True, max_shard_bytes=max_shard_bytes, dtypes=self.stored_dtypes)
        else:
            raise ConfigError("save_pretrained", self.source_format, "a Hugging Face model spikified on load is "
                                                                     "saved by converting it: python train.py "
                                                                     "experiment=<conversion> model.hf_path=<dir>")


def _hf_model(model):
    """The ``transformers`` model inside a spikified one, or None for spikellm's own models."""
    from spikellm.models.hf import LogitsModel

    return model.hf_model if isinstance(model, LogitsModel) else None


def config_of(directory: Path, loaded) -> SpikellmConfig:
    """The :class:`SpikellmConfig` of a model directory: its ``config.json`` when it has the
    ``transformers`` fields, else (older spikellm files) built from its record and model."""
    import json

    path = directory / "config.json" if directory.is_dir() else None
    written = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    if written.get("model_type") == MODEL_TYPE:
        return SpikellmConfig.from_pretrained(directory)
    if loaded.format == "spiking":
        record = written
    elif loaded.format == "converted":  # formats 1 and 2: config.json is the source's own
        record = {"format": "spikellm-converted", "hf_config": written}
    elif loaded.format == "lightning":
        record = {"format": "spikellm-spiking-checkpoint", "model": loaded.config.get("model"),
                  "neuron": loaded.config.get("neuron"), "card": {}, "thresholds": {}}
    else:
        record = {"format": loaded.format}
    dtype = next((p.dtype for p in loaded.model.parameters() if p.is_floating_point()), torch.float32)
    model_config = getattr(loaded.model.config, "hf", loaded.model.config)
    return SpikellmConfig(**{**record, **transformers_fields(model_config, loaded.tokenizer, dtype)})


def _local_directory(name: str, revision, cache_dir, token, local_files_only: bool, subfolder: str) -> Path:
    """``name`` as a local directory; a Hub repository id is downloaded first (one line if it cannot be)."""
    path = Path(name).expanduser()
    if path.exists():
        return path / subfolder if subfolder else path
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ConfigError("pretrained_model_name_or_path", name, "no such directory, and not a Hub repository id "
                                                                 "(owner/name)")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token,
                                  local_files_only=local_files_only)
    except Exception as error:  # noqa: BLE001 - offline, unknown repo, gated: one line with the cause
        raise DataError(f"the Hub repository {name!r} cannot be downloaded ({type(error).__name__}: "
                        f"{str(error).strip().splitlines()[0][:160] if str(error).strip() else 'no detail'}); "
                        "pass a local directory, or go online") from None
    return Path(local) / subfolder if subfolder else Path(local)


def _device(device_map) -> str:
    """The one device ``device_map`` names (spikellm places a model whole), checked as eval.py checks ``device``."""
    from spikellm.checks import check_device

    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ConfigError("device_map", device_map, "a spikellm model runs on one device: give one device")
        device_map = devices.pop()
    if isinstance(device_map, int):
        device_map = f"cuda:{device_map}"
    return check_device("cpu" if device_map is None else device_map, key="device_map")


def _shard_bytes(size) -> int:
    """``max_shard_size`` as ``save_pretrained`` reads it (bytes, or ``"5GB"``, ``"500MB"``)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return convert_file_size_to_int(size)
    except (ValueError, TypeError):
        raise ConfigError("max_shard_size", size, "must be bytes (an int) or a size such as '5GB' or '500MB'") from None


__all__ = ["SpikellmConfig", "SpikellmForCausalLM", "SpikingCache"]
