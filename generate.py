"""Generate text with any model file: ``python generate.py ckpt=<path> prompt="..."``.

Examples::

    python generate.py ckpt=outputs/train/<time>/checkpoints/last.ckpt prompt="def main("
    python generate.py ckpt=<run>/spiking_checkpoint prompts=prompts.txt temperature=0   # a batch, greedy, to JSONL
    python generate.py ckpt=/path/to/hf_llama neuron=ternary prompt="Once upon a time"  # spikified on the fly
"""
from spikellm.entry_points import generate

if __name__ == "__main__":
    generate()
