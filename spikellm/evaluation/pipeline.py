"""eval.py's job: load, measure perplexity and zero-shot accuracy, count energy, write results.json."""
from __future__ import annotations

import logging

from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from spikellm.checks import check_bool, check_device, check_int
from spikellm.config import build
from spikellm.energy.cost import cost_model
from spikellm.errors import ConfigError, SpikeLLMError
from spikellm.io import atomic_write_json, check_writable


log = logging.getLogger(__name__)

def run_evaluation(cfg: DictConfig) -> tuple[dict, object]:
    """Returns ``(results, energy report or None)``; results are also written to ``cfg.results``."""
    from spikellm.energy import OperationCounter
    from spikellm.checkpoints import load_model
    from spikellm.evaluation.perplexity import evaluation_text, perplexity

    device = check_device(cfg.device)
    neuron = OmegaConf.to_container(cfg.neuron, resolve=True) if cfg.get("neuron") else None
    cost = cost_model(cfg.energy)
    check_settings(cfg)  # every setting and output path before the model is read, not after
    loaded = load_model(cfg.ckpt, neuron=neuron, device=device, backend=cfg.get("backend", "auto"),
                        dtype=cfg.get("dtype", "auto"))
    model = loaded.model
    if cfg.get("compile"):  # checked by check_settings
        from spikellm.models.execution import compile_blocks

        compile_blocks(model)
    if cfg.get("hardware"):  # the MatMul-free LM's fixed-point form (hardware=loihi2)
        from spikellm.models.matmulfree import MatMulFreeLM, set_hardware_mode

        if not isinstance(model, MatMulFreeLM):
            raise ConfigError("hardware", cfg.hardware.get("_target_"),
                              f"the fixed-point form is defined for the MatMul-free LM, and {cfg.ckpt} holds a "
                              f"{type(model).__name__}; drop hardware=")
        set_hardware_mode(model, build(cfg.hardware, "hardware"))
    exported = None
    if cfg.get("export_hf"):
        from spikellm.checkpoints.hf import save_hf_llama

        exported = str(save_hf_llama(model, loaded.tokenizer, cfg.export_hf))
    results = {"ckpt": loaded.source, "model": loaded.config, "perplexity": {}, "tasks": {}, "energy": None,
               "config": OmegaConf.to_container(cfg, resolve=True)}
    seqlen = cfg.perplexity.seqlen or min(2048, model.config.max_seq_len)
    if cfg.perplexity.seqlen is None and seqlen != 2048:
        # the default window is the model's context: a 256-token LLaMA and a 2,048-token MatMul-free
        # LM are then measured on different windows, and their perplexities do not compare
        log.warning("perplexity over windows of %d tokens (the model's context); to compare models, give them "
                    "the same perplexity.seqlen", seqlen)
    report = None
    for dataset in cfg.perplexity.datasets:
        try:
            text = evaluation_text(str(dataset), **_held_out(loaded.config, str(dataset)))
        except SpikeLLMError as error:  # a hub corpus offline: keep what finished, name what failed
            results.setdefault("failed", {})[f"perplexity {dataset}"] = str(error)
            continue
        tokens = torch.tensor(loaded.tokenizer.encode(text), dtype=torch.long)
        counter = OperationCounter(model) if report is None else None  # energy of the first corpus's tokens
        try:
            try:
                result = perplexity(model, tokens, seqlen, cfg.perplexity.stride, cfg.perplexity.batch_size,
                                    progress=True)
            except ConfigError as error:  # the window settings are the perplexity group's
                raise error.with_prefix("perplexity") from None
        finally:
            if counter is not None:
                counter.remove()
        results["perplexity"][str(dataset)] = asdict(result)
        if counter is not None:
            report = counter.report(cost)
            results["energy"] = report.to_dict()
    if cfg.tasks:
        from spikellm.evaluation.harness import SpikeLLMEvalLM
        from spikellm.evaluation.tasks import run_tasks

        lm = SpikeLLMEvalLM(model, loaded.tokenizer, batch_size=cfg.batch_size, device=device)
        results["tasks"] = run_tasks(lm, list(cfg.tasks), include_path=cfg.include_path, limit=cfg.limit,
                                     num_fewshot=cfg.num_fewshot)
    if cfg.get("export"):
        results["files_pending_export"] = _export_spiking(loaded, results, cfg)
    path = Path(cfg.results)
    atomic_write_json(path, results)  # a reader never sees half a results file
    if report is not None:
        report.save_figure(path.parent / "energy.png")
    results["files"] = {"results": str(path), "energy_figure": str(path.parent / "energy.png") if report else None}
    if exported:
        results["files"]["hugging_face_export"] = exported
    if results.get("files_pending_export"):
        results["files"]["spiking_checkpoint"] = results.pop("files_pending_export")
    return results, report


CORPORA = ("pydoc", "wikitext2", "c4")


