"""Lightning callbacks that report on a run: firing statistics and energy per validation.
The guard that stops a diverging run is :mod:`spikellm.training.nonfinite`."""
from __future__ import annotations

import lightning.pytorch as pl

from spikellm.neurons.stats import spike_report, track_spikes


class SpikeStatistics(pl.Callback):
    """Logs firing statistics per encoded layer, from closed forms on the counts (no spike trains).

    Full statistics (a count histogram per encoder) cost about as much as the encoding itself, so
    they are computed only where they are logged: over each validation epoch, and in training over
    one step every ``every_n_steps`` steps (the step whose ``global_step`` after the update is a
    multiple of ``every_n_steps``), a sample of the window rather than its sum. Each layer logs
    ``spikes/<layer>/{firing_rate,spikes_per_activation,silent_fraction}`` and the model its
    activation-weighted mean ``spikes/firing_rate`` and ``spikes/spikes_per_activation``. A spike
    objective (``task.spike_loss``) logs the exact ``train/spikes_per_activation`` of every step.
    A sampled window opens and closes within its step, so a resumed run's rows are those of an
    uninterrupted run with no state carried in the checkpoint.
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
        # each rank counted its own shard: the logged figure is their mean (no DDP warning per metric)
        module.log_dict(metrics, on_step=not during_validation, on_epoch=during_validation, sync_dist=True)

    def _samples(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def on_train_start(self, trainer, module):
        # a sampled window opens and closes within one step, so a resumed run has none to carry
        track_spikes(module, enabled=False)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self._samples(trainer.global_step + 1):  # this step ends on a logged step
            track_spikes(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self._samples(trainer.global_step):
            self._log(module, "train/spikes/")
            track_spikes(module, enabled=False)

    def on_validation_epoch_start(self, trainer, module):
        track_spikes(module)

    def on_validation_epoch_end(self, trainer, module):
        self._log(module, "val/spikes/")
        track_spikes(module, enabled=False)

    def on_train_end(self, trainer, module):
        track_spikes(module, enabled=False)


class EnergyReport(pl.Callback):
    """Counts every operation of each validation epoch exactly (:class:`OperationCounter`), logs
    ``val/energy/{joules_per_token,ratio_to_dense,acs_per_token,macs_per_token}`` and writes
    ``energy.json`` and ``energy.png`` (per-layer firing rate and energy) under ``output_dir``.
    The last report is kept in :attr:`report` for the run summary."""

    def __init__(self, cost, output_dir: str | None = None):
        from spikellm.energy import cost_model

        self.cost = cost_model(cost, "callbacks.energy.cost")
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
                         "val/energy/macs_per_token": report.per_token(report.macs)}, sync_dist=True)
        if self.output_dir and trainer.is_global_zero:
            from pathlib import Path

            out = Path(self.output_dir)
            self.files = {"json": str(report.save_json(out / "energy.json")),
                          "figure": str(report.save_figure(out / "energy.png"))}
