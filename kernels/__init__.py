"""Triton kernels, each beside its pure-PyTorch reference (installed as ``spikellm.kernels``)."""
