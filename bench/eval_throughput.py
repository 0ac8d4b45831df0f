"""Perplexity-evaluation throughput of each encoder relative to ``neuron=none``.

    python bench/eval_throughput.py [--tokens 65536] [--seqlen 256] [--batch 8] [--encoders ternary gif]
                                    [--budgets mean_lsq_target1] [--no-energy]

The default model (``model=llama_tiny``) with each ``conf/neuron`` config (or ``conf/budget``
point), random weights (speed does not depend on them), the perplexity loop of eval.py (no-grad,
collapsed encoders, batched windows) with the energy counter attached as eval.py attaches it to
the first corpus (``--no-energy``: without). Each pass of an encoder is paired with a pass of the
dense model right before it, and the ratio is the median of the pairs' ratios (the cores are shared:
pairing keeps the ratio meaningful while the machine's speed drifts). Target >= 0.9.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def model_for(override: str):
    """``override`` is ``neuron=<name>`` or ``budget=<name>``."""
    from hydra import compose, initialize_config_dir

    from spikellm.config import build, build_attention_encoder, build_neuron

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[override, "paths.output_dir=/tmp/unused"])
    encoder, weight_quantizer = build_neuron(cfg.neuron)
    torch.manual_seed(0)
    return build(cfg.model, "model", vocab_size=2048).build(
        encoder, weight_quantizer, attention_encoder=build_attention_encoder(cfg.neuron)).eval()


def one_pass(model, tokens: torch.Tensor, seqlen: int, batch: int, device: str, energy: bool) -> float:
    """Tokens per second of one perplexity pass (with the operation counter when ``energy``)."""
    from spikellm.energy import OperationCounter
    from spikellm.evaluation.perplexity import perplexity

    if device == "cuda":
        torch.cuda.synchronize()
    counter = OperationCounter(model) if energy else None
    start = time.perf_counter()
    result = perplexity(model, tokens, seqlen, batch_size=batch)
    if counter is not None:
        counter.remove()
    if device == "cuda":
        torch.cuda.synchronize()
    return result.windows * seqlen / (time.perf_counter() - start)


def paired(override: str, dense, tokens, seqlen: int, batch: int, repeats: int, device: str,
           energy: bool) -> tuple[float, float]:
    """``(median tokens/s, median ratio to the dense pass run just before each pass)``."""
    model = model_for(override).to(device)
    one_pass(model, tokens[: seqlen * batch], seqlen, batch, device, energy)  # warm-up
    speeds, ratios = [], []
    for _ in range(repeats):
        base = one_pass(dense, tokens, seqlen, batch, device, energy)
        speed = one_pass(model, tokens, seqlen, batch, device, energy)
        speeds.append(speed)
        ratios.append(speed / base)
    return statistics.median(speeds), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["ternary", "if_rate", "gif", "bitplane", "ternary_attention"])
    parser.add_argument("--budgets", nargs="*", default=[], help="conf/budget points to measure as well")
    parser.add_argument("--no-energy", action="store_true", help="without the operation counter")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    tokens = torch.randint(0, 2048, (args.tokens,))
    energy = not args.no_energy
    dense = model_for("neuron=none").to(args.device)
    one_pass(dense, tokens[: args.seqlen * args.batch], args.seqlen, args.batch, args.device, energy)  # warm-up
    table = Table(title=f"perplexity evaluation, llama_tiny, {args.tokens:,} tokens, seqlen {args.seqlen}, "
                        f"batch {args.batch}, {args.device}, {torch.get_num_threads()} threads, "
                        f"energy counter {'on' if energy else 'off'}, median of {args.repeats} paired passes")
    for column in ("model", "tokens/s", "× none"):
        table.add_column(column, justify="left" if column == "model" else "right")
    overrides = [f"neuron={name}" for name in args.encoders] + [f"budget={name}" for name in args.budgets]
    for override in overrides:
        speed, ratio = paired(override, dense, tokens, args.seqlen, args.batch, args.repeats, args.device, energy)
        table.add_row(override, f"{speed:,.0f}", f"{ratio:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
