"""Analytic operation counts of a LLaMA-shaped model: sizes a model from its config, no weights built.

Counted for ``tokens = sequences × seq_len`` tokens, per decoder layer and the head (the same
layers, names, kinds and order as :class:`~spikellm.energy.counter.OperationCounter`):

* every projection ``layers.{i}.self_attn.{q,k,v,o}_proj`` and ``layers.{i}.mlp.{gate,up,down}_proj``
  (kind ``projection``): dense ``tokens × in_features × out_features`` MACs, with ``q: dim →
  n_heads·head_dim``, ``k, v: dim → n_kv_heads·head_dim``, ``o: n_heads·head_dim → dim``,
  ``gate, up: dim → ffn_dim``, ``down: ffn_dim → dim``.
  Spiking (``spikes_per_activation`` given for its kind): every spike adds one weight row of
  ``out_features`` entries, so ``ACs = spikes × out_features`` with
  ``spikes = tokens × in_features × spikes_per_activation`` and no MACs;
* the attention products ``layers.{i}.self_attn.products`` (kind ``attention``), causal: query
  ``i`` (1-based) attends to keys ``1..i``, so per sequence, layer and query head ``Q·Kᵀ`` costs
  ``Σ_{i=1..T} i × head_dim = T(T+1)/2 × head_dim`` MACs and ``P·V`` the same.
  Spiking (``spiking_attention = r``, spikes per K and per V activation): a spike of key ``j``
  (0-based), channel ``c``, adds ``q[i, c]`` to the score of every query ``i ≥ j`` (``T - j`` of
  them) of every query head of its group (``n_heads / n_kv_heads``); a spike of value ``j`` adds
  ``P[i, j]`` likewise. Per sequence and layer::

      ACs = 2 (K and V) × r × n_kv_heads × head_dim × (n_heads / n_kv_heads) × Σ_{j=0..T-1} (T - j)
          = r × 2 × n_heads × head_dim × T(T+1)/2 = r × dense MACs,

  with ``spikes = r × activations``, ``activations = 2 × tokens × n_kv_heads × head_dim`` (K and V)
  and no MACs (softmax, the scores and P stay floating point and are not counted);
* ``lm_head`` (kind ``lm_head``): ``tokens × dim × vocab_size`` MACs, always dense (DESIGN.md §4).

Not counted: embeddings, RMSNorm, rotary embeddings, softmax, SiLU and the SwiGLU product, the
residual additions, and memory traffic. DESIGN.md §4 keeps them in floating point and the papers'
figures (DESIGN.md §6: LLaMA-2-7B, 1,024 tokens, ≈ 31.77 J at 4.6 pJ/MAC) count matmuls only.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from spikellm.checks import check_int
from spikellm.energy.cost import CostModel
from spikellm.energy.report import EnergyReport, LayerOps
from spikellm.errors import ConfigError
from spikellm.models.llama import LlamaConfig

#: Projection kinds, in module order: the keys of ``spikes_per_activation`` / ``steps`` dicts.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Key of a ``steps`` dict for the spiking attention products.
ATTENTION = "attention"


def llama2_7b() -> LlamaConfig:
    """LLaMA-2-7B's architecture (Touvron et al. 2023): the reference of DESIGN.md §6."""
    return LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                       max_seq_len=4096, tie_embeddings=False)


def projection_shapes(config: LlamaConfig) -> dict[str, tuple[str, int, int]]:
    """``kind → (module path within a layer, in_features, out_features)`` of one decoder layer."""
    q_out, kv_out = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return {
        "q_proj": ("self_attn.q_proj", config.dim, q_out),
        "k_proj": ("self_attn.k_proj", config.dim, kv_out),
        "v_proj": ("self_attn.v_proj", config.dim, kv_out),
        "o_proj": ("self_attn.o_proj", q_out, config.dim),
        "gate_proj": ("mlp.gate_proj", config.dim, config.ffn_dim),
        "up_proj": ("mlp.up_proj", config.dim, config.ffn_dim),
        "down_proj": ("mlp.down_proj", config.ffn_dim, config.dim),
    }


