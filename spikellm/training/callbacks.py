"""Lightning callbacks of spikellm."""
from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn

from spikellm.neurons.stats import spike_report, track_spikes


class SpikeStatistics(pl.Callback):
    """Logs firing statistics per encoded layer, from closed forms on the counts (no spike trains).

    Statistics accumulate over each validation epoch and over every ``every_n_steps`` training
    steps; each layer logs ``spikes/<layer>/{firing_rate,spikes_per_activation,silent_fraction}``
    and the model its activation-weighted mean ``spikes/firing_rate`` and
    ``spikes/spikes_per_activation``.
    """

    def __init__(self, every_n_steps: int = 50, per_layer: bool = True):
        self.every_n_steps = every_n_steps
        self.per_layer = per_layer

    def _log(self, module: pl.LightningModule, prefix: str) -> None:
        report = spike_report(module)
        if not report:
            return
        activations = sum(r["activations"] for r in report.values())
        if activations == 0:
            return
        spikes = sum(r["spikes"] for r in report.values())
        steps = sum(r["activations"] * r["steps"] for r in report.values())
        metrics = {f"{prefix}spikes_per_activation": spikes / activations, f"{prefix}firing_rate": spikes / steps}
        if self.per_layer:
            for name, r in report.items():
                layer = name.removeprefix("model.").removesuffix(".encoder")
                for key in ("firing_rate", "spikes_per_activation", "silent_fraction"):
                    metrics[f"{prefix}{layer}/{key}"] = r[key]
        during_validation = prefix.startswith("val")
        module.log_dict(metrics, on_step=not during_validation, on_epoch=during_validation)
        track_spikes(module)  # fresh totals for the next window

    def on_train_start(self, trainer, module):
        track_spikes(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (trainer.global_step % self.every_n_steps) == 0:
            self._log(module, "train/spikes/")

    def on_validation_epoch_start(self, trainer, module):
        track_spikes(module)

    def on_validation_epoch_end(self, trainer, module):
        self._log(module, "val/spikes/")
        # inside fit, training resumes and keeps tracking; a plain validate() leaves nothing on
        track_spikes(module, enabled=trainer.state.fn == TrainerFn.FITTING)

    def on_train_end(self, trainer, module):
        track_spikes(module, enabled=False)


class EnergyReport(pl.Callback):
    """Counts every operation of each validation epoch exactly (:class:`OperationCounter`), logs
    ``val/energy/{joules_per_token,ratio_to_dense,acs_per_token,macs_per_token}`` and writes
    ``energy.json`` and ``energy.png`` (per-layer firing rate and energy) under ``output_dir``.
    The last report is kept in :attr:`report` for the run summary."""

    def __init__(self, cost, output_dir: str | None = None):
        from spikellm.energy import CostModel, load_cost_model

        self.cost = cost if isinstance(cost, CostModel) else load_cost_model(str(cost))
        self.output_dir = output_dir
        self.report = None
        self.files: dict[str, str] = {}
        self._counter = None

    def on_validation_epoch_start(self, trainer, module):
        from spikellm.energy import OperationCounter

        self._counter = OperationCounter(module.model)

    def on_validation_epoch_end(self, trainer, module):
        if self._counter is None:
            return
        self._counter.remove()
        report = self._counter.report(self.cost)
        self._counter = None
        if report.tokens == 0:
            return
        self.report = report
        module.log_dict({"val/energy/joules_per_token": report.per_token(report.joules),
                         "val/energy/ratio_to_dense": report.ratio_to_dense,
                         "val/energy/acs_per_token": report.per_token(report.acs),
                         "val/energy/macs_per_token": report.per_token(report.macs)})
        if self.output_dir and trainer.is_global_zero:
            from pathlib import Path

            out = Path(self.output_dir)
            self.files = {"json": str(report.save_json(out / "energy.json")),
                          "figure": str(report.save_figure(out / "energy.png"))}
