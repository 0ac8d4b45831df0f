"""Perplexity-evaluation throughput of each encoder relative to ``neuron=none``.

    python bench/eval_throughput.py [--tokens 65536] [--seqlen 256] [--batch 8] [--encoders ternary gif]

The default model (``model=llama_tiny``) with each ``conf/neuron`` config, random weights (speed
does not depend on them), the perplexity loop of eval.py (no-grad, collapsed encoders, batched
windows). Prints tokens/s and the ratio to the dense model; target >= 0.8.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def model_for(neuron: str):
    from hydra import compose, initialize_config_dir

    from spikellm.config import build, build_attention_encoder, build_neuron

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"neuron={neuron}", "paths.output_dir=/tmp/unused"])
    encoder, weight_quantizer = build_neuron(cfg.neuron)
    torch.manual_seed(0)
    return build(cfg.model, "model", vocab_size=2048).build(
        encoder, weight_quantizer, attention_encoder=build_attention_encoder(cfg.neuron)).eval()


def throughput(neuron: str, tokens: torch.Tensor, seqlen: int, batch: int, repeats: int, device: str) -> float:
    from spikellm.evaluation.perplexity import perplexity

    model = model_for(neuron).to(device)
    perplexity(model, tokens[: seqlen * batch], seqlen, batch_size=batch)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = perplexity(model, tokens, seqlen, batch_size=batch)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return result.windows * seqlen / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["ternary", "if_rate", "gif", "bitplane", "ternary_attention"])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    tokens = torch.randint(0, 2048, (args.tokens,))
    baseline = throughput("none", tokens, args.seqlen, args.batch, args.repeats, args.device)
    table = Table(title=f"perplexity evaluation, llama_tiny, {args.tokens:,} tokens, seqlen {args.seqlen}, "
                        f"batch {args.batch}, {args.device}, {torch.get_num_threads()} threads")
    for column in ("neuron", "tokens/s", "× none"):
        table.add_column(column, justify="left" if column == "neuron" else "right")
    table.add_row("none", f"{baseline:,.0f}", "1.00")
    for name in args.encoders:
        speed = throughput(name, tokens, args.seqlen, args.batch, args.repeats, args.device)
        table.add_row(name, f"{speed:,.0f}", f"{speed / baseline:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
