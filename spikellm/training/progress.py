"""The training progress bar: Lightning's rich bar, which for a run bounded by steps (no epoch
limit, ``max_epochs=-1``) would show ``Epoch 0/-2``; here it shows the epoch alone then."""
from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """:class:`RichProgressBar` whose epoch reads ``Epoch 3`` (``Epoch 3/9`` with an epoch limit)."""

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's own method (no public hook for the description): "/{max_epochs - 1}" only
        # when there is an epoch limit, padded like the validation bar's to avoid flicker
        limit = self.trainer.max_epochs
        text = f"Epoch {current_epoch}" + (f"/{limit - 1}" if limit is not None and limit > 0 else "")
        return f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) else text
