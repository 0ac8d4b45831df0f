"""QAT of a converted model with knowledge distillation from its floating-point teacher."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from spikellm.checks import check_float
from spikellm.models.hf import causal_lm_logits
from spikellm.training.task import LanguageModelTask, distillation_loss, next_token_loss


class DistillationTask(LanguageModelTask):
    """Trains ``student`` (a spiking model) to match ``teacher``'s next-token distributions.

    Loss: :func:`distillation_loss` plus ``ce_weight`` times the next-token cross-entropy. The
    teacher is frozen, in eval mode, and not part of the checkpoint (it is not a submodule); it
    follows the student to its device. Validation reports the student's perplexity.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, lr: float = 1e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 10, min_lr_ratio: float = 0.1,
                 max_steps: int = 100, temperature: float = 1.0, ce_weight: float = 0.0,
                 spike_loss: dict | None = None):
        super().__init__(spike_loss)
        check_float("temperature", temperature, 0.0, 100.0, low_open=True)
        check_float("ce_weight", ce_weight, 0.0, 100.0)
        self.save_hyperparameters(ignore=["student", "teacher"])
        self.model = student
        teacher.eval().requires_grad_(False)
        self._teacher = (teacher,)  # a tuple: not registered, not saved, not trained

    def forward(self, input_ids: Tensor) -> Tensor:
        return causal_lm_logits(self.model, input_ids)

    def on_fit_start(self):
        self._teacher[0].to(self.device)

    def on_validation_start(self):
        self._teacher[0].to(self.device)

    def training_loss(self, batch) -> tuple[Tensor, int]:
        inputs, targets = batch
        logits = self(inputs)
        with torch.no_grad():
            teacher_logits = causal_lm_logits(self._teacher[0], inputs)
        loss = distillation_loss(logits, teacher_logits, self.hparams.temperature)
        if self.hparams.ce_weight:
            loss = loss + self.hparams.ce_weight * next_token_loss(logits, targets)
        self.log("train/kl", loss.detach())
        return loss, targets.numel()
