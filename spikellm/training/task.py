"""The LightningModule that trains a (spiking) causal language model."""
from __future__ import annotations

import math
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from spikellm.checks import check_bool, check_float, check_int
from spikellm.config import build_model
from spikellm.errors import ConfigError
from spikellm.training.spike_loss import SpikeObjective


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over tokens (Hinton et al.; the T² keeps
    the gradient's size independent of T). Logits ``[..., vocab]``; computed in fp32."""
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``logits [B, T, vocab]`` against ``targets [B, T]``, in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class LanguageModelTask(pl.LightningModule):
    """What every causal-LM task shares: token-weighted validation perplexity, throughput
    logging, an optional spike-count term in the loss (``spike_loss``, see
    :mod:`spikellm.training.spike_loss`), and AdamW with warmup + cosine over ``hparams`` lr,
    weight_decay, betas, warmup_steps, max_steps, min_lr_ratio. A subclass sets ``self.model`` and
    :meth:`training_loss`.

    ``compile``: each block of the model compiled with ``torch.compile`` when training starts
    (:mod:`spikellm.models.execution`); ``activation_checkpointing``: each block's activations
    recomputed in backward, not kept. Neither changes the parameters or the checkpoints."""

    model: torch.nn.Module

    def __init__(self, spike_loss: dict | None = None, compile: bool = False, activation_checkpointing: bool = False):
        super().__init__()
        self._val_totals: Tensor | None = None  # [sum of token NLL, tokens] over the epoch
        self._last_step_end: float | None = None
        self.spike_objective = SpikeObjective.from_config(spike_loss)  # build() prefixes task.
        self.compile_blocks = check_bool("compile", compile)
        self.recompute_blocks = check_bool("activation_checkpointing", activation_checkpointing)
        self.step_seconds: list[float] = []  # wall time of each training step of this fit (the first compiles)

    def setup(self, stage: str) -> None:
        from spikellm.models.execution import checkpoint_blocks, compile_blocks

        if stage != "fit":
            return
        if self.recompute_blocks:
            checkpoint_blocks(self.model)
        if self.compile_blocks and not getattr(self, "_compiled", False):
            compile_blocks(self.model)
            self._compiled = True

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def _loss(self, batch) -> tuple[Tensor, int]:
        inputs, targets = batch
        logits = self(inputs)
        return next_token_loss(logits, targets), targets.numel()

    def training_loss(self, batch) -> tuple[Tensor, int]:
        return self._loss(batch)

    def on_train_start(self):
        self.spike_objective.attach(self.model)

    def on_train_end(self):
        SpikeObjective().attach(self.model)  # stop recording

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, tokens = self.training_loss(batch)
        # the mean over every rank's batch: each rank has data.batch_size sequences of the same
        # length (full batches only), so the mean of the ranks' means is the global batch's mean
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        spike = self.spike_objective.collect(self.model) if self.spike_objective.enabled else None
        if spike is not None:  # logged beside the task loss, which train/loss stays
            spike_loss, spikes_per_activation, nonzero_fraction = spike
            self.log("train/spike_loss", spike_loss.detach(), sync_dist=True)
            self.log("train/spikes_per_activation", spikes_per_activation, prog_bar=True, sync_dist=True)
            if nonzero_fraction is not None:
                self.log("train/nonzero_fraction", nonzero_fraction, prog_bar=True, sync_dist=True)
            loss = loss + spike_loss
        now = time.perf_counter()
        if self._last_step_end is not None:  # wall time of a whole step: data, forward, backward, update
            # tokens per second of all ranks together
            self.log("train/tok_s", float(tokens) / (now - self._last_step_end), prog_bar=True,
                     sync_dist=True, reduce_fx="sum")
        self._last_step_end = now
        return loss

    def on_train_batch_start(self, batch, batch_idx: int):
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int):
        # forward, backward and optimizer step (Lightning calls this hook after the update)
        self.step_seconds.append(time.perf_counter() - self._batch_start)

    def on_train_epoch_start(self):
        self._last_step_end = None

    def on_validation_epoch_start(self):
        self._val_totals = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx: int):
        loss, tokens = self._loss(batch)
        # token-weighted, so a last short batch counts for its tokens, not as a whole batch
        self._val_totals = self._val_totals + torch.stack([loss.double() * tokens, loss.new_tensor(tokens).double()])

    def on_validation_epoch_end(self):
        totals = self.trainer.strategy.reduce(self._val_totals, reduce_op="sum")
        nll = (totals[0] / totals[1]).float()
        # already the same on every rank (reduced above); sync_dist only tells Lightning so
        self.log("val/loss", nll, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(nll), prog_bar=True, sync_dist=True)
        self._last_step_end = None  # validation time is not training throughput

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clipping by norm under FSDP (``trainer=fsdp``): the gradients are sharded, so the global
        norm needs FSDP's own ``clip_grad_norm_`` (Lightning refuses norm clipping there)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.strategy.model
        if gradient_clip_val and isinstance(root, FullyShardedDataParallel) \
                and (gradient_clip_algorithm or "norm") == "norm":
            root.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, hp.max_steps, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class CausalLMTask(LanguageModelTask):
    """Next-token cross-entropy with AdamW and warmup + cosine.

    ``model`` and ``neuron`` are the config groups as plain dicts (``_target_`` inside), so a
    checkpoint carries everything needed to rebuild the model. Load one with
    :func:`spikellm.checkpoints.load_model`, which refuses ``_target_`` values outside
    spikellm before building anything (``load_from_checkpoint`` would build whatever it names).
    """

    def __init__(self, model: dict, neuron: dict | None = None, lr: float = 3e-3,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 30, min_lr_ratio: float = 0.1, max_steps: int = 1000,
                 spike_loss: dict | None = None, compile: bool = False, activation_checkpointing: bool = False,
                 distill: dict | None = None):
        super().__init__(spike_loss, compile, activation_checkpointing)
        check_optimizer(lr, weight_decay, betas, warmup_steps, min_lr_ratio, max_steps)
        self.save_hyperparameters()
        self.model = build_model(model, neuron)
        self._teacher = _teacher(distill)  # a tuple: not a submodule, not saved, not trained
        theirs = [t.config.vocab_size for t in self._teacher if hasattr(t, "config")]
        if theirs and theirs[0] != self.model.config.vocab_size:
            raise ConfigError("distill.teacher", distill["teacher"], f"has a {theirs[0]}-token vocabulary and the "
                              f"model {self.model.config.vocab_size}: the teacher must share the tokenizer")

    def on_fit_start(self):
        for teacher in self._teacher:
            teacher.to(self.device)

    def training_loss(self, batch) -> tuple[Tensor, int]:
        """Next-token cross-entropy, plus ``distill.weight`` times the KL to the teacher's
        distributions when a teacher is given (``task.distill.teacher``)."""
        if not self._teacher:
            return self._loss(batch)
        inputs, targets = batch
        logits = self(inputs)
        with torch.no_grad():
            teacher_logits = self._teacher[0](inputs)
        options = self.hparams.distill
        kl = distillation_loss(logits, teacher_logits, options.get("temperature", 1.0))
        self.log("train/kl", kl.detach())
        loss = next_token_loss(logits, targets)
        return loss + options.get("weight", 1.0) * kl, targets.numel()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from spikellm.checkpoints.lightning import HPARAMS_DIGEST, model_digest

        # eval.py rebuilds the model from these hyper-parameters: an edit that keeps every shape
        # (max_seq_len, n_heads) would load and compute something else
        checkpoint[HPARAMS_DIGEST] = model_digest(self.hparams["model"], self.hparams.get("neuron"))


