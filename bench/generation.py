"""Generation speed on the CPU: the KV cache, spiking decoding, the MatMul-free LM's constant memory.

    OMP_NUM_THREADS=1 python bench/generation.py [--new 256] [--prompt 16] [--batch 1] [--repeats 3]
                                                 [--spiking ternary ternary_attention] [--lengths 64 256 1024]

The model of ``model=llama_tiny`` (dim 256, 4 layers, GQA 8/4 heads; ``max_seq_len`` raised to
fit the prompt and the new tokens) with random weights (speed does not depend on them), greedy.

* cached vs uncached: :func:`spikellm.generation.generate` with its KV cache against rerunning the
  whole sequence every step, ``--new`` tokens each (target >= 5x);
* spiking vs dense decoding: each ``--spiking`` neuron group against ``neuron=none``, cached
  decoding steps only (the model's forward on one new token; the prefill and the sampling, the
  same for both, excluded; target >= 0.8). The dense model reads the spiking model's own weight
  tensors (separately allocated copies alone moved dense-vs-dense by up to 8 %), and the two
  models' steps interleave token by token (each pair in alternating order), so the cores' drift
  hits both alike; the ratio is the median over the pairs of steps;
* memory: the MatMul-free LM (``model=matmulfree_tiny``, ``neuron=bitnet``) after 64/256/1024
  tokens: its recurrent state's bytes and the process's resident memory, beside the LLaMA's KV
  cache bytes at the same lengths.

Cached against uncached, timed runs alternate pair by pair (A, B, A, B, ...) and the ratio is the
median of the pairs' ratios, so the shared cores' drift hits both sides alike. The first line says whether the encoders
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


def tokens_per_second(model, prompt, new: int, use_cache: bool) -> float:
    """Generated tokens per second of :func:`spikellm.generation.generate`, the prefill included."""
    from spikellm.generation import generate

    start = time.perf_counter()
    result = generate(model, prompt, max_new_tokens=new, use_cache=use_cache)
    seconds = time.perf_counter() - start
    assert all(len(t) == new for t in result.tokens)
    return prompt.shape[0] * new / seconds


def share_weights(dense, spiking) -> None:
    """Point every parameter of ``dense`` at ``spiking``'s tensor of the same name (same shapes)."""
    tensors = dict(spiking.named_parameters())
    for name, _ in list(dense.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        setattr(dense.get_submodule(owner), leaf, tensors[name])


def decode_step_ratio(spiking, dense, prompt, new: int, repeats: int) -> tuple[float, float, float]:
    """``(spiking ms/step, dense ms/step, median over step pairs of dense time / spiking time)``
    for ``new - 1`` cached steps after the prompt, ``repeats`` sequences, steps interleaved."""
    from spikellm.models.llama import KVCache

    models = {"spiking": spiking, "dense": dense}
    seconds = {name: [] for name in models}
    with torch.inference_mode():
        for repeat in range(repeats + 1):  # the first sequence warms up
            caches = {name: KVCache.empty(len(model.layers)) for name, model in models.items()}
            tokens = {name: model(prompt, state=caches[name])[:, -1:].argmax(-1) for name, model in models.items()}
            steps = {name: [] for name in models}
            for step in range(new - 1):
                for name in ("spiking", "dense") if step % 2 else ("dense", "spiking"):
                    start = time.perf_counter()
                    logits = models[name](tokens[name], state=caches[name])
                    tokens[name] = logits[:, -1:].argmax(-1)
                    steps[name].append(time.perf_counter() - start)
            if repeat:
                for name in models:
                    seconds[name] += steps[name]
    pairs = [d / s for s, d in zip(seconds["spiking"], seconds["dense"])]
    return (1e3 * statistics.median(seconds["spiking"]), 1e3 * statistics.median(seconds["dense"]),
            statistics.median(pairs))


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
          f"prompt {args.prompt}, {args.new} new tokens, greedy; {args.repeats} repeats")
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
        same_weights = build("llama_tiny", "none", total)
        share_weights(same_weights, model)
        spiking_ms, dense_ms, ratio = decode_step_ratio(model, same_weights, prompt, args.new, args.repeats)
        print(f"decode neuron={neuron} vs none: {1e3 * args.batch / spiking_ms:8.1f} vs {1e3 * args.batch / dense_ms:8.1f} "
              f"tokens/s ({spiking_ms:.3f} vs {dense_ms:.3f} ms per step) = {ratio:5.3f} (target >= 0.8)")

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
