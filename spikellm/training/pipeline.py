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
from spikellm.training.resume import (check_same_model, read_resume_checkpoint, refuse_overwrite, resolve_ckpt_path,
                                      run_directory_lock)
from spikellm.io import check_writable

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
    rank: int = 0  # the process's global rank: only rank 0 prints the summary
    first_step_seconds: float | None = None  # includes compiling, with task.compile
    step_seconds: float | None = None  # median wall time of the later training steps
    compiled: bool = False  # task.compile: the blocks ran compiled
    data: dict = field(default_factory=dict)  # per split: tokens and where they came from


def _check_cross_group(cfg: DictConfig, model_config) -> None:
    check_int("trainer.max_steps", cfg.trainer.get("max_steps"), 1)
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not _cuda_available():
        raise ConfigError("trainer.accelerator", accelerator, "no CUDA GPU is visible on this machine; add "
                                                              "trainer.accelerator=cpu (trainer=ddp runs one CPU "
                                                              "process per trainer.devices) or use trainer=cpu")
    interval = cfg.trainer.get("val_check_interval")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, (int, float))
                                 or interval <= 0 or (isinstance(interval, float) and interval > 1)):
        raise ConfigError("trainer.val_check_interval", interval, "must be a number of steps >= 1 (an integer) or a "
                                                                  "fraction of an epoch in (0, 1]")
    block = cfg.data.get("block_size")
    if isinstance(block, int) and block > model_config.max_seq_len:
        raise ConfigError("data.block_size", block,
                          f"exceeds model.max_seq_len={model_config.max_seq_len}; "
                          "lower data.block_size or raise model.max_seq_len")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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
    from spikellm.training.spike_loss import SpikeObjective

    SpikeObjective.from_config(cfg.task.get("spike_loss"), "task.spike_loss")  # before the data, not after it
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
    """Train ``cfg.model`` with ``cfg.neuron`` on ``cfg.data``; see the module docstring.

    ``ckpt_path`` resumes: ``last`` is ``<paths.output_dir>/checkpoints/last.ckpt`` (rerun with
    ``hydra.run.dir=<the interrupted run's directory> ckpt_path=last``), or a path to a ``.ckpt``.
    The checkpoint is checked before any training (readable, resumable, the same model, neuron and
    tokenizer), and the run continues it exactly: weights, optimizer, schedule, step and the place
    in the data. A run never overwrites another run's ``last.ckpt``; its CSV logs go to a fresh
    directory when the run directory already has some (``csv/attempt-2`` ...).
    """
    output_dir = Path(cfg.paths.output_dir)
    check_writable(output_dir)  # a read-only or full disk fails now, not after the training
    with run_directory_lock(output_dir):
        return _run_training(cfg, output_dir)


