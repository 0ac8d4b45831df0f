"""A LLaMA-style decoder whose every projection is a :class:`SpikingLinear`.

RMSNorm, rotary embeddings, grouped-query attention through ``scaled_dot_product_attention``,
SwiGLU MLP, tied or untied head. Module names follow ``transformers``' ``LlamaForCausalLM`` so a
Hugging Face state dict loads without renaming (:func:`from_hf_llama`). With no encoder and no
weight quantizer the model is a plain LLaMA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spikellm.checks import check_int
from spikellm.errors import ConfigError
from spikellm.neurons.base import SpikeEncoder
from spikellm.nn.spiking_linear import (EncoderFactory, SpikingLinear, WeightQuantizerFactory, projection_factory,
                                         shared_input_linears)
from spikellm.nn.work import AttentionWork


@dataclass
class LlamaConfig:
    """Architecture of a LLaMA-style decoder (validated on construction)."""

    vocab_size: int = 2048
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads (no grouping)
    ffn_dim: int | None = None  # None: 8/3 · dim rounded up to a multiple of 64, as LLaMA does
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self):
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            check_int(key, getattr(self, key), 1)
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.ffn_dim = self.ffn_dim or 64 * math.ceil(8 * self.dim / 3 / 64)
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ConfigError("n_heads", self.n_heads, f"must divide dim={self.dim} into heads of even size")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def build(self, encoder: EncoderFactory | None = None, weight_quantizer: WeightQuantizerFactory | None = None,
              unroll: bool = False, attention_encoder: AttentionEncoderFactory | None = None,
              rotate: bool = False) -> SpikingLlama:
        return SpikingLlama(self, encoder, weight_quantizer, unroll, attention_encoder, rotate)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32 whatever the autocast dtype, as the reference LLaMA does
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    freqs = torch.outer(torch.arange(max_seq_len).float(), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, T, D]`` by position; halves, not interleaved pairs (the HF layout)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


AttentionEncoderFactory = Callable[[str], SpikeEncoder]


@dataclass
class LayerCache:
    """One layer's keys and values so far, ``[B, H_kv, T, D]`` as attention reads them (after RoPE,
    encoded when the products spike), and the per-channel running maxima (``|K|``, by role) that a
    per-channel encoder continues, ``[B, H_kv, 1, D]``."""

    keys: Tensor | None = None
    values: Tensor | None = None
    bounds: dict[str, Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=-2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=-2)
        return self.keys, self.values


@dataclass
class KVCache:
    """The decoder's cache, one :class:`LayerCache` per layer; pass the same one to every forward
    of a sequence (each forward appends its tokens)."""

    layers: list[LayerCache]

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls([LayerCache() for _ in range(n_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length

    def nbytes(self) -> int:
        tensors = [t for layer in self.layers for t in (layer.keys, layer.values, *layer.bounds.values())]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Attention(nn.Module):
    """Causal grouped-query self-attention; optionally with spiking attention products (§3.5, §4).

    With ``encoder`` set (:meth:`spike_products`), K and V pass through spike encoders after RoPE:
    K per channel (``granularity="channel"``: a step per (token, channel) from the running maximum
    over the tokens so far, so keys with outlier channels keep their resolution and no token's step
    depends on a later token) and V per token. Then

    * ``Q·Kᵀ`` = ``Σ_t w_t Q (s^K_t ⊙ Δ_K)ᵀ``: each score is a sum of entries of ``Q ⊙ Δ_K``
      selected (with sign) by K's spikes, additions instead of multiplications (with a static
      per-channel step, Δ_K folds into Q once);
    * ``P·V`` = ``Σ_t w_t P (s^V_t ⊙ Δ_V)``: additions of entries of P (V's per-token step scales
      P's column once, not every product).

    Training runs the collapsed form, SDPA on ``n·Δ`` with straight-through gradients, so it costs
    what dense attention costs; :func:`spiking_attention_temporal` runs the trains and equals it.
    Softmax, the scores and P stay in floating point. Without ``encoder`` this is plain attention.

    With a :class:`LayerCache` the new tokens' (encoded) keys and values are appended to it and
    the queries attend to all of them. A per-token code depends on its own token only, so cached
    keys are what a recomputation gives; a per-channel code's running maximum is carried in the
    cache (``bounds``) and continued: the encoder sees it as a first row before the new keys
    (``max`` is exact, so the steps are those of a full forward) and that row is dropped.
    """

    def __init__(self, cfg: LlamaConfig, linear):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = linear(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.k_proj = linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.v_proj = linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.o_proj = linear(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.encoder: nn.ModuleDict | None = None  # {"key", "value"} encoders, or float products


    @property
    def matmul_work(self) -> AttentionWork:
        """Its products, declared to the operation counter (:mod:`spikellm.nn.work`)."""
        return AttentionWork(self.n_heads, self.n_kv_heads, self.head_dim, _cache_window, self.encoder)
    def spike_products(self, factory: AttentionEncoderFactory) -> None:
        """Encode K and V with ``factory("key")`` and ``factory("value")``."""
        encoders = {role: factory(role) for role in ("key", "value")}
        for role, encoder in encoders.items():
            if not isinstance(encoder, SpikeEncoder):
                raise ConfigError(f"attention_encoder({role!r})", type(encoder).__name__, "must return a SpikeEncoder")
        # named ``encoder`` like SpikingLinear's, so state-dict filters for ``.encoder.`` cover it
        self.encoder = nn.ModuleDict(encoders)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
               cache: LayerCache | None = None) -> Tensor:
        """Attention of ``q [B, H, T, D]`` over ``k, v [B, H_kv, T, D]`` (collapsed form), causal,
        or as ``mask`` allows (bool, True where a query may read a key; with a cache it spans the
        cached keys too)."""
        if self.encoder is not None:
            k, v = self.encode(k, "key", cache), self.encode(v, "value", cache)
        if cache is not None:
            k, v = cache.append(k, v)
        causal = mask is None and q.shape[-2] == k.shape[-2] and q.shape[-2] > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=self.n_kv_heads != self.n_heads)

    def encode(self, x: Tensor, role: str, cache: LayerCache | None) -> Tensor:
        """``x`` through the role's encoder, a per-channel running maximum continued from the cache."""
        encoder = self.encoder[role]
        if cache is None or encoder.granularity != "channel":
            return encoder(x)
        encoded, cache.bounds[role] = encoder.encode_continued(x, cache.bounds.get(role))
        return encoded

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: LayerCache | None = None) -> Tensor:
        batch, seq, _ = x.shape
        q, k, v = shared_input_linears(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.attend(q, k, v, mask, cache)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def _train_terms(encoder: SpikeEncoder, x: Tensor) -> list[Tensor]:
    """``x``'s encoded value as the terms a chip adds: ``w_t · s_t ⊙ Δ`` per step (+ the outlier
    stream, sent beside the train), fp32; their sum is ``encoder(x)``."""
    spikes, step = encoder.spike_train(x)
    terms = [w * s * step for w, s in zip(encoder.time_weights().tolist(), spikes)]
    outliers = encoder.outlier_counts(x, step, encoder.decode(spikes))
    return terms if outliers is None else [*terms, outliers * step]


@torch.no_grad()
def spiking_attention_temporal(q: Tensor, k_encoder: SpikeEncoder, v_encoder: SpikeEncoder,
                               k: Tensor, v: Tensor) -> Tensor:
    """Reference: causal attention computed from K's and V's spike trains, step by step (fp32).

    ``scores = Σ_t q @ (w_t s^K_t ⊙ Δ_K)ᵀ / √D`` and ``out = Σ_t P @ (w_t s^V_t ⊙ Δ_V)`` with
    ``P = softmax(causal(scores))``; ``q [B, H, T, D]``, ``k, v [B, H_kv, T, D]``. Equals
    :meth:`Attention.attend` with these encoders up to float summation order.
    """
    group = q.shape[1] // k.shape[1]  # GQA: kv head j serves query heads j·group .. (j+1)·group - 1
    q = q.float()
    scores = sum(q @ term.repeat_interleave(group, dim=1).transpose(-1, -2) for term in _train_terms(k_encoder, k))
    seq = q.shape[-2]
    future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    probs = (scores / math.sqrt(q.shape[-1])).masked_fill(future, float("-inf")).softmax(-1)
    return sum(probs @ term.repeat_interleave(group, dim=1) for term in _train_terms(v_encoder, v))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, linear):
        super().__init__()
        self.gate_proj = linear(cfg.dim, cfg.ffn_dim)
        self.up_proj = linear(cfg.dim, cfg.ffn_dim)
        self.down_proj = linear(cfg.ffn_dim, cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = shared_input_linears(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, linear):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, linear)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg, linear)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: LayerCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask=mask, cache=cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class SpikingLlama(nn.Module):
    """LLaMA decoder; ``encoder``/``weight_quantizer`` build one module per projection (or None);
    ``unroll`` trains through the spike trains instead of the collapsed counts (the naive way).
    ``attention_encoder(role)``, role ``"key"`` or ``"value"``, builds the encoders of spiking
    attention products in every layer (see :class:`Attention`); None keeps them in floating point.
    They always train collapsed, whatever ``unroll`` says. ``rotate`` gives every projection a
    Hadamard rotation of its input folded into its weight (see :class:`SpikingLinear`)."""

    def __init__(self, config: LlamaConfig, encoder: EncoderFactory | None = None,
                 weight_quantizer: WeightQuantizerFactory | None = None, unroll: bool = False,
                 attention_encoder: AttentionEncoderFactory | None = None, rotate: bool = False):
        super().__init__()
        self.config = config

        linear = projection_factory(encoder, weight_quantizer, unroll, rotate)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, linear) for _ in range(config.n_layers))
        if attention_encoder is not None:
            self.spike_attention(attention_encoder)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # embeddings and the head stay in floating point (DESIGN.md §4)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_decoder_weights(self, config.n_layers)

    def forward(self, input_ids: Tensor, state: KVCache | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """``input_ids [B, T]`` → logits ``[B, T, vocab]``.

        ``state``: a :class:`KVCache` (:meth:`new_state`) holding the sequence's earlier tokens
        (these continue it, and are appended): the decoding protocol every model here shares. ``attention_mask [B, T_cached + T]``: 1 for tokens, 0 for (left) padding,
        as in ``transformers``; positions count tokens only, so a left-padded prompt computes
        what it computes alone. Padding embeds to zero (so its keys raise no per-channel running
        maximum) and is never read (a padding query reads itself only, to stay finite).
        """
        batch, seq = input_ids.shape
        cache = state
        start = 0 if cache is None else cache.length
        if start + seq > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + seq} tokens exceeds max_seq_len={self.config.max_seq_len}")
        x = self.embed_tokens(input_ids)
        mask = None
        if attention_mask is None:
            cos, sin = self.rope_cos[start:start + seq], self.rope_sin[start:start + seq]
            if start and seq > 1:  # new queries over cached and new keys, causally
                mask = _causal(start, seq, x.device)
        else:
            valid = attention_mask.to(device=x.device, dtype=torch.bool)
            if valid.shape != (batch, start + seq):
                raise ValueError(f"attention_mask of shape {tuple(valid.shape)}, expected {(batch, start + seq)}")
            positions = (valid.long().cumsum(-1) - 1).clamp_min(0)[:, start:]
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
            mask = (_causal(start, seq, x.device) & valid[:, None, None, :]) | _diagonal(start, seq, x.device)
            x = x * valid[:, start:, None].to(x.dtype)  # padding embeds to zero: its keys raise no running max
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask=mask, cache=None if cache is None else cache.layers[index])
        return self.lm_head(self.norm(x))

    def spike_attention(self, factory: AttentionEncoderFactory) -> None:
        """Spiking attention products in every layer: K and V encoded by ``factory("key")`` and
        ``factory("value")`` (see :class:`Attention`)."""
        for layer in self.layers:
            layer.self_attn.spike_products(factory)

    def new_state(self) -> KVCache:
        """An empty decoding state: pass it to every forward of one sequence (batch)."""
        return KVCache.empty(len(self.layers))

    @property
    def max_context(self) -> int:
        """The longest sequence it runs on (its rotary table's length)."""
        return self.config.max_seq_len

    def spiking_linears(self) -> dict[str, SpikingLinear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, SpikingLinear)}


