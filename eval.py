"""Evaluate a checkpoint: ``python eval.py ckpt=<path> [tasks=[...]] [neuron=<name>]``.

Examples::

    python eval.py ckpt=outputs/train/<time>/checkpoints/last.ckpt
    python eval.py ckpt=<ckpt> tasks=[tiny_mc] perplexity.datasets=[pydoc,wikitext2]
    python eval.py ckpt=/path/to/hf_llama neuron=ternary   # spikify a Hugging Face model on the fly
    python eval.py ckpt=<dense ckpt> export_hf=models/tiny_hf  # also save it as a HF LLaMA to convert
    python eval.py ckpt=outputs/.../spiking_model           # a model converted by train.py experiment=...
"""
from spikellm.entry_points import evaluate

if __name__ == "__main__":
    evaluate()
