"""Train a spiking LLaMA: ``python train.py [group=option ...] [key=value ...]``.

Examples::

    python train.py                                   # the default experiment (see README)
    python train.py neuron=none trainer.max_steps=50  # dense baseline, fewer steps
    python train.py ckpt_path=outputs/.../checkpoints/last.ckpt trainer.max_steps=600  # resume
    python train.py experiment=spikellm_w4a4 model.hf_path=/models/Llama-2-7b-hf  # convert a pretrained model
"""
import logging
import sys
import warnings

import hydra
from omegaconf import DictConfig

from spikellm.errors import SpikeLLMError


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


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from spikellm.posttrain.pipeline import print_conversion, run_conversion
    from spikellm.training.pipeline import converts, print_summary, run_training

    _one_log_stream()
    try:
        if converts(cfg):
            result = run_conversion(cfg)
            print_conversion(result)
            return result.final_ppl
        result = run_training(cfg)
    except SpikeLLMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if getattr(result, "rank", 0) == 0:  # under DDP every process returns; one summary
        print_summary(result)
    return result.val_loss


def check_command_line() -> None:
    """A mistyped key or group option, bad syntax, a value left unset: one line and exit 2,
    before Hydra prints its several (spikellm.config.check_command_line)."""
    from pathlib import Path

    from spikellm.config import check_command_line as check

    try:
        check(Path(__file__).resolve().parent / "conf", "train", sys.argv[1:])
    except SpikeLLMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_command_line()
    main()
