"""``python train.py experiment=<name> model.hf_path=<dir>``: convert a pretrained causal LM.

Order: validate the config and build every stage (cheap failures first), load the data group with
the model's own tokenizer, load the model from its local directory, measure its validation
perplexity, spikify it with the ``neuron`` group, run the ``convert.stages`` in order, measure
again (counting the operations of both measurements on the ``energy`` cost model), and save the
result where eval.py loads it (``<output_dir>/spiking_model``).

``model=native model.checkpoint=<dir>`` runs the stages on a model trained here instead (a
spiking checkpoint, e.g. ``<run>/spiking_checkpoint``): it keeps its own encoders, and the result
is a spiking checkpoint again, with the stages' activation thresholds in it.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from spikellm.checks import check_int
from spikellm.config import build, build_neuron
from spikellm.energy.cost import cost_model
from spikellm.errors import ConfigError, Interrupted
from spikellm.checkpoints.hf import check_hf_dir, hf_config, stored_dtype
from spikellm.checkpoints.weights import stored_dtype_of
from spikellm.config.cli import run_command
from spikellm.models.hf import causal_lm_logits, max_positions
from spikellm.models.spikify import decoder_blocks
from spikellm.nn.storage import compute_in, store_as
from spikellm.posttrain.stages import ConversionContext
from spikellm.progress import per_block, progress_bar

log = logging.getLogger(__name__)


@dataclass
class ConversionResult:
    output_dir: Path
    model_dir: Path
    source: str
    fp_ppl: float
    spiking_ppl: float  # spikified, before any stage
    final_ppl: float
    stages: dict = field(default_factory=dict)
    seconds: float = 0.0
    energy_before: object | None = None  # EnergyReports of the validation tokens, spikified and converted
    energy_after: object | None = None
    native: bool = False  # a model trained here (model=native): no floating-point source to compare


@torch.no_grad()
def validation_ppl(model: nn.Module, datamodule, max_batches: int | None = None, cost=None,
                   description: str = "validation perplexity"):
    """Token-weighted perplexity over the data group's validation blocks (what train.py reports);
    with a ``cost`` model, ``(perplexity, EnergyReport of those tokens)``. A model stored in bf16
    computes each block in fp32 (:func:`~spikellm.nn.storage.compute_in`); the bar moves per block."""
    from spikellm.energy import OperationCounter

    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    loader = datamodule.val_dataloader()
    batches = len(loader) if max_batches is None else min(max_batches, len(loader))
    blocks = decoder_blocks(model)
    counter = OperationCounter(model) if cost is not None else None
    try:
        with compute_in(model, blocks), progress_bar(description, batches * len(blocks)) as advance, \
                per_block(blocks, advance):
            for index, (inputs, targets) in enumerate(loader):
                if index >= batches:
                    break
                logits = causal_lm_logits(model, inputs.to(device))
                total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.to(device).flatten(),
                                               reduction="sum"))
                tokens += targets.numel()
    finally:
        if counter is not None:
            counter.remove()
    ppl = math.exp(total / tokens)
    return ppl if cost is None else (ppl, counter.report(cost))


def is_native(cfg: DictConfig) -> bool:
    """Whether the model to convert is one trained here (``model=native``), not a Hugging Face one."""
    return "checkpoint" in cfg.model.keys()


def check_conversion_config(cfg: DictConfig) -> dict:
    """Everything checkable before loading data or weights; returns the built stages by name."""
    if is_native(cfg):
        from spikellm.checkpoints.spiking import read_config

        read_config(cfg.model.get("checkpoint"))  # a spiking checkpoint, readable
        if cfg.neuron is not None and (cfg.neuron.get("encoder") is not None
                                       or cfg.neuron.get("weight_quantizer") is not None):
            raise ConfigError("neuron", cfg.neuron.get("name"), "a model trained here keeps the encoders it was "
                                                                "trained with; use neuron=none with model=native")
    else:
        hf_config(cfg.model.get("hf_path"))  # the directory and its architecture, from config.json alone
    cost_model(cfg.energy)
    build_neuron(cfg.neuron)
    if cfg.neuron is not None and cfg.neuron.get("attention") is not None:
        raise ConfigError("neuron.attention", "set", "spiking attention products run on the native SpikingLlama; "
                                                     "a converted Hugging Face model spikes its projections only")
    calibration = cfg.convert.calibration
    check_int("convert.calibration.n_samples", calibration.get("n_samples"), 1)
    check_int("convert.calibration.seq_len", calibration.get("seq_len"), 2)  # a next token to predict
    stages = {}
    for name, node in (cfg.convert.get("stages") or {}).items():
        stages[name] = build(node, f"convert.stages.{name}")
    return stages


def run_conversion(cfg: DictConfig) -> ConversionResult:
    """Convert ``cfg.model.hf_path`` with ``cfg.neuron`` and ``cfg.convert``; see the module docstring.

    The model stays in the dtype it is stored in (``model.dtype=auto``; fp32 when a stage trains
    all of it) and each block computes in fp32 when it runs. What a resume needs is kept in
    ``<output_dir>/conversion_state`` as it is made; Ctrl-C ends with one line saying so, and the
    same command with the same ``hydra.run.dir`` goes on from there."""
    import lightning.pytorch as pl

    from spikellm.io import check_writable
    from spikellm.posttrain.state import ConversionState, config_digest

    start = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    stages = check_conversion_config(cfg)
    check_writable(cfg.paths.output_dir)
    output_dir = Path(cfg.paths.output_dir)
    if (output_dir / "spiking_model").exists():
        raise ConfigError("paths.output_dir", str(output_dir), "already holds a spiking_model; choose another "
                                                               "output directory (nothing is overwritten)")
    state = ConversionState(output_dir, config_digest(cfg), resume=bool(cfg.convert.get("resume", True)))
    if state.resuming:
        log.info("resuming the interrupted conversion kept in %s (%s)", state.directory, state.describe())
    try:
        return _convert(cfg, stages, state, output_dir, start)
    except KeyboardInterrupt:
        raise Interrupted(state.interrupted(output_dir)) from None


def _convert(cfg: DictConfig, stages: dict, state, output_dir: Path, start: float) -> ConversionResult:
    from spikellm.checkpoints.converted import save_converted
    from spikellm.data.calibration import calibration_samples
    from spikellm.models.spikify import spikify_from_config

    native = is_native(cfg)
    source = str(cfg.model.checkpoint) if native else str(check_hf_dir(cfg.model.hf_path))
    cost = cost_model(cfg.energy)
    model_dir = output_dir / "spiking_model"
    # the model's own tokenizer, always: token ids must mean what its embedding learned
    datamodule = build(cfg.data, "data", tokenizer_path=source)
    datamodule.setup("fit")
    trains = any(getattr(stage, "needs_teacher", False) for stage in stages.values())
    # a stage that trains the whole model needs it in fp32 and in memory; the others hold it as
    # stored (bf16) and leave each block in its file until the block runs
    model = build(cfg.model, "model", **({} if native else {"dtype": "float32"} if trains else {"blocks_on_disk": True}))
    positions = max_positions(model.config)
    for key, length in (("convert.calibration.seq_len", cfg.convert.calibration.seq_len),
                        ("data.block_size", cfg.data.block_size)):
        if positions is not None and length > positions:
            raise ConfigError(key, length, f"exceeds the model's {positions} positions; lower it")
    eval_batches = cfg.convert.get("eval_batches")
    teacher = copy.deepcopy(model) if trains else None
    neuron = OmegaConf.to_container(cfg.neuron, resolve=True) if cfg.neuron is not None else None

    def measured(key: str, description: str, with_energy: bool):
        """A validation perplexity (and energy), measured once: a resumed run reads it back."""
        from spikellm.energy import EnergyReport

        saved = state.measured(key)
        if saved is not None:
            return (saved["ppl"], EnergyReport.from_dict(saved["energy"])) if with_energy else saved["ppl"]
        result = validation_ppl(model, datamodule, eval_batches, cost if with_energy else None, description)
        ppl, report = result if with_energy else (result, None)
        state.measure(key, {"ppl": ppl, "energy": report.to_dict() if report is not None else None})
        return result

    if native:  # already spiking: the starting point is the model as trained
        spiking_ppl, energy_before = measured("spiking", "perplexity, as trained", True)
        fp_ppl = spiking_ppl
    else:
        fp_ppl = measured("floating_point", "perplexity, floating point", False)
        log.info("floating point: validation ppl %.3f", fp_ppl)
        spikify_from_config(model, neuron)
        spiking_ppl, energy_before = measured("spiking", "perplexity, spikified", True)
        log.info("spikified (%s): validation ppl %.3f", (neuron or {}).get("name"), spiking_ppl)
    calibration = calibration_samples(datamodule.train_tokens, **OmegaConf.to_container(cfg.convert.calibration,
                                                                                         resolve=True))
    ctx = ConversionContext(model, calibration, datamodule, teacher, cfg, output_dir, state=state)
    state.restore(ctx, list(stages))
    summaries = {}
    for index, (name, stage) in enumerate(stages.items(), 1):
        done = state.stage_summary(name)
        if done is not None:
            summaries[name] = done
            log.info("stage %d/%d: %s finished before the interruption", index, len(stages), name)
            continue
        # a stage can run for minutes (each threshold candidate is a pass over the calibration set):
        # say which one runs, and how long each took
        log.info("stage %d/%d: %s (%s) on %d calibration sequences", index, len(stages), name, type(stage).__name__,
                 len(calibration))
        began = time.perf_counter()
        ctx.stage = name
        summaries[name] = {**stage(ctx), "seconds": round(time.perf_counter() - began, 2)}
        # a whole-model snapshot when another stage follows; the last one's blocks are its record
        state.finish_stage(name, summaries[name], ctx, snapshot=index < len(stages))
        log.info("stage %s done in %.1f s", name, summaries[name]["seconds"])
    if trains and not native:  # trained in fp32: stored as downloaded (bf16), quantized projections packed
        store_as(model, stored_dtype(source, hf_config(source)))
    final_ppl, energy_after = measured("converted", "perplexity, converted", True)
    log.info("converted: validation ppl %.3f", final_ppl)
    metrics = {"fp_ppl": fp_ppl, "spiking_ppl": spiking_ppl, "final_ppl": final_ppl,
               "energy_per_token_before_J": energy_before.per_token(energy_before.joules),
               "energy_per_token_after_J": energy_after.per_token(energy_after.joules),
               "dense_energy_per_token_J": energy_after.per_token(energy_after.dense_joules),
               "spikes_per_activation": energy_after.spikes_per_activation, "cost_model": cost.name}
    _write_energy(output_dir, energy_before, energy_after)
    log.info("writing %s", model_dir)
    made = {"corpus": cfg.data.get("source"), "command": run_command("train.py")}
    if native:
        from spikellm.checkpoints.converted import conversion_card
        from spikellm.checkpoints.spiking import read_config, save_spiking_checkpoint

        written = read_config(source)
        card = conversion_card({"source": source, "metrics": metrics, "stages": summaries, "card": made})
        save_spiking_checkpoint(model, model_dir, model_config=written["model"], neuron=written["neuron"],
                                tokenizer=datamodule.tokenizer, card=card, cost_model=cost.name,
                                thresholds=ctx.thresholds)
    else:
        record = {"source": source, "neuron": neuron, "thresholds": ctx.thresholds, "stages": summaries,
                  "metrics": metrics, "storage_dtype": str(stored_dtype_of(model)).removeprefix("torch."),
                  "calibration": OmegaConf.to_container(cfg.convert.calibration, resolve=True),
                  "task_name": cfg.get("task_name"), "card": made}
        save_converted(model, datamodule.tokenizer, model_dir, record)
    state.remove()
    return ConversionResult(output_dir, model_dir, source, fp_ppl, spiking_ppl, final_ppl, summaries,
                            time.perf_counter() - start, energy_before, energy_after, native=native)


def _write_energy(output_dir: Path, before, after) -> None:
    """``energy.json``: the per-layer operations and energy of the validation tokens, before the
    stages and after (what activation sparsity saves shows here)."""
    from spikellm.io import atomic_write_json

    atomic_write_json(output_dir / "energy.json", {"before": before.to_dict(), "after": after.to_dict()})


def print_conversion(result: ConversionResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="spikellm: conversion done", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("source", result.source)
    if result.native:
        table.add_row("val ppl, as trained", f"{result.spiking_ppl:,.3f}")
    else:
        table.add_row("val ppl, floating point", f"{result.fp_ppl:,.3f}")
        table.add_row("val ppl, spikified", f"{result.spiking_ppl:,.3f}")
    table.add_row("val ppl, converted", f"{result.final_ppl:,.3f}")
    if result.energy_before is not None and result.energy_after is not None:
        from spikellm.energy.report import joules_text

        before, after = result.energy_before, result.energy_after
        table.add_row(f"energy / token ({after.cost.name})",
                      f"{joules_text(before.per_token(before.joules))} → {joules_text(after.per_token(after.joules))} "
                      f"({after.joules / before.joules:.3f}×; {after.ratio_to_dense:.3f}× dense)")
    for name, summary in result.stages.items():
        shown = ", ".join(f"{k}={_short(v)}" for k, v in summary.items() if not isinstance(v, list))
        table.add_row(f"stage {name}", shown)
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("spiking model", str(result.model_dir))
    Console().print(table)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
