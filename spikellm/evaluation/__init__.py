"""Evaluation: perplexity, zero-shot tasks through lm-eval, energy (models come from spikellm.checkpoints.load_model)."""
