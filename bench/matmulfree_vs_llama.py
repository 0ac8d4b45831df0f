"""The MatMul-free LM beside a LLaMA of about its size, trained here on the same data and steps.

    python train.py experiment=matmulfree_tiny trainer.max_steps=600 hydra.run.dir=<runs>/matmulfree_tiny
    python train.py experiment=llama_bitnet_tiny trainer.max_steps=600 hydra.run.dir=<runs>/llama_bitnet_tiny
    python bench/matmulfree_vs_llama.py --run <runs>/matmulfree_tiny --run <runs>/llama_bitnet_tiny

For every run (its ``spiking_checkpoint``): parameters, pydoc perplexity as eval.py measures it
(non-overlapping windows of ``--seqlen`` tokens of the held-out split), operation counts of that
evaluation (dense MACs, spike-driven ACs, spikes per activation) and its energy per token on each
``--cost`` model; for a MatMul-free LM also the perplexity in the fixed-point form of
``conf/hardware/loihi2.yaml`` and its ratio to the float form. Prints a table, writes ``--json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(run: Path, costs: list[str], seqlen: int, limit: int | None) -> dict:
    from spikellm.checkpoints.spiking import load_spiking_checkpoint
    from spikellm.config import build
    from spikellm.energy import OperationCounter
    from spikellm.energy.cost import load_cost_model
    from spikellm.evaluation.perplexity import evaluation_text, perplexity
    from spikellm.models.matmulfree import MatMulFreeLM, set_hardware_mode

    model, tokenizer, config = load_spiking_checkpoint(run / "spiking_checkpoint", backend="torch")
    tokens = torch.tensor(tokenizer.encode(evaluation_text("pydoc")), dtype=torch.long)
    if limit:
        tokens = tokens[:limit]
    with OperationCounter(model) as counter:
        ppl = perplexity(model, tokens, seqlen).ppl
    reports = {name: counter.report(load_cost_model(name)) for name in costs}
    first = next(iter(reports.values()))
    blocks = sum(p.numel() for name, p in model.named_parameters() if name.startswith("layers."))
    row = {
        "run": str(run), "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
        "block_parameters": blocks, "steps": config["card"].get("steps"), "val_ppl_at_training_end": config["card"].get("val ppl"),
        "ppl": ppl, "tokens": first.tokens, "macs_per_token": first.per_token(first.macs),
        "acs_per_token": first.per_token(first.acs), "dense_macs_per_token": first.per_token(first.dense_macs),
        "spikes_per_activation": _spikes_per_activation(first),
        "energy_per_token_J": {name: report.per_token(report.joules) for name, report in reports.items()},
        "ratio_to_dense": {name: report.ratio_to_dense for name, report in reports.items()},
    }
    if isinstance(model, MatMulFreeLM):
        spec = build(OmegaConf.load(ROOT / "conf" / "hardware" / "loihi2.yaml"), "hardware")
        set_hardware_mode(model, spec)
        row["hardware_ppl"] = perplexity(model, tokens, seqlen).ppl
        row["hardware_vs_float"] = row["hardware_ppl"] / ppl
    return row


def _spikes_per_activation(report) -> float | None:
    spikes = sum(layer.spikes for layer in report.layers)
    activations = sum(layer.activations for layer in report.layers)
    return spikes / activations if activations else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, type=Path, help="a train.py run directory")
    parser.add_argument("--cost", nargs="+", default=["horowitz45_fp32", "loihi", "seneca"])
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N tokens only")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "matmulfree_vs_llama.json")
    args = parser.parse_args()
    rows = [measure(run, args.cost, args.seqlen, args.limit) for run in args.run]
    args.json.write_text(json.dumps(rows, indent=2))
    print("| model | params (blocks) | ppl | fixed-point ppl | MACs/token | ACs/token | spikes/act | "
          + " | ".join(f"µJ/token {name}" for name in args.cost) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(args.cost))
    for row in rows:
        hardware = (f"{row['hardware_ppl']:.2f} ({row['hardware_vs_float']:.4f}×)" if "hardware_ppl" in row else "—")
        energies = " | ".join(f"{row['energy_per_token_J'][name] * 1e6:.2f} ({row['ratio_to_dense'][name]:.3f}× dense)"
                              for name in args.cost)
        print(f"| {row['architecture']} | {row['parameters'] / 1e6:.2f} M ({row['block_parameters'] / 1e6:.2f} M) "
              f"| {row['ppl']:.2f} | {hardware} | {row['macs_per_token'] / 1e6:.3f} M | {row['acs_per_token'] / 1e6:.3f} M "
              f"| {row['spikes_per_activation']:.3f} | {energies} |")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