def _causal(start: int, seq: int, device) -> Tensor:
    """``[seq, start + seq]`` bool: query ``start + i`` reads keys ``j <= start + i``."""
    return torch.ones(seq, start + seq, dtype=torch.bool, device=device).tril(start)


def _diagonal(start: int, seq: int, device) -> Tensor:
    """``[seq, start + seq]`` bool: each query's own key."""
    return torch.ones(seq, start + seq, dtype=torch.bool, device=device).tril(start).triu(start)


def init_decoder_weights(model: nn.Module, n_layers: int) -> None:
    """GPT-2's initialisation: N(0, 0.02) for linear and embedding weights, zero biases, and the
    residual projections (``o_proj``, ``down_proj``) scaled by 1/√(2·n_layers) so the residual
    stream does not grow with depth."""
    def init_module(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    model.apply(init_module)  # children first, as Module.apply visits them
    for name, param in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(param, std=0.02 / math.sqrt(2 * n_layers))


def config_from_hf(hf_config) -> LlamaConfig:
    """Our config for a ``transformers.LlamaConfig`` (biases and RoPE scaling are not supported)."""
    if getattr(hf_config, "model_type", None) != "llama":
        raise ConfigError("model_type", getattr(hf_config, "model_type", None), "only 'llama' loads natively")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise ConfigError("attention_bias", True, "biases in projections are not supported natively")
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError("rope_type", rope.get("rope_type"), "only unscaled RoPE ('default') loads natively")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return LlamaConfig(
        vocab_size=hf_config.vocab_size, dim=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers, n_heads=hf_config.num_attention_heads,
        n_kv_heads=hf_config.num_key_value_heads, ffn_dim=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings, rope_theta=float(theta),
        norm_eps=hf_config.rms_norm_eps, tie_embeddings=bool(hf_config.tie_word_embeddings),
    )


def from_hf_llama(hf_model, encoder: EncoderFactory | None = None,
                  weight_quantizer: WeightQuantizerFactory | None = None) -> SpikingLlama:
    """A :class:`SpikingLlama` holding the weights of a ``transformers.LlamaForCausalLM``: the very
    tensors (built with empty parameters, then given them: no copy, no initialisation)."""
    from spikellm.nn.storage import assign_parameters, empty_names, empty_parameters

    with empty_parameters():
        model = config_from_hf(hf_model.config).build(encoder, weight_quantizer)
    parameters = dict(hf_model.named_parameters())
    state = {key.removeprefix("model."): value for key, value in hf_model.state_dict().items() if key in parameters}
    unexpected = assign_parameters(model, state.items())
    missing = empty_names(model)
    if missing or unexpected:
        raise ConfigError("state_dict", f"missing={missing[:4]} unexpected={unexpected[:4]}",
                          "the Hugging Face model does not match a LLaMA of its own config")
    return model


def _cache_window(inputs: tuple, kwargs: dict) -> tuple[int, int, int, bool]:
    """``(batch, start, new tokens, cached)`` of an :class:`Attention` forward ``(x, cos, sin, mask, cache)``."""
    cache = kwargs.get("cache", inputs[4] if len(inputs) > 4 else None)
    return inputs[0].shape[0], (0 if cache is None else cache.length), inputs[0].shape[1], cache is not None
