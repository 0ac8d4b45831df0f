"""The steps of a conversion, each a small object built from ``convert.stages.<name>`` (``_target_``)
and called in order on a :class:`ConversionContext`; each returns a dict for the summary and the
model's ``spikellm.json``."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor, nn

from spikellm.checks import check_float, check_int
from spikellm.models.hf import causal_lm_logits

log = logging.getLogger(__name__)


@dataclass
class ConversionContext:
    """What the stages share: the spikified model (changed in place), calibration token ids
    ``[N, T]``, the data module, the frozen floating-point teacher, and the run's config."""

    model: nn.Module
    calibration: Tensor
    datamodule: Any = None
    teacher: nn.Module | None = None
    cfg: Any = None
    output_dir: Path | None = None
    thresholds: dict[str, float] = field(default_factory=dict)  # activation thresholds to save
    state: Any = None  # the ConversionState of the run (resume), or None
    stage: str = ""  # the name of the stage running

    def batches(self, limit: int | None = None, batch_size: int = 1) -> list[Tensor]:
        samples = self.calibration if limit is None else self.calibration[:limit]
        return list(samples.split(batch_size))

    def block_resume(self):
        """Where the running block-by-block stage starts, from the saved state, and the callback
        that saves each block it finishes (:class:`~spikellm.posttrain.sequential.BlockResume`)."""
        from spikellm.posttrain.blocks import BlockResume

        if self.state is None:
            return BlockResume()
        infos = self.state.block_infos(self.stage)
        stage = self.stage
        return BlockResume(start=(max(infos) + 1) if infos else 0, hidden=self.state.hidden(stage), infos=infos,
                           done=lambda index, block, hidden, info: self.state.save_block(stage, index, block, hidden,
                                                                                       info))

    def forwards(self, description: str, passes: int):
        """A context for stages that run the whole model ``passes`` times: each block computes in
        fp32 (a bf16 store), and a bar advances per block."""
        from contextlib import ExitStack

        from spikellm.models.spikify import decoder_blocks
        from spikellm.nn.storage import compute_in
        from spikellm.progress import per_block, progress_bar

        blocks = decoder_blocks(self.model)
        stack = ExitStack()
        stack.enter_context(compute_in(self.model, blocks))
        advance = stack.enter_context(progress_bar(description, passes * len(blocks)))
        stack.enter_context(per_block(blocks, advance))
        return stack


class OptimalBrainSpiking:
    """SpikeLLM's saliency-based step allocation on the calibration set: the top ``1 - low_p``
    input channels of every projection get ``2^addbit`` times the steps; with ``separate`` they and
    the other channels take their per-token step bounds apart (SpikeLLM's per-cluster range)."""

    def __init__(self, low_p: float = 0.9, addbit: int = 1, separate: bool = True, samples: int | None = None,
                 batch_size: int = 1):
        self.separate = bool(separate)
        self.low_p = check_float("low_p", low_p, 0.0, 1.0)
        self.addbit = check_int("addbit", addbit, 0, 8)
        self.samples = None if samples is None else check_int("samples", samples, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)

    def __call__(self, ctx: ConversionContext) -> dict:
        from spikellm.neurons.saliency import allocate_steps, average_steps

        batches = ctx.batches(self.samples, self.batch_size)
        with ctx.forwards(f"Optimal Brain Spiking, {len(batches)} batches", len(batches)):
            masks = allocate_steps(ctx.model, batches, self.low_p, self.addbit, forward=causal_lm_logits,
                                   separate=self.separate)
        steps = average_steps(ctx.model)
        log.info("Optimal Brain Spiking: %d layers, %.2f steps per channel on average", len(masks), steps)
        return {"layers": len(masks), "average_steps": steps}


class BlockCalibration:
    """OmniQuant-style block-wise calibration (LWC + LET, AdamW, MSE to the FP block), folded in."""

    needs_grad = True

    def __init__(self, epochs: int = 20, lwc_lr: float = 1e-2, let_lr: float = 5e-3, lwc: bool = True,
                 let: bool = True, alpha: float = 0.5, batch_size: int = 1):
        self.options = dict(epochs=check_int("epochs", epochs, 0), lwc_lr=check_float("lwc_lr", lwc_lr, 0.0, 1.0),
                            let_lr=check_float("let_lr", let_lr, 0.0, 1.0), lwc=bool(lwc), let=bool(let),
                            alpha=check_float("alpha", alpha, 0.0, 1.0), batch_size=check_int("batch_size", batch_size, 1))

    def __call__(self, ctx: ConversionContext) -> dict:
        from spikellm.posttrain.omniquant import block_calibration

        results = block_calibration(ctx.model, ctx.calibration, seed=int(ctx.cfg.seed) if ctx.cfg else 0,
                                    resume=ctx.block_resume(), **self.options)
        return {"blocks": len(results),
                "mse_before": [round(r.initial_mse, 6) for r in results],
                "mse_after": [round(r.final_mse, 6) for r in results]}


