"""Stopping a run at its first non-finite loss or gradient, and naming the layer that went bad."""
from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from spikellm.errors import SpikeLLMError, first_line


class TrainingDiverged(SpikeLLMError):
    """Training produced a non-finite loss or gradient. ``step`` is the step that diverged (as
    logged, ``trainer.global_step`` before its update), ``layer`` the first module found to go
    non-finite (or None), ``checkpoint`` the last checkpoint written before it (or None)."""

    def __init__(self, message: str, step: int, layer: str | None = None, checkpoint: str | None = None):
        super().__init__(message)
        self.step, self.layer, self.checkpoint = step, layer, checkpoint


class StopOnNonFinite(pl.Callback):
    """Stops training at the first non-finite loss or gradient, before the optimizer applies it,
    with a :class:`TrainingDiverged` error that names the step, the first layer that went bad and
    the last good checkpoint (which stays as it was: nothing is saved after the error).

    Cheap enough to leave on: the losses and the gradients are checked with one host
    synchronisation per optimizer step (the gradients by their L2 norms, one fused kernel, the one
    ``clip_grad_norm_`` runs; about 0.7 ms a step for ``model=llama_tiny`` on a CPU core); no
    hook runs in a healthy step. Only when something is non-finite does ``diagnose`` (on by default)
    run the step's batch again to name the first layer that went bad (:mod:`spikellm.training.diagnosis`).

    ``check_gradients=False`` checks the loss only. With a ``16-mixed`` gradient scaler non-finite
    gradients are expected (the scaler skips those steps), so only the loss is checked there.
    Across processes the verdict is shared, so every rank stops at the same step.
    """

    def __init__(self, check_gradients: bool = True, diagnose: bool = True):
        self.check_gradients = check_gradients
        self.diagnose = diagnose
        self._batch = None
        self._losses: list[Tensor] = []  # the losses backpropagated since the last check

    # ---- the cheap part: every step ----------------------------------------------------
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._batch = (batch, batch_idx)

    def on_before_backward(self, trainer, module, loss):
        self._losses.append(loss.detach().reshape(-1))

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = None
        if self.check_gradients and getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._check(trainer, module, grads)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self._losses:  # backpropagated, but no optimizer step yet (accumulating gradients)
            self._check(trainer, module, None)
        self._batch = None

    def _check(self, trainer, module, grads: list[Tensor] | None) -> None:
        losses, self._losses = self._losses, []
        loss_ok = torch.isfinite(torch.cat(losses)).all() if losses else None
        verdict = self._verdict(trainer, module, loss_ok, _norms_finite(grads) if grads else None)  # the one sync
        if grads and not all(grads_ok for _, grads_ok in verdict):
            # an L2 norm overflows on huge finite gradients too (|g| > 1e19): confirm element by element
            exact = self._verdict(trainer, module, None, _elements_finite(grads))
            verdict = [[loss_ok, grads_ok] for (loss_ok, _), (_, grads_ok) in zip(verdict, exact)]
        if not all(all(rank) for rank in verdict):
            self._stop(trainer, module, torch.cat(losses) if losses else None, verdict)

    @staticmethod
    def _verdict(trainer, module, loss_ok: Tensor | None, grads_ok: Tensor | None) -> list[list[int]]:
        """``[[loss finite, gradients finite]]`` per rank, 1 or 0, each rank's from its own flags."""
        true = torch.ones((), dtype=torch.bool, device=module.device)
        flags = torch.stack([true if f is None else f.to(module.device) for f in (loss_ok, grads_ok)]).int()
        if trainer.world_size > 1:  # every rank must stop at the same step, or the others wait forever
            flags = trainer.strategy.all_gather(flags)
        return flags.reshape(-1, 2).tolist()

    # ---- only once something is non-finite -------------------------------------------
    def _stop(self, trainer, module, loss: Tensor | None, verdict: list[list[int]]) -> None:
        from spikellm.training.diagnosis import locate, nonfinite_state

        step = trainer.global_step
        bad_loss = [rank for rank, (loss_ok, _) in enumerate(verdict) if not loss_ok]
        if bad_loss:
            kind = nonfinite_state([loss]) if loss is not None else None
            what = "non-finite loss" + (f" ({kind})" if kind else "")
            if len(verdict) > 1:
                what += " on rank " + ", ".join(map(str, bad_loss))
        else:
            what = "non-finite gradients"
        found, layer = None, None
        if self.diagnose and self._batch is not None:
            try:
                found, layer = locate(trainer, module, *self._batch, gradients=not bad_loss)
            except Exception as error:  # the diagnosis must never hide the divergence itself
                found = (f"could not re-run the batch to find the layer "
                         f"({type(error).__name__}: {first_line(error, empty='')})")
        checkpoint, checkpoint_text = _last_good_checkpoint(trainer)
        for callback in trainer.checkpoint_callbacks:  # a diverged state is not worth saving
            if hasattr(callback, "save_on_exception"):
                callback.save_on_exception = False
        lr = (getattr(module, "hparams", None) or {}).get("lr")
        if lr is None and trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0].get("lr")
        advice = f"lower task.lr (it is {lr:.3g})" if isinstance(lr, (int, float)) else "lower task.lr"
        advice += " or raise task.warmup_steps, and keep trainer.gradient_clip_val set"
        rank = f" (rank {trainer.global_rank})" if len(verdict) > 1 else ""
        parts = [f"training diverged at step {step}{rank}: {what}"]
        if found:
            parts.append(found)
        parts += [f"the last good checkpoint is {checkpoint_text}", advice]
        raise TrainingDiverged("; ".join(parts).replace("\n", " "), step, layer, checkpoint)


def _by_device(tensors) -> dict:
    groups: dict = {}
    for t in tensors:
        if not t.is_sparse:
            groups.setdefault(t.device, []).append(t)
    return groups


def _norms_finite(grads: list[Tensor]) -> Tensor:
    """Whether every gradient's L2 norm is finite: false for any NaN/inf element (and for finite
    ones above ~1e19, which :func:`_elements_finite` then clears). A fused kernel per device, the
    one ``clip_grad_norm_`` runs; no synchronisation."""
    flags = [torch.isfinite(torch.stack(torch._foreach_norm(group, 2))).all()
             for group in _by_device(grads).values()]
    return torch.stack([f.to(flags[0].device) for f in flags]).all() if flags else torch.ones((), dtype=torch.bool)


def _elements_finite(grads: list[Tensor]) -> Tensor:
    flags = [torch.isfinite(g).all() for g in grads if not g.is_sparse]
    return torch.stack([f.to(flags[0].device) for f in flags]).all() if flags else torch.ones((), dtype=torch.bool)


def _last_good_checkpoint(trainer) -> tuple[str | None, str]:
    """The checkpoint written last in this run: (path, text for the message)."""
    import os

    written = {}
    for callback in trainer.checkpoint_callbacks:
        for path in (getattr(callback, "_last_checkpoint_saved", ""), getattr(callback, "last_model_path", ""),
                     getattr(callback, "best_model_path", "")):
            if path and os.path.isfile(path):
                written[path] = getattr(callback, "_last_global_step_saved", None)
    if written:  # the newest; of equally new ones, last.ckpt, the one a resume would name
        path = max(written, key=lambda p: (os.path.getmtime(p), os.path.basename(p).startswith("last")))
        step = written[path]
        return path, path + (f" (step {step})" if isinstance(step, int) and step >= 0 else "")
    if trainer.ckpt_path:
        return None, f"none written yet (the run resumed from {trainer.ckpt_path})"
    return None, "none written yet"
