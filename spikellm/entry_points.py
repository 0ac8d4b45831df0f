"""The commands: ``spikellm-train`` / ``python train.py``, ``spikellm-eval`` / ``python eval.py`` and
``spikellm-generate`` / ``python generate.py``.

Each is a ``@hydra.main`` over the config tree installed with the package (``pkg://spikellm.conf``,
Hydra's search path, so a wheel runs from any directory), wrapped by
:func:`spikellm.config.cli.run`, which checks the command line first. Thin: compose, build, run;
the work is in :mod:`spikellm.training.pipeline` and :mod:`spikellm.evaluation.pipeline`.
"""
import logging
import sys
import warnings

import hydra
from omegaconf import DictConfig

from spikellm.config.cli import one_line_errors, run

CONFIG_PATH = "pkg://spikellm.conf"


def _one_log_stream() -> None:
    """Hydra already logs to the console and to the run's log file; Lightning adds a second
    console handler (every line twice) and product tips. Keep Hydra's, drop the tips."""
    import lightning.pytorch  # noqa: F401  (its import installs the handler we remove)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lightning_log = logging.getLogger(name)
        for handler in list(lightning_log.handlers):
            lightning_log.removeHandler(handler)
        lightning_log.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "💡 Tip" not in record.getMessage())
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning's own, not the user's


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> float:
    from spikellm.posttrain.pipeline import print_conversion, run_conversion
    from spikellm.training.pipeline import converts, print_summary, run_training

    _one_log_stream()
    with one_line_errors():
        if converts(cfg):
            result = run_conversion(cfg)
            print_conversion(result)
            return result.final_ppl
        result = run_training(cfg)
    if getattr(result, "rank", 0) == 0:  # under DDP every process returns; one summary
        print_summary(result)
    return result.val_loss


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _evaluate(cfg: DictConfig) -> None:
    from spikellm.evaluation.pipeline import print_results, run_evaluation

    with one_line_errors():
        results, report = run_evaluation(cfg)
    if report is not None:
        from rich.console import Console

        Console().print(report.rich_table("energy of the perplexity evaluation"))
    print_results(results, report)
    if results.get("failed"):  # what finished is in results.json; what failed ends the command
        failed = "; ".join(f"{what}: {why}" for what, why in results["failed"].items())
        print(f"error: {failed} (the other results are in {results['files']['results']})", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="generate")
def _generate(cfg: DictConfig) -> None:
    from spikellm.evaluation.generating import print_generation, run_generation

    with one_line_errors():
        run = run_generation(cfg)
    print_generation(run)


def train() -> None:
    """Train (or convert) a spiking model: ``spikellm-train [group=option ...] [key=value ...]``."""
    run(_train, "train")


def evaluate() -> None:
    """Evaluate a model file: ``spikellm-eval ckpt=<path> [tasks=[...]] [neuron=<name>]``."""
    run(_evaluate, "eval")


def generate() -> None:
    """Continue a prompt with any model file: ``spikellm-generate ckpt=<path> prompt="..."``."""
    run(_generate, "generate")
