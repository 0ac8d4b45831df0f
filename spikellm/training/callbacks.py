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
