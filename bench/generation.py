"""Generation speed on the CPU: the KV cache, spiking decoding, the MatMul-free LM's constant memory.

    OMP_NUM_THREADS=1 python bench/generation.py [--new 256] [--prompt 16] [--batch 1] [--repeats 3]
                                                 [--spiking ternary ternary_attention] [--lengths 64 256 1024]

The model of ``model=llama_tiny`` (dim 256, 4 layers, GQA 8/4 heads; ``max_seq_len`` raised to
fit the prompt and the new tokens) with random weights (speed does not depend on them), greedy.

* cached vs uncached: :func:`spikellm.generation.generate` with its KV cache against rerunning the
  whole sequence every step, ``--new`` tokens each (target >= 5x);
* spiking vs dense decoding: each ``--spiking`` neuron group against ``neuron=none``, cached
  decoding only (the prefill excluded; target >= 0.8);
* memory: the MatMul-free LM (``model=matmulfree_tiny``, ``neuron=bitnet``) after 64/256/1024
  tokens: its recurrent state's bytes and the process's resident memory, beside the LLaMA's KV
  cache bytes at the same lengths.

Timed runs alternate pair by pair (A, B, A, B, ...) and the ratio is the median of the pairs'
ratios, so the shared cores' drift hits both sides alike. The first line says whether the encoders
run the fused CPU encoder (``spikellm/ops/cpu_encode.c``); ``SPIKELLM_CPU_ENCODER=0`` measures
them on the PyTorch path instead.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def group(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "neuron" / f"{name}.yaml"))
    base = [d for d in cfg.pop("defaults", []) if d != "_self_"]
    return {**(group(base[0]) if base else {}), **cfg}


def build(kind: str, neuron: str, max_seq_len: int):
    from spikellm.config import build_attention_encoder, build_neuron
    from spikellm.models import LlamaConfig, MatMulFreeConfig

    neuron_cfg = group(neuron)
    encoder, quantizer = build_neuron(neuron_cfg)
    fields = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{kind}.yaml"))
    fields.pop("_target_")
    fields.update(vocab_size=2048, max_seq_len=max(fields["max_seq_len"], max_seq_len))
    torch.manual_seed(0)
    config = (LlamaConfig if kind.startswith("llama") else MatMulFreeConfig)(**fields)
    return config.build(encoder, quantizer, attention_encoder=build_attention_encoder(neuron_cfg)).eval()


def tokens_per_second(model, prompt, new: int, use_cache: bool, decode_only: bool = False) -> float:
    """Generated tokens per second (``decode_only``: the cached steps alone, prefill excluded)."""
    from spikellm.generation import _generate

    marks = {}
    options = dict(attention_mask=None, max_new_tokens=new, temperature=0.0, top_k=0, top_p=1.0,
                   repetition_penalty=1.0, seed=None, generator=None, stop=None, eos_token_id=None, streamer=None,
                   pad_token_id=0, use_cache=use_cache)
    start = time.perf_counter()
    result = _generate(model, prompt, on_phase=lambda phase: marks.setdefault(phase, time.perf_counter()), **options)
    end = time.perf_counter()
    assert all(len(t) == new for t in result.tokens)
    if decode_only:
        return prompt.shape[0] * (new - 1) / (end - marks["decode"])
    return prompt.shape[0] * new / (end - start)


def paired(a, b, repeats: int) -> tuple[float, float, float]:
    """``(median a, median b, median of a/b over pairs)``, runs alternating a, b, a, b, ..."""
    a(), b()  # warm-up
    pairs = [(a(), b()) for _ in range(repeats)]
    return (statistics.median(x for x, _ in pairs), statistics.median(y for _, y in pairs),
            statistics.median(x / y for x, y in pairs))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spiking", nargs="*", default=["ternary", "ternary_attention"])
    parser.add_argument("--lengths", nargs="*", type=int, default=[64, 256, 1024])
    parser.add_argument("--skip-uncached", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    prompt = torch.randint(0, 2048, (args.batch, args.prompt))
    total = args.prompt + args.new
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); model=llama_tiny, batch {args.batch}, "
          f"prompt {args.prompt}, {args.new} new tokens, greedy, median of {args.repeats} alternating pairs")
    from spikellm.ops.cpu_encode import unavailable_reason

    reason = unavailable_reason()
    print("encoders: " + ("the fused CPU encoder" if reason is None else f"the PyTorch path ({reason})"))

    dense = build("llama_tiny", "none", total)
    if not args.skip_uncached:
        cached, uncached, ratio = paired(lambda: tokens_per_second(dense, prompt, args.new, True),
                                         lambda: tokens_per_second(dense, prompt, args.new, False), args.repeats)
        print(f"cached vs uncached (neuron=none): {cached:8.1f} vs {uncached:8.1f} tokens/s = "
              f"{ratio:5.2f}x (target >= 5)")
        spiking = build("llama_tiny", "ternary_attention", total)
        cached, uncached, ratio = paired(lambda: tokens_per_second(spiking, prompt, args.new, True),
                                         lambda: tokens_per_second(spiking, prompt, args.new, False), args.repeats)
        print(f"cached vs uncached (neuron=ternary_attention): {cached:8.1f} vs {uncached:8.1f} tokens/s = "
              f"{ratio:5.2f}x (target >= 5)")
    for neuron in args.spiking:
        model = build("llama_tiny", neuron, total)
        fast, base, ratio = paired(lambda: tokens_per_second(model, prompt, args.new, True, decode_only=True),
                                   lambda: tokens_per_second(dense, prompt, args.new, True, decode_only=True),
                                   args.repeats)
        print(f"decode neuron={neuron} vs none: {fast:8.1f} vs {base:8.1f} tokens/s = {ratio:5.3f} (target >= 0.8)")

    from spikellm.models.llama import KVCache

    recurrent = build("matmulfree_tiny", "bitnet", max(args.lengths))
    with torch.inference_mode():  # first calls allocate thread pools and caches: not the state
        recurrent.step(torch.zeros(1, dtype=torch.long))
    llama = build("llama_tiny", "none", max(args.lengths))
    print("tokens   MatMul-free state   RSS (MiB)   LLaMA KV cache")
    with torch.inference_mode():
        for length in args.lengths:
            ids = torch.randint(0, 2048, (1, length))
            state = None
            before = rss_mib()
            for t in range(length):  # token by token, as decoding runs
                _, state = recurrent.step(ids[:, t], state)
            state_bytes, after = sum(s.numel() * s.element_size() for s in state), rss_mib()
            cache = KVCache.empty(len(llama.layers))
            llama(ids, cache=cache)
            print(f"{length:6d}   {state_bytes:10,d} B   {after:9.1f} (+{after - before:.1f})   "
                  f"{cache.nbytes():12,d} B")


if __name__ == "__main__":
    main()