def check_settings(cfg: DictConfig) -> None:
    """eval.py's settings and outputs, one ConfigError line naming the first that is wrong."""
    from spikellm.checks import check_float

    ppl = cfg.perplexity
    if ppl.seqlen is not None:  # null is the default window; 0 would mean nothing at all
        check_int("perplexity.seqlen", ppl.seqlen, 2)
    if ppl.stride is not None:
        check_int("perplexity.stride", ppl.stride, 1)
    check_int("perplexity.batch_size", ppl.batch_size, 1)
    check_bool("compile", cfg.get("compile", False))
    for dataset in ppl.datasets or []:
        if str(dataset) not in CORPORA and not Path(str(dataset)).expanduser().exists():
            raise ConfigError("perplexity.datasets", str(dataset), "is no corpus name (pydoc, wikitext2, c4) and no "
                                                                   "such file or directory of text")
    check_int("batch_size", cfg.batch_size, 1)
    check_int("num_fewshot", cfg.num_fewshot, 0)
    if cfg.limit is not None:  # lm-eval: a count of examples, or a fraction of each task below 1
        if isinstance(cfg.limit, float) and cfg.limit < 1:
            check_float("limit", cfg.limit, 0.0, 1.0, low_open=True)
        else:
            check_int("limit", cfg.limit, 1)
    results = Path(cfg.results).expanduser()
    if results.is_dir():
        raise ConfigError("results", str(results), "is a directory: give the path of the .json file to write")
    if results.exists():  # a second eval.py into one run directory replaced the first's results
        raise ConfigError("results", str(results), "already exists (the results of an earlier evaluation?): give "
                                                   "another hydra.run.dir (or results=<path>); nothing is overwritten")
    check_writable(results.parent, key="results")  # before minutes of evaluation, not after
    for key in ("export", "export_hf"):  # new directories, beside (not on) the results and the model
        if not cfg.get(key):
            continue
        target = Path(cfg[key]).expanduser()
        if target.exists():
            raise ConfigError(key, str(target), "already exists: give a new directory; nothing is overwritten")
        if target.resolve() in (results.resolve(), *results.resolve().parents):
            raise ConfigError(key, str(target), f"is where results={results} goes: give another directory")
        check_writable(target.parent, key=key)


def _held_out(record: dict, dataset: str) -> dict:
    """The pydoc split a train.py checkpoint was trained with (its seed and fraction), so its
    perplexity is measured on documents it never saw; the default split for other models."""
    split = record.get("split") or {}
    if dataset != "pydoc" or split.get("source", "pydoc") != "pydoc" or split.get("explicit"):
        return {}
    return {key: split[key] for key in ("seed", "val_fraction") if key in split}


def _export_spiking(loaded, results: dict, cfg) -> str:
    """Write the evaluated model as a spiking checkpoint whose card carries this evaluation."""
    from spikellm.checkpoints.spiking import save_spiking_checkpoint

    if "model" not in loaded.config:
        raise ConfigError("export", cfg.export, "spiking checkpoints are written for train.py models "
                                                "(a Hugging Face conversion is already saved by train.py)")
    from spikellm.config.cli import run_command

    card = {f"ppl {name}": round(r["ppl"], 4) for name, r in results["perplexity"].items()}
    if results["perplexity"]:  # the first corpus is the card's perplexity
        corpus, first = next(iter(results["perplexity"].items()))
        card.update({"perplexity": round(first["ppl"], 4), "corpus": corpus})
    card.update({f"{name} {metric}": round(value, 4) for name, task in results["tasks"].items()
                 for metric, value in task.items() if isinstance(value, float)})
    if results.get("energy"):
        energy = results["energy"]
        card["energy per token (J)"] = energy["joules_per_token"]
        card["dense energy per token (J)"] = energy["dense_joules_per_token"]
        card["energy vs dense"] = round(energy["ratio_to_dense"], 4)
        if energy.get("spikes_per_activation") is not None:
            card["spikes per activation"] = round(energy["spikes_per_activation"], 4)
    if run_command("eval.py"):
        card["command"] = run_command("eval.py")
    return str(save_spiking_checkpoint(loaded.model, cfg.export, model_config=loaded.config["model"],
                                       neuron=loaded.config.get("neuron"), tokenizer=loaded.tokenizer, card=card,
                                       cost_model=cfg.energy.get("name")))


def print_results(results: dict, report) -> None:
    """One table: perplexities, task accuracies (± standard error), energy, where the files are."""
    from rich.console import Console
    from rich.table import Table

    from spikellm.energy.report import joules_text

    table = Table(title=f"spikellm: evaluation of {results['ckpt']}", title_justify="left")
    for column in ("metric", "value", "detail"):
        table.add_column(column, overflow="fold")
    for name, ppl in results["perplexity"].items():
        table.add_row(f"ppl {name}", f"{ppl['ppl']:,.2f}",
                      f"{ppl['tokens']:,} tokens, {ppl['windows']} windows of {ppl['seqlen']} (stride {ppl['stride']})")
    for task, metrics in results["tasks"].items():
        for metric in ("acc", "acc_norm"):
            if metric in metrics:
                stderr = metrics.get(f"{metric}_stderr")
                table.add_row(f"{task} {metric}", f"{100 * metrics[metric]:.2f}",
                              "" if stderr is None else f"± {100 * stderr:.2f}")
    if report is not None:
        table.add_row("energy / token", joules_text(report.per_token(report.joules)),
                      f"{report.ratio_to_dense:.3f}× dense, {report.cost.name} ({report.cost.charges()})")
    for kind, path in results.get("files", {}).items():
        if path:
            table.add_row(kind.replace("_", " "), path, "")
    Console().print(table)
