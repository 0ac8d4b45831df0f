"""The main job: validate the whole config, train, validate, checkpoint, summarise.

``train.py`` composes the config with Hydra and calls :func:`run_training`; everything that can be
checked is checked before the first training step, and a user-fixable problem is raised as a
:class:`~spikellm.errors.SpikeLLMError` whose message is the one line the user sees.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from spikellm.checks import check_int
from spikellm.config import build, build_attention_encoder, build_neuron
from spikellm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced (also what the summary prints)."""

    output_dir: Path
    checkpoint: Path
    steps: int
    tokens_seen: int
    seconds: float
    val_loss: float
    val_ppl: float
    initial_val_ppl: float | None = None
    firing_rate: float | None = None  # spikes per neuron per time step, validation, all layers
    spikes_per_activation: float | None = None
    energy: object | None = None  # the EnergyReport of the final validation, when counted
    energy_files: dict = field(default_factory=dict)
    log_dirs: list[Path] = field(default_factory=list)
    spiking_checkpoint: Path | None = None  # packed weights + encoders + model card, for inference


def _check_cross_group(cfg: DictConfig, model_config) -> None:
    check_int("trainer.max_steps", cfg.trainer.get("max_steps"), 1)
    block = cfg.data.get("block_size")
    if isinstance(block, int) and block > model_config.max_seq_len:
        raise ConfigError("data.block_size", block,
                          f"exceeds model.max_seq_len={model_config.max_seq_len}; "
                          "lower data.block_size or raise model.max_seq_len")


def converts(cfg: DictConfig) -> bool:
    """Whether this run converts a pretrained model (``model=hf`` or ``model=native``) rather than training one."""
    stages = (cfg.get("convert") or {}).get("stages") or {}
    if "hf_path" in cfg.model.keys() or "checkpoint" in cfg.model.keys():
        return True
    if stages:
        raise ConfigError("model", cfg.model.get("_target_"), "conversion stages need a pretrained model: add "
                                                              "model=hf model.hf_path=<local HF directory>, or "
                                                              "model=native model.checkpoint=<spiking checkpoint>")
    return False


def prepare(cfg: DictConfig):
    """Build and validate everything a run needs, in the order cheap checks first."""
    model_config = build(cfg.model, "model")
    build_neuron(cfg.neuron)  # fails here, before any data work, on a bad encoder parameter
    build_attention_encoder(cfg.neuron)
    if hasattr(model_config, "check_neuron"):  # an architecture that refuses some neuron groups
        model_config.check_neuron(cfg.neuron)
    _check_cross_group(cfg, model_config)
    datamodule = build(cfg.data, "data")
    datamodule.setup("fit")
    if datamodule.vocab_size > model_config.vocab_size:
        raise ConfigError("model.vocab_size", model_config.vocab_size,
                          f"smaller than the tokenizer's {datamodule.vocab_size} tokens; raise it")
    # not recursive: the task receives model/neuron as plain dicts and builds them itself, so
    # they are saved in its checkpoint's hyperparameters
    task = build(cfg.task, "task", _recursive_=False, _convert_="all", model=OmegaConf.to_container(cfg.model, resolve=True),
                 neuron=OmegaConf.to_container(cfg.neuron, resolve=True),
                 max_steps=cfg.trainer.max_steps)
    return datamodule, task


def run_training(cfg: DictConfig) -> TrainResult:
    """Train ``cfg.model`` with ``cfg.neuron`` on ``cfg.data``; see the module docstring."""
    import lightning.pytorch as pl

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, task = prepare(cfg)
    output_dir = Path(cfg.paths.output_dir)
    callbacks = [build(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items()]
    loggers = [build(node, f"logger.{name}") for name, node in (cfg.get("logger") or {}).items()]
    if not loggers:  # logger=none: a learning-rate monitor would have nowhere to write, and Lightning refuses it
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)

    start = time.perf_counter()
    initial_ppl = None
    if cfg.get("ckpt_path") is None and cfg.get("validate_at_start", True):
        initial_ppl = trainer.validate(task, datamodule=datamodule, verbose=False)[0]["val/ppl"]
    if cfg.get("ckpt_path") is None:  # a resumed run has its allocation in the checkpoint
        allocate_salient_channels(task.model, cfg.neuron.get("allocation"), datamodule)
    # weights_only: a checkpoint is data, never code to run (plain dicts in hparams make it loadable)
    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    final = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    from spikellm.training.callbacks import EnergyReport

    energy = next((c for c in callbacks if isinstance(c, EnergyReport)), None)
    checkpoint = output_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(checkpoint, weights_only=False)  # full state: resumable
    spiking = save_final_checkpoint(cfg, task, datamodule, final, energy, output_dir / "spiking_checkpoint")
    tokens_per_step = datamodule.hparams.block_size * datamodule.hparams.batch_size
    return TrainResult(
        output_dir=output_dir, checkpoint=checkpoint, steps=trainer.global_step,
        tokens_seen=trainer.global_step * tokens_per_step, seconds=time.perf_counter() - start,
        val_loss=float(final["val/loss"]), val_ppl=float(final["val/ppl"]),
        initial_val_ppl=None if initial_ppl is None else float(initial_ppl),
        firing_rate=_maybe_float(final.get("val/spikes/firing_rate")),
        spikes_per_activation=_maybe_float(final.get("val/spikes/spikes_per_activation")),
        energy=energy.report if energy else None, energy_files=dict(energy.files) if energy else {},
        log_dirs=[Path(lg.log_dir) for lg in trainer.loggers if getattr(lg, "log_dir", None)],
        spiking_checkpoint=spiking,
    )


