"""Analytic operation counts of a LLaMA-shaped model: sizes a model from its config, no weights built.

Counted for ``tokens = sequences × seq_len`` tokens, per decoder layer and the head (the same
layers, names, kinds, raw counts and order as :class:`~spikellm.energy.counter.OperationCounter`;
the cost model prices them, memory included, in :mod:`spikellm.energy.report`):

* every projection ``layers.{i}.self_attn.{q,k,v,o}_proj`` and ``layers.{i}.mlp.{gate,up,down}_proj``
  (kind ``projection``): dense ``tokens × in_features × out_features`` MACs, with ``q: dim →
  n_heads·head_dim``, ``k, v: dim → n_kv_heads·head_dim``, ``o: n_heads·head_dim → dim``,
  ``gate, up: dim → ffn_dim``, ``down: ffn_dim → dim``.
  Spiking (``spikes_per_activation`` given for its kind): every spike adds one weight row of
  ``out_features`` entries, so ``sops = spikes × out_features`` synaptic operations with
  ``spikes = tokens × in_features × spikes_per_activation``, no MACs but the per-token step times
  each output, ``tokens × out_features`` scale MACs (every token assumed to spike; none at rate
  0). ``nonzero`` is the fraction of activations with a non-zero count (read once each under
  ``weight_reads: per_input``); ``spike_level`` the mean level of graded (GIF, L > 2) spikes, None
  for binary and ternary spikes;
* the attention products ``layers.{i}.self_attn.products`` (kind ``attention``), causal: query
  ``i`` (1-based) attends to keys ``1..i``, so per sequence, layer and query head ``Q·Kᵀ`` costs
  ``Σ_{i=1..T} i × head_dim = T(T+1)/2 × head_dim`` MACs and ``P·V`` the same.
  Spiking (``spiking_attention = r``, spikes per K and per V activation, binary or ternary): an
  element of key or value ``j`` (0-based) reaches every query ``i ≥ j`` (``T - j`` of them) of
  every query head of its group (``n_heads / n_kv_heads``), ``Σ_j (T - j) = T(T+1)/2``:

  - V per token: each spike adds ``P_ij · Δ_Vj``: ``sops = r × n_heads × head_dim × T(T+1)/2``
    per sequence (r × the dense ``P·V`` MACs), plus one scale multiply ``P_ij · Δ_Vj`` per pair and
    query head, ``n_heads × T(T+1)/2`` scale MACs;
  - K per token (``key_granularity="token"``): the same with ``q``;
  - K per channel (the default, ``key_granularity="channel"``): the step varies with token and
    channel, so each non-zero key element (a fraction ``nonzero["attention"]``) is a number (one
    multiply) that each query of its group multiplies: ``nonzero × n_heads × head_dim × T(T+1)/2``
    MACs, no accumulates;

  with ``spikes = r × activations``, ``activations = 2 × tokens × n_kv_heads × head_dim`` (K and V)
  (softmax, the scores and P stay floating point and are not counted);
* ``lm_head`` (kind ``lm_head``): ``tokens × dim × vocab_size`` MACs, always dense (DESIGN.md §4).

Not counted: embeddings, RMSNorm, rotary embeddings, softmax, SiLU and the SwiGLU product, the
residual additions, the KV cache's memory. DESIGN.md §4 keeps them in floating point and the
papers' figures (DESIGN.md §6: LLaMA-2-7B, 1,024 tokens, ≈ 31.77 J at 4.6 pJ/MAC) count matmuls
only, which the compute-only cost models reproduce.
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
                   spiking_attention: float | None = None,
                   nonzero: float | Mapping[str, float] | None = None,
                   spike_level: float | None = None,
                   key_granularity: str = "channel", kv_bits: int | None = None) -> EnergyReport:
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
        nonzero: fraction of the activations of a spiking kind with a non-zero count, in
            ``[0, min(1, spikes per activation)]`` (a non-zero count fires at least one spike); a
            number for all, or a dict by kind (projection kinds and ``"attention"``); a kind left
            out takes the upper bound ``min(1, spikes per activation)``.
        spike_level: None for binary and ternary spikes (level 1); a number >= 1 for graded spikes
            (GIF with L > 2) in the projections: their mean level (summed levels / spikes).
        key_granularity: ``"channel"`` (the default of ``neuron=ternary_attention``) or ``"token"``:
            the step of the spiking keys.
        kv_bits: with spiking attention, the width of a stored K/V count (the KV cache's memory is
            charged at it); None: the cost model's float width.

    Raises:
        ConfigError: naming the invalid argument (``seq_len``, ``sequences``,
            ``spikes_per_activation.q_proj``, ``steps``, ``spiking_attention``, ``nonzero``, ...).
    """
    if not isinstance(config, LlamaConfig):
        raise ConfigError("config", type(config).__name__, "must be a LlamaConfig")
    if not isinstance(cost, CostModel):
        raise ConfigError("cost", type(cost).__name__, "must be a CostModel (see load_cost_model)")
    check_int("seq_len", seq_len, 1, config.max_seq_len)
    check_int("sequences", sequences, 1)
    if kv_bits is not None:
        check_int("kv_bits", kv_bits, 1, 64)
    rates = _per_kind("spikes_per_activation", spikes_per_activation, PROJECTIONS, _check_rate)
    step_counts = _per_kind("steps", steps, (*PROJECTIONS, ATTENTION), lambda key, v: check_int(key, v, 0))
    if spiking_attention is not None:
        spiking_attention = _check_rate("spiking_attention", spiking_attention)
    if key_granularity not in ("channel", "token"):
        raise ConfigError("key_granularity", key_granularity, "must be one of: channel, token")
    if spike_level is not None and not (_is_number(spike_level) and spike_level >= 1):
        raise ConfigError("spike_level", spike_level, "must be a finite number >= 1 (mean level of a graded spike)")
    spiking_rates = {**rates, **({ATTENTION: spiking_attention} if spiking_attention is not None else {})}
    fractions = _per_kind("nonzero", nonzero, (*PROJECTIONS, ATTENTION), _check_fraction)
    for kind, fraction in fractions.items():
        if kind in spiking_rates and fraction > min(1.0, spiking_rates[kind]):
            raise ConfigError(f"nonzero.{kind}" if isinstance(nonzero, Mapping) else "nonzero", fraction,
                              f"must be at most min(1, spikes per activation) = {min(1.0, spiking_rates[kind]):g}")
    fractions = {kind: fractions.get(kind, min(1.0, rate)) for kind, rate in spiking_rates.items()}

    tokens = sequences * seq_len
    shapes = projection_shapes(config)
    attention_dense = causal_attention_macs(config, seq_len, sequences)
    pairs = sequences * config.n_heads * (seq_len * (seq_len + 1) // 2)  # (query, key) pairs × query heads
    layers: list[LayerOps] = []
    for i in range(config.n_layers):
        # the counter orders a layer's rows as its modules: the attention module (products) first
        group = config.n_heads // config.n_kv_heads
        products = LayerOps(name=f"layers.{i}.self_attn.products", kind="attention", tokens=tokens,
                            dense_macs=attention_dense, kv_writes=2 * tokens * config.n_kv_heads * config.head_dim,
                            kv_reads=2 * (pairs // group) * config.head_dim, score_elements=pairs,
                            kv_bits=kv_bits if spiking_attention is not None else None)
        if spiking_attention is None:
            products.macs = attention_dense
        else:
            per_role = tokens * config.n_kv_heads * config.head_dim
            rate, fraction, half = spiking_attention, fractions[ATTENTION], attention_dense / 2
            products.encoded = True
            products.activations = 2 * per_role
            products.spikes = products.spike_levels = rate * products.activations
            products.nonzero_inputs = fraction * products.activations
            products.sops = products.level_sops = rate * half  # V: P_ij·Δ_Vj added per spike
            products.scale_macs = pairs if rate else 0.0  # P_ij · Δ_Vj (every value has a spike)
            if key_granularity == "token":
                products.sops = products.level_sops = 2 * rate * half
                products.scale_macs *= 2  # and q · Δ_Kj
            else:  # each non-zero key element, a number, times every query of its group
                products.macs = fraction * half
                products.scale_macs += fraction * per_role
                products.float_inputs = fraction * per_role
            products.steps = step_counts.get(ATTENTION, 0)
        layers.append(products)
        for kind, (path, in_features, out_features) in shapes.items():
            dense = tokens * in_features * out_features
            ops = LayerOps(name=f"layers.{i}.{path}", kind="projection", tokens=tokens, in_features=in_features,
                           out_features=out_features, dense_macs=dense)
            rate = rates.get(kind)
            if rate is None:
                ops.macs = dense
                ops.nonzero_inputs = ops.float_inputs = tokens * in_features
            else:
                level = 1.0 if spike_level is None else spike_level
                ops.encoded = True
                ops.activations = tokens * in_features
                ops.spikes = rate * ops.activations
                ops.spike_levels = level * ops.spikes
                ops.nonzero_inputs = fractions[kind] * ops.activations
                ops.sops = ops.spikes * out_features
                ops.level_sops = level * ops.sops
                if spike_level is not None:
                    ops.graded_spikes, ops.graded_sops = ops.spikes, ops.sops
                ops.scale_macs = tokens * out_features if rate else 0.0  # Δ_t times each output (a token spikes)
                ops.steps = step_counts.get(kind, 0)
            layers.append(ops)
    head = tokens * config.dim * config.vocab_size
    layers.append(LayerOps(name="lm_head", kind="lm_head", tokens=tokens, in_features=config.dim,
                           out_features=config.vocab_size, macs=head, dense_macs=head,
                           nonzero_inputs=tokens * config.dim, float_inputs=tokens * config.dim))
    return EnergyReport(cost=cost, tokens=tokens, sequences=sequences, layers=layers)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fraction(key: str, value) -> float:
    if not (_is_number(value) and 0 <= value <= 1):
        raise ConfigError(key, value, "must be a number in [0, 1] (fraction of non-zero activations)")
    return float(value)


def _check_rate(key: str, value) -> float:
    """Spikes per activation: a finite number >= 0 (above 1 with multi-step or multi-spike trains)."""
    if not (_is_number(value) and value >= 0):
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
