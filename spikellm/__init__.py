"""spikellm: spike-driven LLaMA-style language models (import-light: submodules load on use)."""
__version__ = "0.1.0"