def save_final_checkpoint(cfg: DictConfig, task, datamodule, final: dict, energy, directory: Path) -> Path:
    """The run's spiking checkpoint (:mod:`spikellm.checkpoint`), its card carrying the final
    validation and energy figures; replaced atomically if the run directory already has one."""
    from spikellm.checkpoint import save_spiking_checkpoint

    card = {"val ppl": round(float(final["val/ppl"]), 4), "val loss": round(float(final["val/loss"]), 6),
            "data": cfg.data.get("source"), "steps": int(task.global_step)}
    if energy is not None and energy.report is not None:
        card["energy per token (J)"] = energy.report.per_token(energy.report.joules)
        card["energy vs dense"] = round(energy.report.ratio_to_dense, 4)
    return save_spiking_checkpoint(task.model, directory, model_config=task.hparams.model, neuron=task.hparams.neuron,
                                   tokenizer=datamodule.tokenizer, card=card,
                                   cost_model=energy.report.cost.name if energy is not None and energy.report else None,
                                   overwrite=True)


def _maybe_float(value) -> float | None:
    return None if value is None else float(value)


def allocate_salient_channels(model, allocation, datamodule) -> None:
    """Optimal Brain Spiking before training, when the neuron group asks for it
    (``allocation: {low_p, addbit, batches}``): saliency over that many training batches."""
    if not allocation:
        return
    import itertools

    from spikellm.neurons.saliency import allocate_steps, average_steps

    batches = check_int("neuron.allocation.batches", allocation.get("batches", 8), 1)
    allocate_steps(model, itertools.islice(datamodule.train_dataloader(), batches),
                   low_p=allocation.get("low_p", 0.9), addbit=allocation.get("addbit", 1),
                   separate=bool(allocation.get("separate", False)))
    log.info("Optimal Brain Spiking: %.2f steps per channel on average", average_steps(model))


def print_summary(result: TrainResult, title: str = "spikellm: training done") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # paths are long; wrap them, never cut them
    if result.initial_val_ppl is not None:
        table.add_row("val ppl at step 0", f"{result.initial_val_ppl:,.2f}")
    table.add_row("val loss", f"{result.val_loss:.4f}")
    table.add_row("val ppl", f"{result.val_ppl:,.2f}" if math.isfinite(result.val_ppl) else "inf")
    if result.firing_rate is not None:
        table.add_row("spikes / activation", f"{result.spikes_per_activation:.3f}")
        table.add_row("firing rate", f"{result.firing_rate:.2%} of neuron-steps")
    table.add_row("steps / tokens", f"{result.steps} / {result.tokens_seen:,}")
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("checkpoint", str(result.checkpoint))
    if result.spiking_checkpoint is not None:
        table.add_row("spiking checkpoint", str(result.spiking_checkpoint))
    for log_dir in result.log_dirs:
        table.add_row("logs", str(log_dir))
    if result.energy is not None:
        from spikellm.energy.report import joules_text

        table.add_row("energy / token", f"{joules_text(result.energy.per_token(result.energy.joules))} "
                                        f"({result.energy.ratio_to_dense:.3f}× dense, {result.energy.cost.name})")
        for kind, path in result.energy_files.items():
            table.add_row(f"energy {kind}", path)
    console = Console()
    if result.energy is not None:
        console.print(result.energy.rich_table("energy of the final validation"))
    console.print(table)
