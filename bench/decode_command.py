"""One whole decoding run, for timing whole commands with farm-bench (start-up included).

    OMP_NUM_THREADS=1 farm-bench --vs 'python bench/decode_command.py none' -- python bench/decode_command.py ternary

Builds ``model=llama_tiny`` with the given neuron group (random weights, as bench/generation.py),
prefills 16 tokens and decodes ``--new`` cached greedy steps (default 1,024).
"""
import argparse

import torch

from generation import build
from spikellm.models.llama import KVCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("neuron")
    parser.add_argument("--new", type=int, default=1024)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build("llama_tiny", args.neuron, 16 + args.new)
    with torch.inference_mode():
        cache = KVCache.empty(len(model.layers))
        token = model(torch.randint(0, 2048, (1, 16)), cache=cache)[:, -1:].argmax(-1)
        for _ in range(args.new):
            token = model(token, cache=cache)[:, -1:].argmax(-1)


if __name__ == "__main__":
    main()
