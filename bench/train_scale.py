"""Training at size: step time, tokens/s and peak memory of spiking vs dense LLaMAs, eager and compiled.

Each run is its own process (a fresh peak-memory counter and a cold compiler), and the runs
alternate A B A B ... so that a drift of the shared machine's speed lands on both sides of a
ratio. A run builds ``model=<size>`` (``llama_125m`` by default) with the demo's spiking neuron
(``budget=mean_k1``: ternary spikes, adaptive threshold) or ``neuron=none`` (dense), and trains
AdamW + cross-entropy on random tokens: ``--warmup`` steps (the first compiles), then ``--steps``
timed steps. Memory: the process's peak resident set, in a run of its own with a fixed mmap
threshold (glibc then returns large freed blocks, so the peak is live memory), or on a GPU the
allocator's peak.

    python bench/train_scale.py                       # 125M: spiking/dense x eager/compiled
    python bench/train_scale.py --size llama_350m --pairs 1 --variants spiking-eager dense-eager
    python bench/train_scale.py --checkpointing       # also activation checkpointing (same loss?)
    python bench/train_scale.py --precision bf16      # bf16 autocast (GPU; CPU with AVX512-BF16 / AMX)

Prints the figures and the ratios pair by pair; ``--json PATH`` writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["spiking-eager", "spiking-compiled", "dense-eager", "dense-compiled"]


def worker(size: str, variant: str, steps: int, warmup: int, batch: int, block: int, device: str,
           checkpointing: bool, precision: str) -> dict:
    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir

    from spikellm.config import build_model
    from spikellm.models.execution import checkpoint_blocks, compile_blocks

    kind, mode = variant.split("-")
    overrides = [f"model={size}", "paths.output_dir=/tmp/unused"]
    overrides += ["budget=mean_k1"] if kind == "spiking" else ["neuron=none"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.neuron).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    if checkpointing:
        checkpoint_blocks(model)
    if mode == "compiled":
        compile_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (batch, block + 1), generator=generator).to(device)
               for _ in range(warmup + steps)]
    # bf16: autocast as Lightning's bf16-mixed does it (weights, optimizer and loss in fp32)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times, losses = [], []
    for tokens in batches:
        sync()
        start = time.perf_counter()
        with autocast:
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    timed = times[warmup:]
    return {"size": size, "variant": variant, "checkpointing": checkpointing, "parameters": parameters,
            "first_step_s": times[0], "step_s": statistics.median(timed), "tokens_per_s": batch * block / statistics.median(timed),
            "losses": losses, "peak_bytes": peak, "threads": torch.get_num_threads(), "device": device,
            "batch": batch, "block": block, "precision": precision}


def run(args, variant: str, checkpointing: bool, measure: str) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--size", args.size, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--block", str(args.block),
               "--device", args.device, "--precision", args.precision] + (["--checkpointing"] if checkpointing else [])
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(1 << 16)} if measure == "memory" else {})}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="llama_125m")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--pairs", type=int, default=2, help="rounds of every variant, alternating")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--precision", default="32", choices=["32", "bf16"],
                        help="bf16: bf16 autocast (a GPU, or a CPU with AVX512-BF16/AMX); 32: fp32 throughout")
    parser.add_argument("--checkpointing", action="store_true",
                        help="also spiking-eager with activation checkpointing (memory and loss against spiking-eager)")
    parser.add_argument("--time-only", action="store_true", help="no separate memory runs (peak: the timed run's)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.size, args.worker, args.steps, args.warmup, args.batch, args.block, args.device,
                                "--checkpointing" in sys.argv, args.precision)))
        return

    runs = [(variant, False) for variant in args.variants]
    if args.checkpointing:
        runs.append(("spiking-eager", True))
    rounds = []
    for index in range(args.pairs):
        round_ = {}
        for variant, checkpointing in runs:
            key = variant + ("+ckpt" if checkpointing else "")
            timed = run(args, variant, checkpointing, "time")
            memory = run(args, variant, checkpointing, "memory") if args.device == "cpu" and not args.time_only else timed
            round_[key] = {**timed, "peak_bytes": memory["peak_bytes"]}
            print(f"round {index + 1} {key}: first step {timed['first_step_s']:.1f} s, step {timed['step_s']:.2f} s, "
                  f"{timed['tokens_per_s']:.0f} tokens/s, peak {memory['peak_bytes'] / 2**30:.2f} GiB", flush=True)
        rounds.append(round_)
    first = next(iter(rounds[0].values()))
    print(f"\n{args.size} ({first['parameters'] / 1e6:.0f} M parameters), batch {args.batch} x {args.block}, "
          f"{args.device}, {'bf16 autocast' if args.precision == 'bf16' else 'fp32'}, {first['threads']} threads, "
          f"{args.pairs} rounds (medians)")
    keys = list(rounds[0])
    for key in keys:
        step = statistics.median(r[key]["step_s"] for r in rounds)
        print(f"  {key:22s} step {step:7.2f} s  {args.batch * args.block / step:8.0f} tokens/s  first step "
              f"{statistics.median(r[key]['first_step_s'] for r in rounds):6.1f} s  peak "
              f"{statistics.median(r[key]['peak_bytes'] for r in rounds) / 2**30:.2f} GiB")
    ratios = {}
    for a, b in [("spiking-compiled", "spiking-eager"), ("spiking-compiled", "dense-compiled"),
                 ("spiking-eager", "dense-eager"), ("dense-compiled", "dense-eager"), ("spiking-eager+ckpt", "spiking-eager")]:
        if a in keys and b in keys:
            step = [r[a]["step_s"] / r[b]["step_s"] for r in rounds]
            peak = [r[a]["peak_bytes"] / r[b]["peak_bytes"] for r in rounds]
            ratios[f"{a} / {b}"] = {"step": step, "peak": peak}
            print(f"  {a} / {b}: step {statistics.median(step):.3f} ({', '.join(f'{x:.3f}' for x in step)}), "
                  f"peak memory {statistics.median(peak):.3f}")
    if "spiking-eager+ckpt" in keys:
        gap = max(abs(x - y) for r in rounds for x, y in zip(r["spiking-eager+ckpt"]["losses"],
                                                             r["spiking-eager"]["losses"]))
        print(f"  activation checkpointing: largest loss difference over {args.warmup + args.steps} steps {gap:.2e}")
        ratios["checkpointing_loss_gap"] = gap
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "ratios": ratios}, indent=1))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
