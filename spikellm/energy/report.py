"""Operation counts per layer and what they cost: the common result of the counter and the estimator.

Counts are raw facts (:class:`LayerOps`: MACs, spikes, their level sum, synaptic operations, non-zero
inputs, tokens, shapes, ...); the cost model is policy. :class:`EnergyReport` derives from the counts,
under its cost model, what is charged (:class:`~spikellm.energy.cost.Operations`):

* **MACs**: ``macs + scale_macs`` (+ ``graded_sops`` as graded MACs when ``graded_spike: mac``);
* **accumulates**: ``sops`` (``one_ac``), ``level_sops`` (``level_acs``) or ``sops - graded_sops``
  (``mac``);
* **weight reads** (projections and the head only; attention products and the recurrence have no
  weights): ``per_spike``: ``sops + macs`` (one weight per synaptic operation and per product of a
  floating-point input); ``per_input``: ``nonzero_inputs × out_features`` (each non-zero input's
  row once);
* **activation reads**: ``float_inputs`` (inputs that arrive as numbers, not spikes: every non-zero
  input of a dense projection, the outlier stream of a spiking one); **writes**: ``tokens × out``;
* **events**: ``spikes``, every spike of every encoder.

The dense reference of each layer is priced on the same cost model with the same memory terms:
``dense_macs`` MACs, and for projections and the head every weight read once per token
(``tokens × in × out``), ``tokens × in`` inputs read and ``tokens × out`` outputs written.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from spikellm.energy.cost import CostModel, EnergySplit, Operations
from spikellm.errors import DataError

#: Layer kinds that multiply weights (and so read them and their activations from memory).
WEIGHTED = ("projection", "lm_head")
#: ``format`` of :meth:`EnergyReport.to_dict`, checked by :meth:`EnergyReport.from_dict`.
FORMAT = "spikellm.energy/2"


@dataclass
class LayerOps:
    """Raw operation counts of one layer over the counted tokens (nothing here depends on a cost model).

    Args:
        name, kind: ``projection | attention | recurrence | lm_head``.
        tokens, in_features, out_features: tokens through the layer and its shape (projections, head).
        macs: floating-point multiply-accumulates: a dense projection's non-zero inputs × ``out``,
            the outlier stream's products, products of inputs with a per-channel step, float
            attention products, the head, the recurrence.
        scale_macs: multiplies by a dynamic step (``Δ_t`` of a projection's outputs, ``q·Δ_K`` and
            ``P·Δ_V`` of spiking attention).
        dense_macs: what the layer would multiply run densely on the same tokens (the reference).
        encoded: whether the input came through a spike encoder.
        spikes: spike events of the input trains; ``spike_levels`` their summed levels (``|n|`` of
            a GIF count, ``spikes`` for binary and ternary codes); ``graded_spikes`` the events of
            multi-level (GIF, L > 2) encoders.
        sops: synaptic operations, every spike times the outputs it reaches (``Σ spikes × fan_out``);
            ``level_sops`` the same weighted by level; ``graded_sops`` the part from graded spikes.
        nonzero_inputs: input elements that are not zero (count or outlier).
        float_inputs: input elements that arrive as numbers rather than spikes (dense inputs,
            outliers, elements with a per-channel step).
        outliers: non-zero elements of the outlier stream.
        activations, steps: elements encoded and time steps of the trains.
        kv_writes, kv_reads: attention's key and value elements written to the cache and read from
            it (each by every query of its group); ``kv_bits`` their width when stored as spike
            counts (None: floating point, the cost model's operand width); ``score_elements`` the
            attention probabilities, each written once and read once for ``P·V``.
    """

    name: str
    kind: str
    tokens: float = 0.0
    in_features: int = 0
    out_features: int = 0
    macs: float = 0.0
    scale_macs: float = 0.0
    dense_macs: float = 0.0
    encoded: bool = False
    spikes: float = 0.0
    spike_levels: float = 0.0
    graded_spikes: float = 0.0
    sops: float = 0.0
    level_sops: float = 0.0
    graded_sops: float = 0.0
    nonzero_inputs: float = 0.0
    float_inputs: float = 0.0
    outliers: float = 0.0
    activations: float = 0.0
    steps: int = 0
    kv_writes: float = 0.0
    kv_reads: float = 0.0
    kv_bits: int | None = None
    score_elements: float = 0.0

    @property
    def acs(self) -> float:
        """Synaptic operations, one accumulate each (``graded_spike: one_ac``); the accumulates a
        cost model charges are :meth:`EnergyReport.operations` ``.acs``."""
        return self.sops

    @property
    def spikes_per_activation(self) -> float | None:
        return self.spikes / self.activations if self.activations else None

    @property
    def firing_rate(self) -> float | None:
        return self.spikes / (self.activations * self.steps) if self.activations and self.steps else None

    def counts(self) -> dict:
        """The raw counts (every field but name and kind)."""
        return {key: value for key, value in asdict(self).items() if key not in ("name", "kind")}


@dataclass
class EnergyReport:
    """Per-layer operations of ``tokens`` tokens (in ``sequences`` sequences) priced by ``cost``."""

    cost: CostModel
    tokens: int
    sequences: int
    layers: list[LayerOps] = field(default_factory=list)

    # ---- what the cost model charges -------------------------------------------------------
    def operations(self, layer: LayerOps) -> Operations:
        """The layer's counts as this report's cost model charges them (see the module docstring)."""
        cost = self.cost
        acs = {"one_ac": layer.sops, "level_acs": layer.level_sops,
               "mac": layer.sops - layer.graded_sops}[cost.graded_spike]
        graded_macs = layer.graded_sops if cost.graded_spike == "mac" else 0.0
        reads = writes = weights = 0.0
        events = layer.spikes
        if layer.kind in WEIGHTED:
            weights = (layer.nonzero_inputs * layer.out_features if cost.weight_reads == "per_input"
                       else layer.sops + layer.macs)
            reads, writes = layer.float_inputs, layer.tokens * layer.out_features
            if cost.events == "graded" and layer.encoded:
                # each non-zero count: one event, its row read once, one multiply per output (an
                # outlier rides on a saturated count, whose row it shares; inputs with a per-channel
                # step arrive as numbers, MACs already, and fire no synaptic operation)
                evented = layer.nonzero_inputs if layer.sops else 0.0
                acs, graded_macs, events = 0.0, evented * layer.out_features, evented
                weights = layer.nonzero_inputs * layer.out_features
        if layer.kind == "attention":  # the KV cache at the width it is stored, the scores in float
            width = 1.0 if layer.kv_bits is None else layer.kv_bits / cost.operand_bits
            reads, writes = layer.kv_reads * width + layer.score_elements, layer.kv_writes * width + layer.score_elements
        return Operations(macs=layer.macs + layer.scale_macs, graded_macs=graded_macs, acs=acs, weight_reads=weights,
                          activation_reads=reads, activation_writes=writes, events=events)

    def dense_operations(self, layer: LayerOps) -> Operations:
        """The layer run densely on the same tokens: every weight read per token, every input read."""
        if layer.kind == "attention":  # a float KV cache
            return Operations(macs=layer.dense_macs, activation_reads=layer.kv_reads + layer.score_elements,
                              activation_writes=layer.kv_writes + layer.score_elements)
        if layer.kind not in WEIGHTED:
            return Operations(macs=layer.dense_macs)
        return Operations(macs=layer.dense_macs, weight_reads=layer.dense_macs,
                          activation_reads=layer.tokens * layer.in_features,
                          activation_writes=layer.tokens * layer.out_features)

    def layer_energy(self, layer: LayerOps) -> EnergySplit:
        return self.cost.energy(self.operations(layer))

    def dense_layer_energy(self, layer: LayerOps) -> EnergySplit:
        return self.cost.energy(self.dense_operations(layer))

    def layer_joules(self, layer: LayerOps) -> float:
        return self.layer_energy(layer).total

    def dense_layer_joules(self, layer: LayerOps) -> float:
        return self.dense_layer_energy(layer).total

    # ---- totals ----------------------------------------------------------------------------
    @property
    def energy(self) -> EnergySplit:
        return sum((self.layer_energy(layer) for layer in self.layers), EnergySplit())

    @property
    def dense_energy(self) -> EnergySplit:
        return sum((self.dense_layer_energy(layer) for layer in self.layers), EnergySplit())

    @property
    def joules(self) -> float:
        return self.energy.total

    @property
    def dense_joules(self) -> float:
        return self.dense_energy.total

    @property
    def spikes_per_activation(self) -> float | None:
        """Spikes per activation over every encoded input (None: nothing was encoded)."""
        encoded = [layer for layer in self.layers if layer.encoded]
        activations = sum(layer.activations for layer in encoded)
        return sum(layer.spikes for layer in encoded) / activations if activations else None

    @property
    def ratio_to_dense(self) -> float:
        return self.joules / self.dense_joules if self.dense_joules else float("nan")

    @property
    def macs(self) -> float:
        """Every multiply-accumulate charged: floating-point work, scale products, graded-spike MACs."""
        return sum(ops.macs + ops.graded_macs for ops in map(self.operations, self.layers))

    @property
    def acs(self) -> float:
        """Accumulates charged (they follow the cost model's ``graded_spike``)."""
        return sum(self.operations(layer).acs for layer in self.layers)

    @property
    def dense_macs(self) -> float:
        return sum(layer.dense_macs for layer in self.layers)

    def per_token(self, value: float) -> float:
        return value / max(1, self.tokens)

    def reprice(self, cost: CostModel) -> "EnergyReport":
        """The same counts on another cost model."""
        return EnergyReport(cost=cost, tokens=self.tokens, sequences=self.sequences,
                            layers=[LayerOps(**asdict(layer)) for layer in self.layers])

    def summary(self) -> str:
        """One line: energy per token, ratio to dense, the cost model and what it charges."""
        return (f"{joules_text(self.per_token(self.joules))}/token, {self.ratio_to_dense:.3f}× dense "
                f"({self.cost.name}: {self.cost.charges()})")

    # ---- files -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain numbers for ``energy.json`` / ``results.json``: the cost model and its description,
        totals, and per layer the raw counts (``counts``), what is charged (``operations``) and the
        energy by term (``energy``), each also for the dense reference. :meth:`from_dict` reads it."""
        layers = []
        for layer in self.layers:
            ops, dense_ops = self.operations(layer), self.dense_operations(layer)
            energy, dense = self.layer_energy(layer), self.dense_layer_energy(layer)
            layers.append({
                "name": layer.name, "kind": layer.kind, "counts": layer.counts(),
                "operations": asdict(ops), "energy": energy.to_dict(),
                "dense_operations": asdict(dense_ops), "dense_energy": dense.to_dict(),
                "macs": ops.macs + ops.graded_macs, "acs": ops.acs, "dense_macs": layer.dense_macs,
                "joules": energy.total, "dense_joules": dense.total, "spikes": layer.spikes,
                "activations": layer.activations, "steps": layer.steps,
                "spikes_per_activation": layer.spikes_per_activation, "firing_rate": layer.firing_rate})
        return {
            "format": FORMAT, "cost_model": asdict(self.cost), "cost_model_description": self.cost.describe(),
            "tokens": self.tokens, "sequences": self.sequences,
            "macs": self.macs, "acs": self.acs, "dense_macs": self.dense_macs,
            "joules": self.joules, "dense_joules": self.dense_joules, "ratio_to_dense": self.ratio_to_dense,
            "energy": self.energy.to_dict(), "dense_energy": self.dense_energy.to_dict(),
            "joules_per_token": self.per_token(self.joules), "dense_joules_per_token": self.per_token(self.dense_joules),
            "spikes_per_activation": self.spikes_per_activation,
            "joules_per_sequence": self.joules / max(1, self.sequences),
            "layers": layers,
        }

    @classmethod
    def from_dict(cls, data: dict, cost: CostModel | None = None) -> "EnergyReport":
        """The report :meth:`to_dict` wrote (priced on its own cost model, or on ``cost``)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise DataError(f"not an energy report of format {FORMAT!r} (found {found!r}): reports written "
                            "before raw counts were kept cannot be repriced; count the run again")
        known = {f.name for f in fields(LayerOps)}
        layers = [LayerOps(name=layer["name"], kind=layer["kind"],
                           **{key: value for key, value in layer["counts"].items() if key in known})
                  for layer in data["layers"]]
        if cost is None:
            recorded = dict(data["cost_model"])
            if "bits" in recorded:  # energy.json written before the field was named operand_bits
                recorded["operand_bits"] = recorded.pop("bits")
            cost = CostModel(**recorded)
        return cls(cost=cost, tokens=data["tokens"], sequences=data["sequences"], layers=layers)

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` atomically (a kill never leaves half a report)."""
        from spikellm.io import atomic_write_json

        return atomic_write_json(path, self.to_dict())

    def rich_table(self, title: str = "energy"):
        """Per-layer table (projections grouped by kind) with the totals as the last rows; the
        caption says what the cost model charges and leaves out."""
        from rich.table import Table

        memory = self.cost.charges_memory
        table = Table(title=f"{title} — {self.cost.name}, {self.tokens:,} tokens", title_justify="left",
                      caption=self.cost.describe(), caption_justify="left")
        columns = ["layer", "firing", "spk/act", "MAC/tok", "AC/tok", *(["W rd/tok", "mem"] if memory else []),
                   "E/tok", "×dense"]
        for column in columns:
            table.add_column(column, justify="left" if column == "layer" else "right", no_wrap=True)

        def row(name, firing, per_act, ops: Operations, energy: EnergySplit, dense: float, **style):
            cells = [name, firing, per_act, count_text(self.per_token(ops.macs + ops.graded_macs)),
                     count_text(self.per_token(ops.acs))]
            if memory:
                share = (energy.weight_memory + energy.activation_memory) / energy.total if energy.total else None
                cells += [count_text(self.per_token(ops.weight_reads)), _percent(share)]
            ratio = energy.total / dense if dense else None
            cells += [joules_text(self.per_token(energy.total)), _number(ratio, "{:.3f}")]
            table.add_row(*cells, **style)

        for layer in self.layers:
            row(short_name(layer.name), _percent(layer.firing_rate), _number(layer.spikes_per_activation, "{:.2f}"),
                self.operations(layer), self.layer_energy(layer), self.dense_layer_joules(layer))
        table.add_section()
        total = Operations(**{key: sum(getattr(self.operations(layer), key) for layer in self.layers)
                              for key in Operations.__dataclass_fields__})
        row("total", "", "", total, self.energy, self.dense_joules, style="bold")
        return table

    def save_figure(self, path: str | Path) -> Path:
        """PNG: firing rate and energy per token of every layer (stacked by term) against dense."""
        import textwrap

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [short_name(layer.name) for layer in self.layers]
        width = max(6, 0.28 * len(names))
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 7), sharex=True)
        top.bar(names, [100 * (layer.firing_rate or 0) for layer in self.layers], color="tab:orange")
        top.set_ylabel("firing rate (%)")
        heading = (f"{self.cost.name}: {joules_text(self.per_token(self.joules))}/token, "
                   f"{self.ratio_to_dense:.3f}× dense")
        top.set_title("\n".join([heading, *textwrap.wrap(self.cost.charges(), int(width * 14))]), fontsize=9)
        energies = [self.layer_energy(layer) for layer in self.layers]
        bottom_of = [0.0] * len(names)
        for term, color in (("compute", "tab:blue"), ("weight_memory", "tab:green"),
                            ("activation_memory", "tab:olive"), ("events", "tab:purple")):
            heights = [self.per_token(getattr(energy, term)) * 1e6 for energy in energies]
            if any(heights):
                bottom.bar(names, heights, bottom=bottom_of, color=color, label=term.replace("_", " "))
                bottom_of = [b + h for b, h in zip(bottom_of, heights)]
        bottom.bar(names, [self.per_token(self.dense_layer_joules(layer)) * 1e6 for layer in self.layers],
                   fill=False, edgecolor="black", label="dense")
        bottom.set_ylabel("µJ / token")
        bottom.legend(fontsize=7)
        bottom.tick_params(axis="x", rotation=90, labelsize=7)
        return save_png(fig, path)


def save_png(fig, path: str | Path) -> Path:
    """Lay out, write and close a matplotlib figure (its directory made as needed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def short_name(name: str) -> str:
    """``layers.3.self_attn.q_proj`` → ``L3.q_proj``: table and figure labels."""
    return name.replace("layers.", "L").replace("self_attn.", "").replace("mlp.", "")


def count_text(count: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.3g}{unit}"
    return f"{count:.0f}"


def joules_text(joules: float) -> str:
    for unit, scale in (("J", 1.0), ("mJ", 1e-3), ("µJ", 1e-6), ("nJ", 1e-9)):
        if abs(joules) >= scale:
            return f"{joules / scale:,.3g} {unit}"
    return f"{joules / 1e-12:,.3g} pJ"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _number(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)
