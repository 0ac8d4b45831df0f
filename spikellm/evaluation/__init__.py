"""Evaluation: loading checkpoints for evaluation, perplexity, zero-shot tasks through lm-eval."""
