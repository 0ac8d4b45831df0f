"""Train a spiking LLaMA: ``python train.py [group=option ...] [key=value ...]``.

Examples::

    python train.py                                   # the default experiment (see README)
    python train.py neuron=none trainer.max_steps=50  # dense baseline, fewer steps
    python train.py ckpt_path=outputs/.../checkpoints/last.ckpt trainer.max_steps=600  # resume
"""
import sys

import hydra
from omegaconf import DictConfig

from spikellm.errors import SpikeLLMError


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from spikellm.training.pipeline import print_summary, run_training

    try:
        result = run_training(cfg)
    except SpikeLLMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print_summary(result)
    return result.val_loss


if __name__ == "__main__":
    main()
