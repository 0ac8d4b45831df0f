"""How a model's blocks run in training: compiled (``torch.compile``), and with their activations
recomputed in backward (activation checkpointing). Both act on each block in place, so the
model's parameters, their names and its checkpoints stay what they are.

Each block is compiled on its own ("regional compilation"): the blocks of a model are the same
code, so the first compilation serves them all and compile time does not grow with depth.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from spikellm.errors import ConfigError
from spikellm.neurons.observers import recomputing


def blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks of a model: the native models' ``layers``, or those of a Hugging Face
    model (``model.layers``, ``transformer.h``), the first ModuleList holding them."""
    for name in ("layers", "model.layers", "transformer.h", "model.decoder.layers"):
        found = model
        for part in name.split("."):
            found = getattr(found, part, None)
        if isinstance(found, nn.ModuleList) and len(found):
            return found
    raise ConfigError("model", type(model).__name__, "has no list of blocks (layers) to compile or checkpoint")


def compile_blocks(model: nn.Module, mode: str | None = None, backend: str = "inductor") -> int:
    """Compile every block of ``model`` in place (``nn.Module.compile``); returns how many."""
    layers = blocks(model)
    for block in layers:
        block.compile(mode=mode, backend=backend)
    return len(layers)


def checkpoint_blocks(model: nn.Module) -> int:
    """Recompute every block's activations in backward instead of keeping them; returns how many."""
    layers = blocks(model)
    for block in layers:
        if not isinstance(block.__dict__.get("forward"), _Recomputed):
            block.forward = _Recomputed(block)
    return len(layers)


class _Recomputed:
    """A block's own forward whose activations are recomputed in backward, when a gradient is
    wanted. Held in the block's ``__dict__`` (a copy of the model copies it with its block)."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, *args, **kwargs):
        forward = type(self.block).forward.__get__(self.block)
        if not torch.is_grad_enabled():  # evaluation, decoding: nothing is kept for a backward
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)


def _contexts():
    # the forward as it runs, and its recomputation in backward: observers must count a forward once
    return contextlib.nullcontext(), recomputing()