def _run_training(cfg: DictConfig, output_dir: Path) -> TrainResult:
    import warnings

    import lightning.pytorch as pl

    from spikellm.io import remove_stale_temporaries
    from spikellm.checkpoints.lightning import AtomicCheckpointIO

    remove_stale_temporaries(output_dir / "checkpoints")  # halves of saves a kill cut short
    _refuse_spawn(cfg)
    ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    resume = read_resume_checkpoint(ckpt) if ckpt is not None else None
    if resume is not None:
        check_same_model(resume, cfg, ckpt)
    refuse_overwrite(output_dir, ckpt)

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, task = prepare(cfg)
    # a checkpoint with the data's place restores it exactly (TextDataModule.state_dict)
    data_position = resume is not None and "train_position" in resume["data"]
    if resume is not None and hasattr(datamodule, "check_resumable"):
        datamodule.check_resumable(resume["data"], source=f"ckpt_path={ckpt}")
        if not data_position:
            log.warning("%s does not record its place in the data (an older checkpoint): the interrupted epoch "
                        "starts over with its first batch", ckpt)
    del resume  # the tokenizer and hyperparameters only; Lightning reads the checkpoint itself
    callbacks = [build(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items()]
    loggers = [_build_logger(node, name) for name, node in (cfg.get("logger") or {}).items()]
    if not loggers:  # logger=none: a learning-rate monitor would have nowhere to write, and Lightning refuses it
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    # atomic checkpoint saves (a user's own trainer.plugins are kept as they are)
    plugins = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
    trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False, **plugins)

    start = time.perf_counter()
    initial_ppl = None
    if ckpt is None and cfg.get("validate_at_start", True):
        initial_ppl = trainer.validate(task, datamodule=datamodule, verbose=False)[0]["val/ppl"]
    if ckpt is None:  # a resumed run has its allocation in the checkpoint
        allocate_salient_channels(task.model, cfg.neuron.get("allocation"), datamodule)
    with warnings.catch_warnings():
        if data_position:  # Lightning, looking at the loader alone, cannot see that the data module resumes
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        if ckpt is not None and ckpt.parent.resolve() == (output_dir / "checkpoints").resolve():
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")  # ours
        # weights_only: a checkpoint is data, never code to run (plain dicts in hparams make it loadable)
        trainer.fit(task, datamodule=datamodule, ckpt_path=None if ckpt is None else str(ckpt), weights_only=True)
    final = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    from spikellm.training.callbacks import EnergyReport

    energy = next((c for c in callbacks if isinstance(c, EnergyReport)), None)
    checkpoint = output_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(checkpoint, weights_only=False)  # full state: resumable (collective, rank 0 writes)
    with _full_parameters(trainer):  # every rank enters (FSDP gathers); only rank 0 writes
        spiking = (save_final_checkpoint(cfg, task, datamodule, final, energy, output_dir / "spiking_checkpoint")
                   if trainer.is_global_zero else None)
    # data.batch_size is per process: an optimizer step trains on world_size x accumulated batches of them
    tokens_per_step = (datamodule.hparams.block_size * datamodule.hparams.batch_size * trainer.world_size
                       * trainer.accumulate_grad_batches)
    result = TrainResult(
        output_dir=output_dir, checkpoint=checkpoint, steps=trainer.global_step,
        tokens_seen=trainer.global_step * tokens_per_step, seconds=time.perf_counter() - start,
        val_loss=float(final["val/loss"]), val_ppl=float(final["val/ppl"]),
        initial_val_ppl=None if initial_ppl is None else float(initial_ppl),
        firing_rate=_maybe_float(final.get("val/spikes/firing_rate")),
        spikes_per_activation=_maybe_float(final.get("val/spikes/spikes_per_activation")),
        energy=energy.report if energy else None, energy_files=dict(energy.files) if energy else {},
        log_dirs=[Path(lg.log_dir) for lg in trainer.loggers if getattr(lg, "log_dir", None)],
        spiking_checkpoint=spiking, rank=trainer.global_rank,
        data=datamodule.split_summary() if hasattr(datamodule, "split_summary") else {},
        compiled=bool(getattr(task, "compile_blocks", False)), **_step_times(task.step_seconds),
    )
    if trainer.is_global_zero:
        write_summary(result, cfg)
    return result


def _step_times(seconds: list[float]) -> dict:
    """The first training step's wall time (where compiling happens) and the median of the others."""
    import statistics

    later = seconds[1:]
    return {"first_step_seconds": seconds[0] if seconds else None,
            "step_seconds": statistics.median(later) if later else None}


def write_summary(result: TrainResult, cfg: DictConfig) -> Path:
    """``<run>/summary.json``: the final figures of a run and what it was run with, for tools that
    read many runs (``spikellm-pareto``); the energy counts themselves are in ``energy.json``."""
    from omegaconf import OmegaConf

    from spikellm.io import atomic_write_json

    from spikellm.config.cli import run_overrides

    hydra_overrides = run_overrides()
    energy = result.energy
    return atomic_write_json(result.output_dir / "summary.json", {
        "val_ppl": result.val_ppl, "val_loss": result.val_loss, "initial_val_ppl": result.initial_val_ppl,
        "spikes_per_activation": result.spikes_per_activation, "firing_rate": result.firing_rate,
        "steps": result.steps, "tokens_seen": result.tokens_seen, "seconds": result.seconds,
        "first_step_seconds": result.first_step_seconds, "step_seconds": result.step_seconds,
        "compiled": result.compiled,
        "neuron": OmegaConf.to_container(cfg.neuron, resolve=True) if cfg.get("neuron") else None,
        "spike_loss": OmegaConf.to_container(cfg.task.spike_loss, resolve=True) if cfg.task.get("spike_loss") else None,
        "overrides": hydra_overrides, "data": result.data,
        "energy": None if energy is None else {
            "cost_model": energy.cost.name, "joules_per_token": energy.per_token(energy.joules),
            "ratio_to_dense": energy.ratio_to_dense, "file": result.energy_files.get("json")},
    })