def _teacher(distill: dict | None) -> tuple:
    """``(teacher,)`` for ``distill = {teacher: <model file>, weight, temperature}``, or ``()``: any
    model file :func:`~spikellm.checkpoints.load_model` reads (a dense train.py run's checkpoint,
    a Hugging Face directory), frozen, in eval mode, in fp32."""
    options = dict(distill or {})
    unknown = sorted(set(options) - {"teacher", "weight", "temperature"})
    if unknown:
        raise ConfigError(f"distill.{unknown[0]}", options[unknown[0]], "unknown option; distill takes teacher, "
                                                                        "weight and temperature")
    check_float("distill.weight", options.get("weight", 1.0), 0.0, 1e6)
    check_float("distill.temperature", options.get("temperature", 1.0), 0.0, 100.0, low_open=True)
    if not options.get("teacher") or not options.get("weight", 1.0):
        return ()
    from spikellm.checkpoints import load_model

    teacher = load_model(options["teacher"], key="task.distill.teacher", dtype="float32").model
    return (teacher.eval().requires_grad_(False),)


def check_optimizer(lr, weight_decay, betas, warmup_steps, min_lr_ratio, max_steps) -> None:
    """The optimizer settings as one-line errors (``task.lr=nan`` would train to NaN, ``task.lr=abc``
    would fail inside AdamW with a traceback); :func:`~spikellm.config.build` prefixes ``task.``."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ConfigError("lr", lr, "must be a finite number > 0")
    check_float("weight_decay", weight_decay, 0.0, 10.0)
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise ConfigError("betas", list(betas) if isinstance(betas, (list, tuple)) else betas,
                          "must be two numbers in [0, 1) (AdamW's moment decays), e.g. [0.9, 0.95]")
    check_int("warmup_steps", warmup_steps, 0)
    check_float("min_lr_ratio", min_lr_ratio, 0.0, 1.0)
    check_int("max_steps", max_steps, 1)
