"""Exact operation counts of a model run, from the spike counts its encoders produce.

Nothing is estimated from tensor values: dense MACs follow from shapes, accumulates from the
integer spike counts. The counts are raw facts (:class:`~spikellm.energy.report.LayerOps`); what
they cost, memory included, is the cost model's business (:mod:`spikellm.energy.report`).

Where the counts come from: a projection's encoder keeps a per-forward
:class:`~spikellm.neurons.tally.SpikeTally` while the counter is attached (the sums of the counts
it produced: spikes, spike levels, non-zero inputs, tokens with a spike, outlier events), so the
counter neither re-encodes an input nor disturbs the forward (q/k/v still share one encoding, and
the kernel path tallies its own counts); :func:`record_tally` turns them into operations. The
attention encoders' elements reach a different number of queries per position, so their hooks
pass the counts themselves to :func:`record_encoded`. Both follow the same rules:

* **spike-driven work.** A spike of an input element adds its weight row (or, in attention, its
  product entry) to every output it reaches: ``sops = Σ spikes × fan_out`` synaptic operations,
  with the number of spikes of a count in closed form (``encoder.spikes_per_count``: ``|n|`` for
  binary and ternary codes, ``ceil(|n| / (L-1))`` for a GIF neuron of L levels). A GIF spike
  carries a level ``k <= L-1``: the summed levels of a count are ``|n|`` (``level_sops``), and the
  spikes of encoders with ``L > 2`` are ``graded_sops``, priced by the cost model's
  ``graded_spike``. Binary, ternary, IF and bit-plane spikes have level 1.
* **scale products.** The sum of spike rows is in units of the step: with a step per token ``Δ_t``
  each output is multiplied once, ``tokens × out`` ``scale_macs`` per projection (tokens with a
  non-zero element only; twice where allocated channels take their own per-token bound: two
  partial sums). With a step per
  (token, channel) (``granularity="channel"``) the step cannot leave the sum: every non-zero
  element becomes a number ``n·Δ`` (one multiply) and multiplies each of its outputs (a MAC).
* **projections**: without an encoder, MACs ``nnz(x) × out`` (an input of exactly zero, as
  activation sparsity makes them, multiplies nothing on an event-driven core; ``dense_macs`` keeps
  ``tokens × in × out``); with one, the synaptic operations above plus the sparse outlier stream,
  one MAC per output per outlier.
* **attention products**, causal: token ``i`` attends to ``j <= i``, so float ``Q·Kᵀ`` and ``P·V``
  each cost ``Σ_i (i + 1) × head_dim`` MACs per query head. With spiking K and V, an element of key
  (value) ``j`` reaches the ``T - j`` queries ``i >= j`` of each query head of its group
  (``fan_out = (T - j) × n_heads / n_kv_heads``):

  - V per token: ``out_i = Σ_j (P_ij · Δ_Vj) Σ_t s^V_jt``: one multiply ``P_ij · Δ_Vj`` per
    (query, key) pair and query head, ``n_heads × T(T+1)/2`` ``scale_macs`` per sequence (pairs
    whose value has a non-zero element in that head), then
    each spike of value ``j`` adds that product: ``sops = Σ spikes_j × fan_out_j``;
  - K per token, likewise: ``score_ij = Δ_Kj Σ_c q_ic n_jc``, a synaptic operation per spike and
    query, one scale multiply per pair and query head;
  - K per channel (the default): ``score_ij = Σ_c q_ic · Δ_jc n_jc`` with ``Δ_jc`` varying with
    ``j`` and ``c``: each non-zero key element is a number (one multiply) and every query of its
    group multiplies it, ``Σ_{(j,c): n_jc != 0} fan_out_j`` MACs and no accumulates.

  The outlier stream of K and V adds one MAC per fan-out. Softmax is not counted. Memory, on the
  models that charge activations: every new key and value written to the cache and read by each
  query of its group (at the count's width when spiking K/V store counts, else the float width),
  and the scores P written and read once.

  With a KV cache (:class:`~spikellm.models.llama.KVCache`, cached decoding) a forward's queries are
  the new tokens ``start .. start + T - 1`` and they read every cached key: float products cost
  ``Σ_i (i + 1) × head_dim`` over the new ``i`` only; each new key or value is encoded (its spikes
  counted) once, and every key ``j`` reaches the new queries ``i >= j``. The counter keeps a few
  sums per cached key (its spikes, levels, non-zero elements, outliers) to charge them to each new
  query, so a sequence decoded token by token counts exactly what one forward over it counts.
  Attach the counter before a sequence's first tokens. Padding is counted as the work it is.
* the MatMul-free LM's recurrence ``h_t = f_t ⊙ h_{t-1} + (1 - f_t) ⊙ c_t``: two MACs per channel
  and token (kind ``recurrence``), the work that replaces the attention products;
* the lm_head, ``tokens × dim × vocab`` MACs.

Embeddings, norms, softmax and SiLU stay floating point and are not counted (DESIGN.md §4, §6).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, fields

import torch
from torch import Tensor, nn

from spikellm.energy.cost import CostModel
from spikellm.energy.report import EnergyReport, LayerOps
from spikellm.neurons.base import SpikeEncoder
from spikellm.neurons.observers import attach, detach, find
from spikellm.neurons.tally import SpikeTally
from spikellm.nn.spiking_linear import SpikingLinear
from spikellm.nn.work import AttentionWork, RecurrenceWork
from spikellm.ops.hooks import HookSet


class OperationCounter(HookSet):
    """Hooks that count the operations of every forward of ``model`` until :meth:`remove`.

    Use as a context manager around the forwards to count; :meth:`report` prices them.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.ops: dict[str, LayerOps] = {}
        self.tokens = 0
        self.sequences = 0
        super().__init__()
        self._order: dict[str, int] = defaultdict(int)
        self._tallied: dict[str, SpikingLinear] = {}  # encoded projections, counted from their tallies
        self._windows: dict[str, tuple[int, int, int, bool]] = {}  # attention: (batch, start, new tokens, cached)
        self._key_sums: dict[tuple[str, str], Tensor] = {}  # per cached key/value row: what it reaches with
        for index, (name, module) in enumerate(model.named_modules()):
            self._order[name] = index
            if isinstance(module, SpikingLinear) and module.encoder is not None:
                attach(module.encoder, SpikeTally())
                self._tallied[name] = module
            elif isinstance(module, SpikingLinear):
                self._handles.append(module.register_forward_hook(self._projection_hook(name)))
            elif isinstance(getattr(module, "matmul_work", None), AttentionWork):
                work = module.matmul_work
                self._handles.append(module.register_forward_pre_hook(self._attention_window(name, work),
                                                                      with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._attention_hook(name, work)))
                for role, encoder in (work.encoder or {}).items():
                    hook = self._attention_encoder_hook(name, work, role)
                    self._handles.append(encoder.register_forward_hook(hook))
            elif isinstance(getattr(module, "matmul_work", None), RecurrenceWork):
                self._handles.append(module.register_forward_hook(self._recurrence_hook(name, module.matmul_work)))
            elif isinstance(module, nn.Linear) and name.endswith("lm_head"):
                self._handles.append(module.register_forward_hook(self._head_hook(name)))
        if not self._handles and not self._tallied:
            raise ValueError("the model has no SpikingLinear, attention or lm_head to count")
        self._handles.append(model.register_forward_pre_hook(self._count_tokens, with_kwargs=True))

    def _count_tokens(self, model, inputs, kwargs):
        # input_ids [B, T] of a language model (positional, or by keyword for a Hugging Face one),
        # or the activations of a bare layer
        x = inputs[0] if inputs else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        shape = x.shape if not x.is_floating_point() else x.shape[:-1]
        self.tokens += shape.numel()
        self.sequences += shape[0] if len(shape) > 1 else 1

    def remove(self) -> None:
        self._fold_tallies()
        for layer in self._tallied.values():
            detach(layer.encoder, SpikeTally)
        self._tallied.clear()
        super().remove()

    def _fold_tallies(self) -> None:
        """Move what the projections' tallies hold into their operation counts (fresh tallies)."""
        for name, layer in self._tallied.items():
            tally = find(layer.encoder, SpikeTally)
            tally = tally.take() if tally is not None else None
            if tally is not None and tally.activations:
                record_tally(self._layer(name, "projection"), layer, tally)

    def _layer(self, name: str, kind: str) -> LayerOps:
        if name not in self.ops:
            self.ops[name] = LayerOps(name=name, kind=kind)
        return self.ops[name]

    def _projection_hook(self, name: str):
        @torch.no_grad()
        def hook(layer: SpikingLinear, inputs, output):  # a float projection: MACs of its non-zero inputs
            x = inputs[0]
            ops = self._layer(name, "projection")
            _add_shape(ops, layer, x.numel() // layer.in_features)
            nonzero = torch.count_nonzero(x).item()
            ops.nonzero_inputs += nonzero
            ops.float_inputs += nonzero
            ops.macs += nonzero * layer.out_features
        return hook

    def _attention_window(self, name: str, work: AttentionWork):
        def hook(module, inputs, kwargs):
            self._windows[name] = work.window(inputs, kwargs)
        return hook

    def _attention_hook(self, name: str, attention: AttentionWork):
        def hook(module, inputs, output):
            batch, start, seq, _ = self._windows[name]
            # query i attends to keys 0..i: Σ_i (i + 1) pairs per query head and sequence over the
            # new queries i = start .. start + T - 1 (T(T+1)/2 without a cache)
            pairs = batch * attention.n_heads * (seq * start + seq * (seq + 1) // 2)
            ops = self._layer(f"{name}.products", "attention")
            ops.tokens += batch * seq
            ops.dense_macs += 2 * pairs * attention.head_dim  # Q·Kᵀ and P·V
            if attention.encoder is None:
                ops.macs += 2 * pairs * attention.head_dim
            # memory where the model keeps it: this forward's keys and values written to the cache,
            # every cached key and value read by each query of its group, the scores written and
            # read back for P·V (a query head's row of P per query)
            kv_pairs = pairs // (attention.n_heads // attention.n_kv_heads)
            ops.kv_writes += 2 * batch * seq * attention.n_kv_heads * attention.head_dim
            ops.kv_reads += 2 * kv_pairs * attention.head_dim
            ops.score_elements += pairs
            if attention.encoder:  # spiking K/V are stored as counts of the encoder's width
                ops.kv_bits = max(_count_bits(encoder) for encoder in attention.encoder.values())
        return hook

    def _attention_encoder_hook(self, name: str, attention, role: str):
        @torch.no_grad()
        def hook(encoder, inputs, output):
            # K after RoPE, or V: [B, H_kv, rows, D]; with a cache, a per-channel encoder's input
            # starts with the carried running maximum: this forward's keys are the last T rows
            x = inputs[0]
            _, start, seq, cached = self._windows[name]
            counts, step = encoder.encode(x)
            outliers = encoder.outlier_counts(x, step, counts)
            counts, outliers = counts[..., -seq:, :], None if outliers is None else outliers[..., -seq:, :]
            ops = self._layer(f"{name}.products", "attention")
            sums = record_encoded_rows(ops, encoder, counts, outliers)  # [B, H_kv, T, 4]
            if cached:
                previous = self._key_sums.get((name, role)) if start else None
                if start and (previous is None or previous.shape[-2] != start):
                    raise ValueError(f"{name}: the operation counter was attached after the first {start} tokens "
                                     "of a cached sequence; attach it before the sequence's first forward")
                sums = sums if previous is None else torch.cat([previous, sums], dim=-2)
                self._key_sums[(name, role)] = sums
            # key/value j reaches the new queries i >= j (start <= i < start + T) of every query head of its group
            positions = torch.arange(start + seq, device=x.device, dtype=torch.float64)
            queries = start + seq - positions.clamp_min(start)
            record_reach(ops, encoder, sums, (queries * (attention.n_heads // attention.n_kv_heads)).unsqueeze(-1))
        return hook

    def _recurrence_hook(self, name: str, work: RecurrenceWork):
        def hook(module, inputs, output):
            macs = work.macs_per_element * inputs[0].numel()  # f·h and (1 - f)·c per channel and token
            ops = self._layer(f"{name}.recurrence", "recurrence")
            ops.macs += macs
            ops.dense_macs += macs
        return hook

    def _head_hook(self, name: str):
        def hook(layer: nn.Linear, inputs, output):
            tokens = inputs[0].numel() // layer.in_features
            ops = self._layer(name, "lm_head")
            ops.tokens += tokens
            ops.in_features, ops.out_features = layer.in_features, layer.out_features
            ops.nonzero_inputs += tokens * layer.in_features  # the head multiplies every input
            ops.float_inputs += tokens * layer.in_features
            ops.macs += tokens * layer.in_features * layer.out_features
            ops.dense_macs += tokens * layer.in_features * layer.out_features
        return hook

    def snapshot(self) -> tuple[dict[str, LayerOps], int, int]:
        """The counts so far (a copy), to report what later forwards add (``report(cost, since=...)``)."""
        self._fold_tallies()
        return {name: LayerOps(**asdict(ops)) for name, ops in self.ops.items()}, self.tokens, self.sequences

    def report(self, cost: CostModel, since: tuple[dict[str, LayerOps], int, int] | None = None,
               until: tuple[dict[str, LayerOps], int, int] | None = None, sequences: int | None = None) -> EnergyReport:
        """The counted operations priced on ``cost``; ``since``/``until``: only those after/up to these
        :meth:`snapshot`\ s; ``sequences``: how many sequences they belong to (default: the batch rows
        of every forward)."""
        ops, tokens, counted = self.snapshot() if until is None else until
        layers = sorted(ops.values(),
                        key=lambda ops: self._order[ops.name.removesuffix(".products").removesuffix(".recurrence")])
        if since is not None:
            before, tokens_before, sequences_before = since
            layers = [_difference(ops, before.get(ops.name)) for ops in layers]
            tokens, counted = tokens - tokens_before, counted - sequences_before
        return EnergyReport(cost=cost, tokens=tokens, sequences=counted if sequences is None else sequences,
                            layers=layers)


#: LayerOps fields that describe a layer rather than add up over forwards
_DESCRIPTIVE = ("name", "kind", "in_features", "out_features", "encoded", "steps", "kv_bits")


def _difference(after: LayerOps, before: LayerOps | None) -> LayerOps:
    """What ``after`` counted beyond ``before`` (the same layer, earlier)."""
    if before is None:
        return LayerOps(**asdict(after))
    values = {}
    for f in fields(LayerOps):
        value = getattr(after, f.name)
        values[f.name] = value if f.name in _DESCRIPTIVE else value - getattr(before, f.name)
    return LayerOps(**values)


def graded(encoder: SpikeEncoder) -> bool:
    """Whether the encoder's spikes carry a level above 1, as the encoder declares
    (:attr:`~spikellm.neurons.base.SpikeEncoder.graded`: a GIF neuron with L > 2)."""
    return bool(encoder.graded)


def token_steps(encoder: SpikeEncoder) -> int:
    """Steps a token's sum of spike rows is multiplied by: one, or two where the allocated channels
    take their own per-token bound (separate clusters; a channel's ``2^addbit`` is a shift)."""
    scale = encoder.channel_scale
    if scale is None or not encoder.clusters_apart:
        return 1
    salient = scale > 1
    return 2 if bool(salient.any()) and not bool(salient.all()) else 1


def _add_shape(ops: LayerOps, layer, tokens: int) -> None:
    ops.tokens += tokens
    ops.in_features, ops.out_features = layer.in_features, layer.out_features
    ops.dense_macs += tokens * layer.in_features * layer.out_features


def _count_bits(encoder) -> int:
    """Bits of a stored count: sign and magnitude up to the largest count."""
    low, high = encoder.min_count, encoder.max_count
    return max(abs(low), abs(high)).bit_length() + (1 if low < 0 else 0)


def record_tally(ops: LayerOps, layer: SpikingLinear, tally) -> None:
    """Add a projection's tallied forwards to ``ops``: :func:`record_encoded`'s rules with the
    fan-out of every element ``out_features``, from the tally's sums."""
    encoder, out = layer.encoder, layer.out_features
    numbers = tally.as_numbers()
    _add_shape(ops, layer, numbers["activations"] // layer.in_features)
    spikes, levels, nonzero = numbers["spikes"], numbers["levels"], numbers["nonzero"]
    ops.encoded = True
    ops.spikes += spikes
    ops.spike_levels += levels
    ops.activations += numbers["activations"]
    ops.nonzero_inputs += nonzero  # an outlier rides on a saturated, non-zero count
    ops.steps = max(ops.steps, encoder.num_steps)
    if graded(encoder):
        ops.graded_spikes += spikes
    if encoder.granularity == "channel":
        ops.scale_macs += nonzero
        ops.float_inputs += nonzero
        ops.macs += nonzero * out
    else:
        ops.sops += spikes * out
        ops.level_sops += levels * out
        if graded(encoder):
            ops.graded_sops += spikes * out
        ops.scale_macs += numbers["active_rows"] * out * token_steps(encoder)
    ops.outliers += numbers["outlier_events"]
    ops.float_inputs += numbers["outlier_events"]
    ops.macs += numbers["outlier_events"] * out


def record_encoded(ops: LayerOps, encoder: SpikeEncoder, counts: Tensor, outliers: Tensor | None,
                   fan_out: int | Tensor) -> None:
    """Add one encoded input to ``ops``: ``counts`` (and the ``outliers`` stream, or None) of the
    input elements, every element of a row (token) reaching ``fan_out`` outputs (an int, or a
    ``[T, 1]`` tensor: the queries of each key). The one place where counts become operations (see
    the module docstring), in two parts: :func:`record_encoded_rows` (the input's own spikes, once)
    and :func:`record_reach` (their work per output reached); a per-channel step turns each non-zero
    element's work into MACs."""
    fan = fan_out if isinstance(fan_out, Tensor) else torch.tensor(float(fan_out), dtype=torch.float64)
    record_reach(ops, encoder, record_encoded_rows(ops, encoder, counts, outliers), fan.to(counts.device))


@torch.no_grad()
def record_encoded_rows(ops: LayerOps, encoder: SpikeEncoder, counts: Tensor, outliers: Tensor | None) -> Tensor:
    """:func:`record_encoded`'s terms that do not depend on the fan-out (the spikes of ``counts``,
    elements, non-zero inputs, outliers), added to ``ops``; returns per row (token) of ``counts``
    ``[..., T, 4]`` float64 the sums its reach multiplies: spikes, levels, non-zero elements
    (per-channel step) or 1 for a row with a non-zero element (per-token step), outliers."""
    spikes = encoder.spikes_per_count(counts).to(torch.float64)
    levels = encoder.spike_levels(counts).to(torch.float64)
    counted = counts != 0
    nonzero = counted if outliers is None else counted | (outliers != 0)
    stream = None if outliers is None else (outliers != 0).to(torch.float64)
    ops.encoded = True
    ops.spikes += spikes.sum().item()
    ops.spike_levels += levels.sum().item()
    ops.activations += counts.numel()
    ops.nonzero_inputs += nonzero.sum().item()
    ops.steps = max(ops.steps, encoder.num_steps)
    if graded(encoder):
        ops.graded_spikes += spikes.sum().item()
    if encoder.granularity == "channel":  # n·Δ_c once per element, then a product per output
        elements = counted.sum().item()
        ops.scale_macs += elements
        ops.float_inputs += elements
        reached = counted.to(torch.float64).sum(-1)
    else:
        reached = nonzero.any(dim=-1).to(torch.float64)
    if stream is not None:
        ops.outliers += stream.sum().item()
        ops.float_inputs += stream.sum().item()
    outlier_rows = torch.zeros_like(reached) if stream is None else stream.sum(-1)
    return torch.stack([spikes.sum(-1), levels.sum(-1), reached, outlier_rows], dim=-1)


@torch.no_grad()
def record_reach(ops: LayerOps, encoder: SpikeEncoder, sums: Tensor, fan_out: Tensor) -> None:
    """Add the work of rows with :func:`record_encoded_rows`'s ``sums [..., T, 4]``, row ``j``
    reaching ``fan_out[j]`` outputs (``[T, 1]``): synaptic operations (or, with a per-channel step,
    MACs), the per-token scale products, the outlier stream's MACs."""
    reach = (sums * fan_out.to(sums)).sum(dim=tuple(range(sums.dim() - 1)))
    spikes, levels, reached, outliers = reach.tolist()
    if encoder.granularity == "channel":
        ops.macs += reached
    else:
        ops.sops += spikes
        ops.level_sops += levels
        if graded(encoder):
            ops.graded_sops += spikes
        ops.scale_macs += reached * token_steps(encoder)
    ops.macs += outliers
