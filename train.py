"""Train a spiking LLaMA: ``python train.py [group=option ...] [key=value ...]``.

Examples::

    python train.py                                   # the default experiment (see README)
    python train.py neuron=none trainer.max_steps=50  # dense baseline, fewer steps
    python train.py ckpt_path=outputs/.../checkpoints/last.ckpt trainer.max_steps=600  # resume
    python train.py experiment=spikellm_w4a4 model.hf_path=/models/Llama-2-7b-hf  # convert a pretrained model
"""
from spikellm.entry_points import train

if __name__ == "__main__":
    train()
