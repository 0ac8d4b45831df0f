"""Perplexity against energy over many runs: the trade-off a spike budget buys, in one picture.

Reads run directories written by train.py (``summary.json``: the final validation perplexity and
spikes per activation; ``energy.json``: the raw operation counts of that validation), prices every
run on each requested cost model (:meth:`EnergyReport.reprice`: the same counts, another price
list), and writes a Markdown table and a PNG of perplexity against energy per token, one panel per
cost model, the dense run(s) marked and the Pareto front drawn (the runs no other run beats on
both perplexity and energy). ``spikellm-pareto <sweep or run dirs> --cost horowitz45_fp32 ...``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from spikellm.energy.cost import CostModel
from spikellm.energy.report import EnergyReport, save_png
from spikellm.errors import DataError


@dataclass
class RunPoint:
    """One run: its label, perplexity, spikes per activation, and its energy report."""

    label: str
    directory: Path
    val_ppl: float
    spikes_per_activation: float | None
    report: EnergyReport
    dense: bool = False  # a run without encoders (neuron=none): the reference
    priced: dict[str, dict] = field(default_factory=dict)  # cost model name -> figures

    @property
    def nonzero_fraction(self) -> float | None:
        """Non-zero inputs over encoded inputs of the block projections: the share of weight rows
        a spiking layer reads (None for a dense run)."""
        encoded = [layer for layer in self.report.layers if layer.kind == "projection" and layer.encoded]
        activations = sum(layer.activations for layer in encoded)
        return sum(layer.nonzero_inputs for layer in encoded) / activations if activations else None


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories (holding ``summary.json``) at or below ``paths`` (a multirun sweep's
    numbered subdirectories, or runs given one by one), in a stable order."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path}: no such directory (give a sweep directory or run directories)")
        found = [path] if (path / "summary.json").is_file() else sorted(
            (p.parent for p in path.rglob("summary.json")), key=lambda p: str(p))
        if not found:
            raise DataError(f"{path}: no run summary (summary.json) in or below it; train.py writes one at the end "
                            "of each run")
        runs.extend(p for p in found if p not in runs)
    return runs


def read_run(directory: Path) -> RunPoint:
    """The run in ``directory``: its ``summary.json`` and ``energy.json``."""
    try:
        summary = json.loads((directory / "summary.json").read_text())
        energy = json.loads((directory / "energy.json").read_text())
    except FileNotFoundError as error:
        raise DataError(f"{directory}: {Path(error.filename).name} is missing (a run without energy "
                        "counting, callbacks.energy_report off?)") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{directory}: unreadable JSON ({error})") from None
    neuron = summary.get("neuron") or {}
    dense = not neuron.get("encoder")
    label = run_label(summary, directory)
    return RunPoint(label=label, directory=directory, val_ppl=float(summary["val_ppl"]),
                    spikes_per_activation=summary.get("spikes_per_activation"),
                    report=EnergyReport.from_dict(energy), dense=dense)


def run_label(summary: dict, directory: Path) -> str:
    """The sweep's own overrides (``budget=mean_k1``), else the neuron's name and the directory."""
    # what sets the point, not how the run was watched (progress bars, callbacks, loggers)
    overrides = [o for o in summary.get("overrides") or []
                 if not o.lstrip("~+").startswith(("hydra.", "experiment=", "callbacks", "logger", "trainer.enable_"))]
    if overrides:
        return " ".join(overrides)
    name = (summary.get("neuron") or {}).get("name") or "dense"
    return f"{name} ({directory.name})"


def price(points: list[RunPoint], costs: list[CostModel]) -> None:
    """Fill each point's ``priced[cost.name]``: µJ/token and ×dense for the whole model and for the
    block projections alone (kind ``projection``), on the same counts."""
    for point in points:
        for cost in costs:
            report = point.report.reprice(cost)
            projections = [layer for layer in report.layers if layer.kind == "projection"]
            spent = sum(report.layer_energy(layer).total for layer in projections)
            dense = sum(report.dense_layer_energy(layer).total for layer in projections)
            point.priced[cost.name] = {
                "uj_per_token": report.per_token(report.joules) * 1e6,
                "dense_uj_per_token": report.per_token(report.dense_joules) * 1e6,
                "ratio_to_dense": report.ratio_to_dense,
                "projections_ratio_to_dense": spent / dense if dense else float("nan"),
            }


def pareto_front(points: list[RunPoint], cost_name: str) -> list[RunPoint]:
    """The points no other point beats on both energy per token and perplexity (ties kept),
    ordered by energy."""
    def key(p):
        return p.priced[cost_name]["uj_per_token"], p.val_ppl

    front = [p for p in points
             if not any(key(q)[0] <= key(p)[0] and key(q)[1] <= key(p)[1] and key(q) != key(p) for q in points)]
    return sorted(front, key=key)


def markdown_table(points: list[RunPoint], costs: list[CostModel]) -> str:
    """One row per run: ppl, ×dense ppl, spikes per activation, the fraction of non-zero projection
    inputs, and per cost model µJ/token,
    ×dense (whole model) and ×dense (block projections); ``*`` marks the Pareto front."""
    dense_ppl = min((p.val_ppl for p in points if p.dense), default=None)
    fronts = {cost.name: {id(p) for p in pareto_front(points, cost.name)} for cost in costs}
    header = ["run", "val ppl", "× dense ppl", "spikes/act", "non-zero inputs"]
    for cost in costs:
        header += [f"{cost.name}: µJ/tok", "× dense", "× dense (projections)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in sorted(points, key=lambda p: p.priced[costs[0].name]["uj_per_token"]):
        cells = [p.label + (" (dense)" if p.dense else ""), f"{p.val_ppl:.2f}",
                 "" if dense_ppl is None else f"{p.val_ppl / dense_ppl:.3f}",
                 "—" if p.spikes_per_activation is None or p.dense else f"{p.spikes_per_activation:.3f}",
                 "—" if p.nonzero_fraction is None else f"{p.nonzero_fraction:.1%}"]
        for cost in costs:
            f = p.priced[cost.name]
            star = "*" if id(p) in fronts[cost.name] else ""
            cells += [f"{f['uj_per_token']:.2f}{star}", f"{f['ratio_to_dense']:.3f}",
                      f"{f['projections_ratio_to_dense']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("`*`: on the Pareto front of that cost model (no other run has both lower energy and lower "
                 "perplexity). Energies are the final validation's, priced from the same operation counts:")
    lines += [f"- {cost.describe()}" for cost in costs]
    return "\n".join(lines) + "\n"


def save_figure(points: list[RunPoint], costs: list[CostModel], path: str | Path) -> Path:
    """PNG: perplexity against energy per token, a panel per cost model, dense marked, front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(costs), figsize=(5.2 * len(costs), 4.4), squeeze=False)
    for ax, cost in zip(axes[0], costs):
        for p in points:
            x = p.priced[cost.name]["uj_per_token"]
            ax.scatter(x, p.val_ppl, marker="s" if p.dense else "o", s=60 if p.dense else 30,
                       color="black" if p.dense else "tab:blue", zorder=3)
            ax.annotate("dense" if p.dense else _short(p.label), (x, p.val_ppl), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        front = pareto_front(points, cost.name)
        ax.plot([p.priced[cost.name]["uj_per_token"] for p in front], [p.val_ppl for p in front],
                color="tab:orange", linewidth=1.5, label="Pareto front", zorder=2)
        dense_energy = points[0].priced[cost.name]["dense_uj_per_token"]
        ax.axvline(dense_energy, color="grey", linestyle="--", linewidth=1, label="dense energy")
        ax.set_xlabel("µJ / token (final validation)")
        ax.set_ylabel("validation perplexity")
        ax.set_title(cost.name, fontsize=9)
        ax.legend(fontsize=7)
    return save_png(fig, path)


def _short(label: str) -> str:
    return label if len(label) <= 28 else label[:27] + "…"


def main(argv: list[str] | None = None) -> int:
    """``spikellm-pareto DIR... [--cost NAME ...] [--out DIR]``: the table (printed and written as
    ``pareto.md``) and ``pareto.png`` of the runs found under the directories."""
    import argparse
    import sys

    from spikellm.energy.cost import load_cost_model
    from spikellm.errors import SpikeLLMError

    parser = argparse.ArgumentParser(prog="spikellm-pareto", description=main.__doc__)
    parser.add_argument("dirs", nargs="+", help="a multirun sweep directory, or run directories")
    parser.add_argument("--cost", nargs="+", default=["horowitz45_fp32", "horowitz45_fp32_sram", "seneca"],
                        help="cost models (conf/energy names or YAML paths)")
    parser.add_argument("--out", default=None, help="where pareto.md and pareto.png go (default: the first dir)")
    args = parser.parse_args(argv)
    try:
        costs = [load_cost_model(name) for name in args.cost]
        points = [read_run(run) for run in find_runs(args.dirs)]
        price(points, costs)
        table = markdown_table(points, costs)
        out = Path(args.out or args.dirs[0])
        out.mkdir(parents=True, exist_ok=True)
        from spikellm.io import atomic_write_text

        atomic_write_text(out / "pareto.md", table)
        figure = save_figure(points, costs, out / "pareto.png")
    except SpikeLLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table)
    print(f"wrote {out / 'pareto.md'} and {figure}")
    return 0
