"""Evaluate a checkpoint: ``python eval.py ckpt=<path> [tasks=[...]] [neuron=<name>]``.

Examples::

    python eval.py ckpt=outputs/train/<time>/checkpoints/last.ckpt
    python eval.py ckpt=<ckpt> tasks=[tiny_mc] perplexity.datasets=[pydoc,wikitext2]
    python eval.py ckpt=/path/to/hf_llama neuron=ternary   # spikify a Hugging Face model on the fly
    python eval.py ckpt=<dense ckpt> export_hf=models/tiny_hf  # also save it as a HF LLaMA to convert
    python eval.py ckpt=outputs/.../spiking_model           # a model converted by train.py experiment=...
"""
import sys

import hydra
from omegaconf import DictConfig

from spikellm.errors import SpikeLLMError


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from spikellm.evaluation.pipeline import print_results, run_evaluation

    try:
        results, report = run_evaluation(cfg)
    except SpikeLLMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if report is not None:
        from rich.console import Console

        Console().print(report.rich_table("energy of the perplexity evaluation"))
    print_results(results, report)


def check_command_line() -> None:
    """A mistyped key or group option, bad syntax, a value left unset: one line and exit 2,
    before Hydra prints its several (spikellm.config.check_command_line)."""
    from pathlib import Path

    from spikellm.config import check_command_line as check

    try:
        check(Path(__file__).resolve().parent / "conf", "eval", sys.argv[1:])
    except SpikeLLMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_command_line()
    main()
