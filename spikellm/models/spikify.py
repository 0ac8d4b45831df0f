"""Module surgery: a Hugging Face causal LM whose block projections are :class:`SpikingLinear`.

:func:`spikify` swaps, in place, every linear projection inside the decoder blocks of a
``transformers`` causal LM (the inputs DESIGN.md §4 puts spikes on) for a :class:`SpikingLinear`
that holds the very same weight and bias tensors (no copy: dtype, device, ``requires_grad`` and
tying stay as they were) plus a fresh encoder / weight quantizer per projection. Embeddings, the
LM head, norms and everything outside the listed projections stay in floating point.

Which projections, per ``config.model_type`` (:data:`SPIKING_PROJECTIONS`):

- llama, mistral, qwen2: ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj`` (7 per block;
  qwen2's q/k/v biases are kept);
- opt: ``self_attn.{q,k,v,out}_proj``, ``fc1``, ``fc2`` (6 per block, with biases);
- rwkv: ``attention.{key,value,receptance,output}``, ``feed_forward.{key,receptance,value}``
  (7 per block, as arXiv 2501.16337 counts them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spikellm.errors import ConfigError
from spikellm.nn.spiking_linear import EncoderFactory, SpikingLinear, WeightQuantizerFactory
from spikellm.nn.work import AttentionWork
from spikellm.ops.hadamard import hadamard_block


@dataclass(frozen=True)
class BlockLayout:
    """Where an architecture keeps its blocks, and which projections of a block get spikes."""

    blocks: tuple[str, ...]  # candidate paths of the block ModuleList (causal LM first, base model next)
    projections: tuple[str, ...]  # paths relative to one block
    attention: str | None = "self_attn"  # the block's softmax attention (None: it has none, e.g. RWKV)
    # whether a block's weights are left alone outside its own forward, so a conversion may keep
    # them in their file until the block runs (RWKV rescales every block's weights in place when
    # the model first runs in eval mode)
    weights_stay: bool = True


_LLAMA_LIKE = BlockLayout(
    blocks=("model.layers", "layers"),
    projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)

SPIKING_PROJECTIONS: dict[str, BlockLayout] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "opt": BlockLayout(
        blocks=("model.decoder.layers", "decoder.layers"),
        projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "fc1", "fc2"),
    ),
    "rwkv": BlockLayout(
        blocks=("rwkv.blocks", "blocks"),
        projections=("attention.key", "attention.value", "attention.receptance", "attention.output",
                     "feed_forward.key", "feed_forward.receptance", "feed_forward.value"),
        attention=None,  # a linear recurrence: its element-wise work is not priced (docs/conversion.md)
        weights_stay=False,
    ),
}

SUPPORTED = "supported: " + ", ".join(sorted(SPIKING_PROJECTIONS))


def layout_of(model: nn.Module) -> BlockLayout:
    """The :class:`BlockLayout` of ``model``'s ``config.model_type``; ConfigError if unsupported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SPIKING_PROJECTIONS:
        raise ConfigError("model_type", model_type, SUPPORTED)
    return SPIKING_PROJECTIONS[model_type]


