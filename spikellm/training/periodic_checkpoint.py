"""``last.ckpt`` every few training steps, mid-epoch too (written atomically by
:class:`spikellm.checkpoints.lightning.AtomicCheckpointIO`)."""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint(save_top_k=0, save_last=True, every_n_train_steps=n)``: ``last.ckpt``
    every ``n`` training steps, except that on a step that validates it saves after the
    validation. A checkpoint from between that step and its validation would lose the validation:
    Lightning, resuming from it, skips ahead to the next step.
    """

    def __init__(self, every_n_train_steps: int, **kwargs):
        kwargs = {"save_top_k": 0, "save_last": True, "save_on_train_epoch_end": False, **kwargs}
        super().__init__(every_n_train_steps=every_n_train_steps, **kwargs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self._every_n_train_steps
        if every >= 1 and trainer.global_step % every == 0 and _validates_next(trainer):
            self._defer_save_until_validation = True  # ModelCheckpoint.on_validation_end saves then
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def _validates_next(trainer) -> bool:
    """Whether Lightning runs validation right after the current training batch (asked at its end)."""
    loop, fetcher = trainer.fit_loop.epoch_loop, trainer.fit_loop._data_fetcher
    if fetcher is None or getattr(loop, "_skip_next_val", False):
        return False
    try:
        return bool(loop._should_check_val_fx(fetcher))
    except Exception:  # noqa: BLE001  (a Lightning internal: if it changes, save now rather than never)
        return False