def causal_attention_macs(config: LlamaConfig, seq_len: int, sequences: int = 1) -> int:
    """Dense MACs of ``Q·Kᵀ`` and ``P·V`` in one layer: ``2 × sequences × n_heads × head_dim × T(T+1)/2``."""
    return 2 * sequences * config.n_heads * config.head_dim * (seq_len * (seq_len + 1) // 2)


def estimate_llama(config: LlamaConfig, seq_len: int, cost: CostModel, sequences: int = 1,
                   spikes_per_activation: float | Mapping[str, float] | None = None,
                   steps: int | Mapping[str, int] = 0,
                   spiking_attention: float | None = None) -> EnergyReport:
    """Operation counts and energy of ``sequences`` sequences of ``seq_len`` tokens through ``config``.

    Args:
        config: the architecture (only its sizes are read; no weights are built).
        seq_len: tokens per sequence, in ``[1, config.max_seq_len]``.
        cost: prices the counts.
        sequences: independent sequences (attention does not cross them).
        spikes_per_activation: None for a dense model; a number (>= 0) for every projection; or a
            dict by projection kind (:data:`PROJECTIONS`), where a kind left out stays dense.
        steps: time steps of the encoders (only describes the trains: ``firing_rate =
            spikes_per_activation / steps``); an int for all, or a dict by kind (projection kinds
            and ``"attention"``), missing kinds 0 (unknown).
        spiking_attention: None for floating-point attention products; else spikes per K and per V
            activation (>= 0), turning the products into accumulates (see the module docstring).

    Raises:
        ConfigError: naming the invalid argument (``seq_len``, ``sequences``,
            ``spikes_per_activation.q_proj``, ``steps``, ``spiking_attention``, ...).
    """
    if not isinstance(config, LlamaConfig):
        raise ConfigError("config", type(config).__name__, "must be a LlamaConfig")
    if not isinstance(cost, CostModel):
        raise ConfigError("cost", type(cost).__name__, "must be a CostModel (see load_cost_model)")
    check_int("seq_len", seq_len, 1, config.max_seq_len)
    check_int("sequences", sequences, 1)
    rates = _per_kind("spikes_per_activation", spikes_per_activation, PROJECTIONS, _check_rate)
    step_counts = _per_kind("steps", steps, (*PROJECTIONS, ATTENTION), lambda key, v: check_int(key, v, 0))
    if spiking_attention is not None:
        spiking_attention = _check_rate("spiking_attention", spiking_attention)

    tokens = sequences * seq_len
    shapes = projection_shapes(config)
    attention_dense = causal_attention_macs(config, seq_len, sequences)
    layers: list[LayerOps] = []
    for i in range(config.n_layers):
        # the counter orders a layer's rows as its modules: the attention module (products) first
        products = LayerOps(name=f"layers.{i}.self_attn.products", kind="attention", dense_macs=attention_dense)
        if spiking_attention is None:
            products.macs = attention_dense
        else:
            products.acs = spiking_attention * attention_dense
            products.activations = 2 * tokens * config.n_kv_heads * config.head_dim
            products.spikes = spiking_attention * products.activations
            products.steps = step_counts.get(ATTENTION, 0)
        layers.append(products)
        for kind, (path, in_features, out_features) in shapes.items():
            dense = tokens * in_features * out_features
            ops = LayerOps(name=f"layers.{i}.{path}", kind="projection", dense_macs=dense)
            rate = rates.get(kind)
            if rate is None:
                ops.macs = dense
            else:
                ops.activations = tokens * in_features
                ops.spikes = rate * ops.activations
                ops.acs = ops.spikes * out_features
                ops.steps = step_counts.get(kind, 0)
            layers.append(ops)
    head = tokens * config.dim * config.vocab_size
    layers.append(LayerOps(name="lm_head", kind="lm_head", macs=head, dense_macs=head))
    return EnergyReport(cost=cost, tokens=tokens, sequences=sequences, layers=layers)


def _check_rate(key: str, value) -> float:
    """Spikes per activation: a finite number >= 0 (above 1 with multi-step or multi-spike trains)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        raise ConfigError(key, value, "must be a finite number >= 0 (spikes per activation)")
    return float(value)


def _per_kind(key: str, value, kinds: tuple[str, ...], check) -> dict:
    """``value`` for every kind, or a dict of some kinds, each checked as ``key.kind``."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(kinds))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", value[unknown[0]], f"unknown kind; one of: {', '.join(kinds)}")
        return {kind: check(f"{key}.{kind}", value[kind]) for kind in kinds if kind in value}
    checked = check(key, value)
    return dict.fromkeys(kinds, checked)
