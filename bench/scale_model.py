"""A model of TinyLlama-1.1B's shape with random weights, saved as a user downloads one.

    python bench/scale_model.py --out DIR [--layers 22]

22 layers, dim 2048, ffn 5632, 32 heads / 4 KV heads, vocabulary 32,000, untied head, 2,048
positions; random weights (N(0, 0.02), as ``transformers`` initialises them) written by
``save_pretrained(max_shard_size="500MB")`` in bf16 beside a byte-level BPE trained on the pydoc
corpus (no hub: nothing is downloaded). ``--layers 4`` gives the 4-layer slice of the same width.
The weights never exist twice: the model is built in bf16 and saved shard by shard.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, rope_theta=10000.0)


def build_model_dir(out: Path, layers: int = 22, seed: int = 0) -> Path:
    """Write the model (``layers`` blocks of TinyLlama's width) and its tokenizer to ``out``, once."""
    import torch
    import transformers

    from spikellm.io import atomic_directory
    from spikellm.data.corpus import load_documents
    from spikellm.data.tokenizer import build_tokenizer

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    started = time.perf_counter()
    config = transformers.LlamaConfig(**{**TINYLLAMA, "num_hidden_layers": layers})
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = torch.bfloat16
    tokenizer = build_tokenizer(load_documents("pydoc"), vocab_size=32000)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, max_shard_size="500MB")
        tokenizer.save(tmp)
    parameters = sum(p.numel() for p in model.parameters())
    print(json.dumps({"dir": str(out), "layers": layers, "parameters": parameters,
                      "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
                      "seconds": round(time.perf_counter() - started, 1)}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=22)
    args = parser.parse_args()
    build_model_dir(args.out, args.layers)


if __name__ == "__main__":
    main()
