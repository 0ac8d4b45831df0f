"""Running a causal LM one decoder block at a time, as block-wise calibration needs.

:func:`capture_block_inputs` runs the model until its first block and keeps what that block was
called with (hidden states plus whatever else: rotary tables, masks, position ids), one batch of
calibration sequences at a time; :func:`run_block` calls any block on new hidden states with the
rest unchanged. This works for every architecture :func:`~spikellm.models.spikify.spikify` knows
and for our own :class:`~spikellm.models.llama.SpikingLlama`, without knowing their signatures.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from spikellm.errors import DataError
from spikellm.models.hf import causal_lm_logits
from spikellm.models.spikify import decoder_blocks
from spikellm.nn.spiking_linear import SpikingLinear


@dataclass
class BlockResume:
    """Where a block-by-block stage starts (``start``, with the calibration ``hidden`` states
    entering that block and each finished block's ``info``), and ``done(index, block, hidden,
    info)``, called after each block (the conversion writes the block there)."""

    start: int = 0
    hidden: list[Tensor] | None = None
    infos: dict[int, dict] = field(default_factory=dict)
    done: Callable[[int, nn.Module, list[Tensor], dict], None] | None = None


class _Stop(Exception):
    """Raised by the capture hook: nothing after the first block needs to run."""


@dataclass
class BlockInputs:
    """Per calibration batch: the hidden states entering a block, and the other arguments."""

    hidden: list[Tensor]
    args: list[tuple] = field(default_factory=list)  # positional arguments after the hidden states
    kwargs: list[dict] = field(default_factory=list)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, samples: Tensor, batch_size: int = 1) -> BlockInputs:
    """What the first decoder block receives for ``samples [N, T]``, ``batch_size`` rows at a time."""
    if samples.dim() != 2 or samples.shape[0] == 0:
        raise DataError(f"calibration samples must be input_ids [N>0, T], got shape {tuple(samples.shape)}")
    first = decoder_blocks(model)[0]
    captured = BlockInputs(hidden=[])

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.args.append(tuple(args[1:]))
        captured.kwargs.append(dict(kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for start in range(0, samples.shape[0], batch_size):
            try:
                causal_lm_logits(model, samples[start:start + batch_size].to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: BlockInputs, index: int, hidden: Tensor | None = None) -> Tensor:
    """The output hidden states of ``block`` on batch ``index`` (or on ``hidden`` in its place)."""
    hidden = inputs.hidden[index] if hidden is None else hidden
    out = block(hidden, *inputs.args[index], **inputs.kwargs[index])
    return out[0] if isinstance(out, (tuple, list)) else out


def observe_inputs(block: nn.Module, inputs: BlockInputs, observers: dict[str, Callable[[Tensor], None]],
                   after_batch: Callable[[int], None] | None = None) -> None:
    """Run ``block`` over every calibration batch while ``observers[name](x)`` sees the input ``x`` of
    each named submodule (forward pre-hooks, removed afterwards even if a batch fails);
    ``after_batch(i)`` after batch ``i``."""
    handles = [block.get_submodule(name).register_forward_pre_hook(lambda module, args, see=see: see(args[0]))
               for name, see in observers.items()]
    try:
        for i in range(len(inputs.hidden)):
            run_block(block, inputs, i)
            if after_batch is not None:
                after_batch(i)
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def floating_point(module: nn.Module) -> Iterator[None]:
    """Temporarily take the encoders and weight quantizers off every SpikingLinear in ``module``."""
    saved = [(layer, layer.encoder, layer.weight_quantizer) for layer in module.modules()
             if isinstance(layer, SpikingLinear)]
    try:
        for layer, _, _ in saved:
            layer.encoder = layer.weight_quantizer = None
        yield
    finally:
        for layer, encoder, quantizer in saved:
            layer.encoder, layer.weight_quantizer = encoder, quantizer