def _refuse_spawn(cfg: DictConfig) -> None:
    """Spawned processes lose the run's state (the main process gets back an untrained model);
    train.py launches its processes itself under ``trainer=ddp``."""
    strategy = cfg.trainer.get("strategy")
    name = strategy if isinstance(strategy, str) else (strategy or {}).get("start_method", "")
    if isinstance(name, str) and "spawn" in name:
        raise ConfigError("trainer.strategy", name, "spawned processes do not hand the trained model back to the "
                                                    "run; use trainer=ddp (train.py launches one process per device)")


def _full_parameters(trainer):
    """A context in which an FSDP model's parameters are whole on rank 0 (else a no-op)."""
    import contextlib

    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # a torch built without distributed
        return contextlib.nullcontext()
    model = trainer.strategy.model
    if isinstance(model, FSDP):
        return FSDP.summon_full_params(model, writeback=False, rank0_only=True, offload_to_cpu=True)
    return contextlib.nullcontext()


def _build_logger(node, name: str):
    """A logger of the ``logger`` group; a CSV logger whose directory already holds a metrics.csv
    (a resumed run, in the run directory of the interrupted one) writes beside it, in
    ``attempt-2``, ``attempt-3``..., so nothing logged before is deleted."""
    from lightning.pytorch.loggers import CSVLogger

    logger = build(node, f"logger.{name}")
    if not isinstance(logger, CSVLogger) or not isinstance(logger.version, str):
        return logger
    if not (Path(logger.log_dir) / "metrics.csv").exists():
        return logger
    attempt = 2
    while (Path(logger.root_dir) / _attempt_version(logger.version, attempt)).exists():
        attempt += 1
    return build(node, f"logger.{name}", version=_attempt_version(logger.version, attempt))


def _attempt_version(version: str, attempt: int) -> str:
    return str(Path(version) / f"attempt-{attempt}") if version else f"attempt-{attempt}"


def save_final_checkpoint(cfg: DictConfig, task, datamodule, final: dict, energy, directory: Path) -> Path:
    """The run's spiking checkpoint (:mod:`spikellm.checkpoints.spiking`), its card carrying the final
    validation and energy figures; replaced atomically if the run directory already has one."""
    from spikellm.checkpoints.spiking import save_spiking_checkpoint

    from spikellm.config.cli import run_command

    spikes = final.get("val/spikes/spikes_per_activation")
    card = {"perplexity": round(float(final["val/ppl"]), 4), "corpus": cfg.data.get("source"),
            "spikes per activation": None if spikes is None else round(float(spikes), 4),
            "val loss": round(float(final["val/loss"]), 6), "steps": int(task.global_step),
            "command": run_command("train.py")}
    if energy is not None and energy.report is not None:
        card["energy per token (J)"] = energy.report.per_token(energy.report.joules)
        card["dense energy per token (J)"] = energy.report.per_token(energy.report.dense_joules)
        card["energy vs dense"] = round(energy.report.ratio_to_dense, 4)
    card = {key: value for key, value in card.items() if value is not None}
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
    for split, facts in result.data.items():
        table.add_row(f"{split} tokens", f"{facts['tokens']:,} ({facts['from']})")
    table.add_row("val loss", f"{result.val_loss:.4f}")
    table.add_row("val ppl", f"{result.val_ppl:,.2f}" if math.isfinite(result.val_ppl) else "inf")
    if result.firing_rate is not None:
        table.add_row("spikes / activation", f"{result.spikes_per_activation:.3f}")
        table.add_row("firing rate", f"{result.firing_rate:.2%} of neuron-steps")
    table.add_row("steps / tokens", f"{result.steps} / {result.tokens_seen:,}")
    table.add_row("time", f"{result.seconds:.1f} s")
    if result.step_seconds is not None:
        compiling = " (compiling the blocks)" if result.compiled else ""
        table.add_row("step time", f"first {result.first_step_seconds:.2f} s{compiling}, "
                                   f"then {result.step_seconds:.3f} s (median)")
    table.add_row("checkpoint", str(result.checkpoint))
    if result.spiking_checkpoint is not None:
        table.add_row("spiking checkpoint", str(result.spiking_checkpoint))
        table.add_row("in transformers", f'AutoModelForCausalLM.from_pretrained("{result.spiking_checkpoint}", '
                                         'trust_remote_code=True)')
    for log_dir in result.log_dirs:
        table.add_row("logs", str(log_dir))
    if result.energy is not None:
        table.add_row("energy / token", result.energy.summary())
        for kind, path in result.energy_files.items():
            table.add_row(f"energy {kind}", path)
    console = Console()
    if result.energy is not None:
        console.print(result.energy.rich_table("energy of the final validation"))
    console.print(table)
