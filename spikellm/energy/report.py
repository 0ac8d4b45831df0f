"""Operation counts per layer and what they cost: the common result of the counter and the estimator."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from spikellm.energy.cost import CostModel


@dataclass
class LayerOps:
    """Operations of one layer over the counted tokens.

    ``macs`` are dense multiply-accumulates (floating-point work), ``acs`` accumulates driven by
    spikes (``Σ_t nnz(s_t) × fan_out``); ``dense_macs`` is what the layer would cost run densely on
    the same tokens, the reference of the ratio. Each spike is also priced as one network event
    (``CostModel.event_pj``); memory loads and stores are not counted yet. ``spikes``/``activations``/``steps`` describe the
    layer's input train when it has one.
    """

    name: str
    kind: str  # projection | attention | recurrence | lm_head
    macs: float = 0.0
    acs: float = 0.0
    dense_macs: float = 0.0
    spikes: float = 0.0
    activations: float = 0.0
    steps: int = 0

    @property
    def spikes_per_activation(self) -> float | None:
        return self.spikes / self.activations if self.activations else None

    @property
    def firing_rate(self) -> float | None:
        return self.spikes / (self.activations * self.steps) if self.activations and self.steps else None


@dataclass
class EnergyReport:
    """Per-layer operations of ``tokens`` tokens (in ``sequences`` sequences) priced by ``cost``."""

    cost: CostModel
    tokens: int
    sequences: int
    layers: list[LayerOps] = field(default_factory=list)

    @property
    def macs(self) -> float:
        return sum(layer.macs for layer in self.layers)

    @property
    def acs(self) -> float:
        return sum(layer.acs for layer in self.layers)

    @property
    def dense_macs(self) -> float:
        return sum(layer.dense_macs for layer in self.layers)

    def layer_joules(self, layer: LayerOps) -> float:
        # every spike is also an event on the chip's network (priced where the cost model does)
        return self.cost.joules(macs=layer.macs, acs=layer.acs, events=layer.spikes)

    @property
    def joules(self) -> float:
        return sum(self.layer_joules(layer) for layer in self.layers)

    @property
    def dense_joules(self) -> float:
        return sum(self.cost.joules(macs=layer.dense_macs) for layer in self.layers)  # summed as joules is

    @property
    def ratio_to_dense(self) -> float:
        return self.joules / self.dense_joules if self.dense_joules else float("nan")

    def per_token(self, value: float) -> float:
        return value / max(1, self.tokens)

    def to_dict(self) -> dict:
        """Plain numbers for ``results.json``-style files."""
        return {
            "cost_model": asdict(self.cost), "tokens": self.tokens, "sequences": self.sequences,
            "macs": self.macs, "acs": self.acs, "dense_macs": self.dense_macs,
            "joules": self.joules, "dense_joules": self.dense_joules, "ratio_to_dense": self.ratio_to_dense,
            "joules_per_token": self.per_token(self.joules),
            "joules_per_sequence": self.joules / max(1, self.sequences),
            "layers": [{**asdict(layer), "joules": self.layer_joules(layer),
                        "spikes_per_activation": layer.spikes_per_activation, "firing_rate": layer.firing_rate}
                       for layer in self.layers],
        }

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` atomically (a kill never leaves half a report)."""
        from spikellm.io import atomic_write_json

        return atomic_write_json(path, self.to_dict())

    def rich_table(self, title: str = "energy"):
        """Per-layer table (projections grouped by kind) with the totals as the last rows."""
        from rich.table import Table

        table = Table(title=f"{title} — {self.cost.name}, {self.tokens:,} tokens", title_justify="left")
        for column in ("layer", "firing", "spk/act", "MAC/tok", "AC/tok", "E/tok", "×dense"):
            table.add_column(column, justify="left" if column == "layer" else "right", no_wrap=True)
        for layer in self.layers:
            dense = self.cost.joules(macs=layer.dense_macs)
            table.add_row(short_name(layer.name), _percent(layer.firing_rate),
                          _number(layer.spikes_per_activation, "{:.2f}"),
                          count_text(self.per_token(layer.macs)), count_text(self.per_token(layer.acs)),
                          joules_text(self.per_token(self.layer_joules(layer))),
                          _number(self.layer_joules(layer) / dense if dense else None, "{:.3f}"))
        table.add_section()
        table.add_row("total", "", "", count_text(self.per_token(self.macs)), count_text(self.per_token(self.acs)),
                      joules_text(self.per_token(self.joules)), f"{self.ratio_to_dense:.3f}", style="bold")
        return table

    def save_figure(self, path: str | Path) -> Path:
        """PNG: firing rate and energy per token of every layer."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [short_name(layer.name) for layer in self.layers]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.28 * len(names)), 6.5), sharex=True)
        top.bar(names, [100 * (layer.firing_rate or 0) for layer in self.layers], color="tab:orange")
        top.set_ylabel("firing rate (%)")
        top.set_title(f"{self.cost.name}: {joules_text(self.per_token(self.joules))}/token, "
                      f"{self.ratio_to_dense:.3f}× dense")
        bottom.bar(names, [self.per_token(self.layer_joules(layer)) * 1e6 for layer in self.layers], label="model")
        bottom.bar(names, [self.per_token(self.cost.joules(macs=layer.dense_macs)) * 1e6 for layer in self.layers],
                   fill=False, edgecolor="black", label="dense")
        bottom.set_ylabel("µJ / token")
        bottom.legend()
        bottom.tick_params(axis="x", rotation=90, labelsize=7)
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