class GPTQ:
    """GPTQ of every projection, block after block, onto ``grid`` (or each layer's own quantizer)."""

    def __init__(self, grid=None, block_size: int = 128, percdamp: float = 0.01, act_order: bool = True,
                 batch_size: int = 1):
        self.grid = grid
        self.options = dict(block_size=check_int("block_size", block_size, 1),
                            percdamp=check_float("percdamp", percdamp, 0.0, 1.0), act_order=bool(act_order),
                            batch_size=check_int("batch_size", batch_size, 1))

    def __call__(self, ctx: ConversionContext) -> dict:
        from spikellm.posttrain.sequential import gptq_model

        resume = ctx.block_resume()
        errors = gptq_model(ctx.model, ctx.calibration, self.grid, **self.options, resume=resume)
        blocks = resume.infos.values()
        seconds = {key: round(sum(info[key] for info in blocks), 2) for key in ("forward_s", "hessian_s", "quantize_s")}
        return {"layers": len(errors), "mean_relative_error": sum(errors.values()) / len(errors),
                "grid": repr(self.grid) if self.grid is not None else "neuron.weight_quantizer",
                "hessians_per_block": max((info["hessians"] for info in blocks), default=0), **seconds,
                "per_block": [{key: info[key] for key in ("forward_s", "hessian_s", "quantize_s")} for _, info in
                              sorted(resume.infos.items())],
                # what GPTQ costs against the two forward passes per block it needs
                "time_over_forward": round(sum(seconds.values()) / max(seconds["forward_s"], 1e-9), 3)}


class Sparsify:
    """Training-free activation thresholds (arXiv 2501.16337) on every linear-layer input of the
    blocks, calibrated in network order on the first ``samples`` calibration sequences."""

    def __init__(self, tolerance: float = 1.0005, keep: Sequence[float] | None = None, samples: int = 8,
                 batch_size: int = 1, target: float | None = None):
        from spikellm.sparsity import DEFAULT_KEEP, check_keep

        self.tolerance = check_float("tolerance", tolerance, 1.0, 10.0)
        self.keep = check_keep(DEFAULT_KEEP if keep is None else keep)
        self.samples = check_int("samples", samples, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.target = None if target is None else check_float("target", target, 0.0, 1.0)

    def __call__(self, ctx: ConversionContext) -> dict:
        from spikellm.models.spikify import projection_names
        from spikellm.sparsity import calibrate_thresholds, calibration_loss, sparsity_report

        from spikellm.models.spikify import decoder_blocks
        from spikellm.nn.storage import compute_in

        batches = ctx.batches(self.samples, self.batch_size)
        # a model of our own names its projections; a Hugging Face one by its architecture's layout
        names = list(ctx.model.spiking_linears()) if hasattr(ctx.model, "spiking_linears") else projection_names(ctx.model)
        with compute_in(ctx.model, decoder_blocks(ctx.model)):
            dense_loss = calibration_loss(ctx.model, batches)
            chosen = calibrate_thresholds(ctx.model, batches, keep=self.keep, tolerance=self.tolerance, names=names)
            report = sparsity_report(ctx.model)
            final_loss = calibration_loss(ctx.model, batches)
        ctx.thresholds = {name: info["threshold"] for name, info in chosen.items()}
        bound = self.tolerance ** len(names)
        summary = {"weighted_sparsity": report["weighted_sparsity"], "dense_loss": dense_loss,
                   "final_loss": final_loss, "loss_ratio": final_loss / dense_loss, "loss_bound": bound,
                   "bound_respected": final_loss <= bound * dense_loss * (1 + 1e-9)}
        if self.target is not None:
            summary.update(target=self.target, target_met=report["weighted_sparsity"] >= self.target)
        log.info("sparsity: %.1f%% of the MACs skipped at loss ratio %.5f (bound %.5f)",
                 100 * report["weighted_sparsity"], summary["loss_ratio"], bound)
        return summary


class DistillationQAT:
    """QAT of the converted model against the FP teacher's logits (KL), on the data group's
    training batches, with the run's trainer settings and ``max_steps`` of its own; ``spike_loss``
    adds the spike-count objective (:mod:`spikellm.training.spike_loss`) as in train.py."""

    needs_teacher = True

    def __init__(self, max_steps: int = 200, lr: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 10,
                 temperature: float = 1.0, ce_weight: float = 0.0, spike_loss: dict | None = None):
        from spikellm.training.spike_loss import SpikeObjective

        self.max_steps = check_int("max_steps", max_steps, 1)
        SpikeObjective.from_config(spike_loss)  # refused here, before any work (build() prefixes the stage's key)
        self.options = dict(lr=check_float("lr", lr, 0.0, 1.0, low_open=True),
                            weight_decay=check_float("weight_decay", weight_decay, 0.0, 10.0),
                            warmup_steps=check_int("warmup_steps", warmup_steps, 0),
                            temperature=check_float("temperature", temperature, 0.0, 100.0, low_open=True),
                            ce_weight=check_float("ce_weight", ce_weight, 0.0, 100.0),
                            spike_loss=dict(spike_loss) if spike_loss else None)

    def __call__(self, ctx: ConversionContext) -> dict:
        import lightning.pytorch as pl

        from spikellm.config import build
        from spikellm.posttrain.distill import DistillationTask

        task = DistillationTask(ctx.model, ctx.teacher, max_steps=self.max_steps, **self.options)
        loggers = [build(node, f"logger.{name}") for name, node in (ctx.cfg.get("logger") or {}).items()]
        trainer = build(ctx.cfg.trainer, "trainer", max_steps=self.max_steps, logger=loggers or False,
                        callbacks=[pl.callbacks.RichProgressBar()], enable_checkpointing=False)
        ctx.model.train()
        trainer.fit(task, datamodule=ctx.datamodule, weights_only=True)
        ctx.model.eval()
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        return {"steps": trainer.global_step, **metrics}
