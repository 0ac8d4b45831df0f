"""Training-step time and peak memory of each encoder relative to ``neuron=none`` (CPU or GPU).

Each configuration runs in its own process (a fresh peak-memory counter) with the default model
(``model=llama_tiny``) and the default batch, AdamW and cross-entropy on random tokens. Encoders run
their collapsed form (what training uses); the ``unrolled`` rows train through the explicit spike
trains (``neuron.unroll=true``: T matmuls per projection), the naive way this project avoids.

    python bench/qat_overhead.py                 # all encoders in conf/neuron, + unrolled rows
    python bench/qat_overhead.py --steps 20 --encoders ternary gif --no-unrolled

Prints a table of ratios; ``--json PATH`` also writes the raw figures.
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
DEFAULT_ENCODERS = ["ternary", "if_rate", "gif", "bitplane"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(neuron: str, unroll: bool, steps: int, warmup: int, batch: int, block: int, device: str) -> dict:
    """One configuration: median step time and peak memory above the memory before the first step."""
    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir

    from spikellm.config import build, build_neuron

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"neuron={neuron}", "paths.output_dir=/tmp/unused"])
    torch.manual_seed(0)
    encoder, weight_quantizer = build_neuron(cfg.neuron)
    model_config = build(cfg.model, "model", vocab_size=2048)
    model = model_config.build(encoder, weight_quantizer, unroll=unroll).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 2048, (batch, block + 1), device=device)

    def step():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    base_memory = torch.cuda.memory_allocated() if device == "cuda" else rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"neuron": neuron, "unroll": unroll, "step_s": statistics.median(times),
            "peak_bytes": peak - base_memory, "steps_T": model.spiking_linears()["layers.0.mlp.up_proj"].encoder.num_steps
            if encoder else 0, "torch_threads": torch.get_num_threads(), "device": device}


def run_one(neuron: str, unroll: bool, args) -> dict:
    """Time in one process, memory in another: glibc keeps freed heap memory mapped, so a peak RSS
    would count transient buffers long dead; a fixed mmap threshold returns large blocks when
    freed, so that process's peak is live memory — but it slows allocation, so it is not timed."""
    command = [sys.executable, __file__, "--worker", neuron, "--steps", str(args.unrolled_steps if unroll else args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--block", str(args.block), "--device", args.device]
    if unroll:
        command.append("--unroll")
    runs = {}
    for measure, env in (("time", {}), ("memory", {"MALLOC_MMAP_THRESHOLD_": str(1 << 16)})):
        if measure == "memory" and args.device == "cuda":
            break  # the CUDA allocator's own peak is exact
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
        if done.returncode != 0:
            raise SystemExit(f"worker {neuron} (unroll={unroll}) failed:\n{done.stderr[-2000:]}")
        runs[measure] = json.loads(done.stdout.strip().splitlines()[-1])
    return {**runs["time"], "peak_bytes": runs.get("memory", runs["time"])["peak_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=DEFAULT_ENCODERS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--unrolled-steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--no-unrolled", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker")
    parser.add_argument("--unroll", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.unroll, args.steps, args.warmup, args.batch, args.block, args.device)))
        return

    from rich.console import Console
    from rich.table import Table

    baseline = run_one("none", False, args)
    rows = [baseline]
    for name in args.encoders:
        rows.append(run_one(name, False, args))
        if not args.no_unrolled:
            rows.append(run_one(name, True, args))
    table = Table(title=f"QAT overhead vs neuron=none — llama_tiny, batch {args.batch}×{args.block}, {args.device}, "
                        f"{baseline['torch_threads']} threads")
    for column in ("neuron", "form", "T", "step time", "× none", "peak memory", "× none"):
        table.add_column(column, justify="right" if column not in ("neuron", "form") else "left")
    for r in rows:
        table.add_row(r["neuron"], "unrolled" if r["unroll"] else "collapsed", str(r["steps_T"]),
                      f"{r['step_s'] * 1000:.0f} ms", f"{r['step_s'] / baseline['step_s']:.2f}",
                      f"{r['peak_bytes'] / 2**20:.0f} MiB", f"{r['peak_bytes'] / baseline['peak_bytes']:.2f}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