def _blocks(model: nn.Module, layout: BlockLayout) -> tuple[str, nn.Module]:
    for path in layout.blocks:
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            continue
    raise ConfigError("model", type(model).__name__,
                      f"has none of the block lists {', '.join(layout.blocks)} of its model_type")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks of a HF causal LM (by its model_type), or of one of our
    models (a SpikingLlama, a MatMulFreeLM: their ``layers``); a LogitsModel's wrapped model's."""
    model = getattr(model, "hf_model", model)
    if hasattr(model, "spiking_linears") and isinstance(getattr(model, "layers", None), nn.ModuleList):
        return model.layers
    for path in layout_of(model).blocks:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise ConfigError("model", type(model).__name__, "has no decoder block list")


def declare_attention_work(model: nn.Module) -> nn.Module:
    """Declare each block attention's products to the operation counter (:mod:`spikellm.nn.work`):
    a Hugging Face attention module does not say what it multiplies, so its heads and head width
    are read from the config here and its cached length from its ``past_key_values``."""
    layout = layout_of(model)
    if layout.attention is None:
        return model
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    _, blocks = _blocks(model, layout)
    for index, block in enumerate(blocks):
        attention = block.get_submodule(layout.attention)
        attention.matmul_work = AttentionWork(heads, kv_heads, head_dim, _hf_window(getattr(attention, "layer_idx", index)))
    return model


def _hf_window(layer: int):
    def window(inputs: tuple, kwargs: dict) -> tuple[int, int, int, bool]:
        hidden = inputs[0] if inputs else kwargs["hidden_states"]
        cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
        start = int(cache.get_seq_length(layer)) if cache is not None and hasattr(cache, "get_seq_length") else 0
        return hidden.shape[0], start, hidden.shape[1], cache is not None
    return window


def block_prefixes(model: nn.Module) -> list[str]:
    """``model.layers.<i>.`` for every decoder block of a HF causal LM: the names inside blocks."""
    path, blocks = _blocks(model, layout_of(model))
    return [f"{path}.{index}." for index in range(len(blocks))]


def projection_names(model: nn.Module) -> list[str]:
    """The full module names (``model.layers.0.self_attn.q_proj``) :func:`spikify` replaces."""
    layout = layout_of(model)
    path, blocks = _blocks(model, layout)
    return [f"{path}.{index}.{name}" for index in range(len(blocks)) for name in layout.projections]


def _spiking_from(linear: nn.Linear, encoder: EncoderFactory | None,
                  weight_quantizer: WeightQuantizerFactory | None, unroll: bool, rotate: bool) -> SpikingLinear:
    """A :class:`SpikingLinear` sharing ``linear``'s weight and bias parameters."""
    weight = linear.weight
    if rotate:
        hadamard_block(linear.in_features)  # fails now, with the width, if it cannot be rotated
    with torch.device("meta"):  # no throwaway allocation of a second weight
        layer = SpikingLinear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    layer.weight = weight
    layer.bias = linear.bias
    # a model built with empty parameters (a file is read into it next) keeps real buffers
    device = torch.device("cpu") if weight.is_meta else weight.device
    layer.rotation_folded = torch.tensor(False, device=device)
    layer.unroll, layer.rotate = unroll, rotate
    layer.encoder = None if encoder is None else encoder().to(device=device)
    layer.weight_quantizer = None if weight_quantizer is None else weight_quantizer().to(device=device)
    layer.train(linear.training)
    return layer


def spikify(model: nn.Module, encoder: EncoderFactory | None = None,
            weight_quantizer: WeightQuantizerFactory | None = None, *,
            unroll: bool = False, rotate: bool = False) -> nn.Module:
    """Replace, in place, the block projections of a ``transformers`` causal LM by SpikingLinear.

    ``encoder`` and ``weight_quantizer`` are zero-argument factories (one fresh object per
    projection) or None. With both None (and ``rotate=False``) the model computes exactly what it
    did. Returns ``model``; :func:`spiking_modules` lists what was replaced.
    """
    for name in projection_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if isinstance(linear, SpikingLinear):
            raise ConfigError("model", name, "is already spiking: spikify a model only once")
        if not isinstance(linear, nn.Linear):
            raise ConfigError("model", name, f"must be an nn.Linear to spikify, got {type(linear).__name__}")
        setattr(parent, child, _spiking_from(linear, encoder, weight_quantizer, unroll, rotate))
    return declare_attention_work(model)


def spikify_from_config(model: nn.Module, neuron: dict | None) -> nn.Module:
    """:func:`spikify` with the factories and ``unroll`` / ``rotate`` of a ``neuron`` config group."""
    from spikellm.config import build_neuron  # hydra is only needed on this path

    encoder, weight_quantizer = build_neuron(neuron)
    options = neuron if neuron is not None else {}
    return spikify(model, encoder, weight_quantizer,
                   unroll=bool(options.get("unroll", False)), rotate=bool(options.get("rotate", False)))


def spiking_modules(model: nn.Module) -> dict[str, SpikingLinear]:
    """Every :class:`SpikingLinear` of ``model``, by full module name, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SpikingLinear)}


def spiking_causal_lm(hf_model: nn.Module, neuron: dict | None) -> nn.Module:
    """A ``transformers`` causal LM spikified by ``neuron`` (in place) and wrapped so that its
    forward returns logits, as spikellm's own models' do (:class:`~spikellm.models.hf.LogitsModel`)."""
    from spikellm.models.hf import LogitsModel

    return LogitsModel(spikify_from_config(hf_model, neuron))
