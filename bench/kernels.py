"""Spike-driven linear kernel vs a dense fp16 matmul of the same shape, on a GPU.

    python bench/kernels.py [--rates 0.05 0.1 0.25 0.5] [--batches 1 16]

LLaMA-7B projection shapes (q/k/v/o 4096→4096, gate/up 4096→11008, down 11008→4096). Spikes are
int8 counts in ±1..7 with the given firing rate (share of non-zero counts), either scattered at
random or clustered in 64-channel blocks (what the event-driven tile skip can exploit); weights
int8. Prints the kernel's time relative to ``torch.matmul`` on fp16 (< 1: faster), per shape,
batch and rate. Times from ``triton.testing.do_bench`` (median, warm). Needs CUDA.
"""
from __future__ import annotations

import argparse
import sys

import torch

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (4096, 11008), "down": (11008, 4096)}


def spikes(m: int, k: int, rate: float, clustered: bool, generator: torch.Generator) -> torch.Tensor:
    values = torch.randint(1, 8, (m, k), generator=generator, device="cuda") * (
        torch.randint(0, 2, (m, k), generator=generator, device="cuda") * 2 - 1)
    if clustered:
        blocks = torch.rand(m, -(-k // 64), generator=generator, device="cuda") < rate
        active = blocks.repeat_interleave(64, dim=1)[:, :k]
    else:
        active = torch.rand(m, k, generator=generator, device="cuda") < rate
    return (values * active).to(torch.int8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="*", default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU (the kernels' CPU path is the Triton interpreter, "
                 "which is for tests, not timing)")
    from triton.testing import do_bench

    from spikellm.kernels import spike_linear

    generator = torch.Generator(device="cuda").manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}")
    print(f"{'shape':8s} {'M':>3s} {'rate':>5s} {'dense fp16 µs':>14s} {'random ×':>9s} {'clustered ×':>12s}")
    for label, (k, n) in SHAPES.items():
        weight = torch.randint(-8, 8, (n, k), generator=generator, device="cuda").to(torch.int8)
        weight_fp16 = weight.half().T.contiguous()
        scale = torch.rand(n, device="cuda")
        for m in args.batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            dense = do_bench(lambda: torch.matmul(x, weight_fp16)) * 1e3
            step = torch.rand(m, device="cuda")
            for rate in args.rates:
                ratios = []
                for clustered in (False, True):
                    s = spikes(m, k, rate, clustered, generator)
                    ratios.append(do_bench(lambda: spike_linear(s, weight, step, scale)) * 1e3 / dense)
                print(f"{label:8s} {m:3d} {rate:5.2f} {dense:14.1f} {ratios[0]:9.2f} {ratios[1]:12.2f}", flush=True)


if __name__ == "__main__":
    main()
