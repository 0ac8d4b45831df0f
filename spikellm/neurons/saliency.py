"""Optimal Brain Spiking: saliency-based per-input-channel step allocation (DESIGN.md §3.5).

SpikeLLM (Xing et al., arXiv 2407.04752) gives the few input channels of a linear layer that matter
most ``2^addbit`` times more steps (``Δ/m``, counts up to ``m`` times larger, ``m = 2^addbit``),
and all other channels the base steps, so the average spike length stays close to the base one.
The salient channels are found once on calibration data:

1. :func:`channel_saliency` — ``s_j = mean_tokens( x ⊙ (x Wᵀ W) )_j`` per input channel;
2. :class:`SaliencyAccumulator` — forward pre-hooks summing ``s`` over calibration batches;
3. :func:`allocate_steps` — the top ``1 - low_p`` channels of every encoded layer get the extra
   steps (:meth:`SpikeEncoder.allocate_channels`, a buffer saved with the model);
4. :func:`average_steps` — the mean number of steps over all encoded channels, to compare an
   allocation with uniform steps at the same average.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from spikellm.checks import check_float, check_int
from spikellm.errors import ConfigError, DataError
from spikellm.ops.hooks import HookSet

Batch = Tensor | tuple | list
Forward = Callable[[nn.Module, Batch], object]


def _saliency_sum(x: Tensor, weight: Tensor) -> tuple[Tensor, int]:
    """``(Σ_tokens x ⊙ (x Wᵀ W) [C_in] in fp64, number of tokens)`` for ``x [..., C_in]``."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ConfigError("x", tuple(x.shape), f"last dim must be the C_in={weight.shape[-1]} of weight "
                                                f"{tuple(weight.shape)} ([C_out, C_in])")
    # fp32 at least (fp16/bf16 activations overflow or lose the small channels), fp64 if given;
    # the sum over tokens is kept in fp64 so many batches add up without drift
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    tokens = x.detach().reshape(-1, x.shape[-1]).to(dtype)
    w = weight.detach().to(dtype)
    # (x Wᵀ) W, never Wᵀ W: O(tokens · C_out) temporaries instead of a [C_in, C_in] matrix
    grad = (tokens @ w.T) @ w
    return (tokens * grad).sum(0, dtype=torch.float64), tokens.shape[0]


def channel_saliency(x: Tensor, weight: Tensor) -> Tensor:
    """Saliency of each input channel of a linear layer: ``mean_tokens( x ⊙ (x Wᵀ W) )`` ``[C_in]``.

    Args:
        x: ``[..., C_in]`` float activations (the layer's input before any encoder); every leading
            dim is a token.
        weight: ``[C_out, C_in]``, the weight the layer multiplies by.

    What it measures (SpikeLLM, arXiv 2407.04752, Optimal Brain Spiking: activations by a
    first-order, gradient metric; weights, in the GPTQ pipeline, by the Hessian). With ``y = x Wᵀ``
    and ``H = Wᵀ W`` — the Hessian of the layer's reconstruction loss ``‖δ Wᵀ‖²`` in the input,
    as in Optimal Brain Surgeon — ``x H`` is the gradient of ``½‖y‖²``, so
    ``s_j = x_j · ∂(½‖y‖²)/∂x_j`` is the first-order Taylor term of removing channel ``j``, and the
    channels share the output energy exactly: ``Σ_j s_j = ‖y‖²`` (Euler, a quadratic form). Its
    diagonal part ``x_j² H_jj = ‖x_j W_:,j‖²`` is the OBS loss of deleting channel ``j``; the rest
    credits what channel ``j`` adds to, or cancels of, the other channels through ``H``.

    Sign: **no absolute value**; the signed mean is returned and the largest values are salient,
    as in the reference implementation (``SpikeQuantLinear.add_batch``/``get_channel_mask`` of the
    SpikeLLM code: the per-token ``grad * inp`` is averaged over tokens and the channels below the
    ``low_p`` quantile of the signed mean are the low ones). Averaged over tokens the diagonal,
    non-negative term dominates a channel of large activations; a negative mean means the
    channel mostly cancels the output of others, and ``|·|`` would promote exactly those.
    """
    total, count = _saliency_sum(x, weight)
    if count == 0:
        raise DataError("channel_saliency got no tokens: x has a zero-sized leading dim")
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    return (total / count).to(dtype)


def _encoded_linears(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: layer}`` of every SpikingLinear with an encoder (a bare layer is named "").

    A SpikingLinear is told by what it has, ``effective_weight`` (only it defines one) and an
    ``encoder``, not by its class: ``spikellm.nn`` sits above this layer and is not imported."""
    layers = {name: m for name, m in model.named_modules()
              if callable(getattr(m, "effective_weight", None)) and getattr(m, "encoder", None) is not None}
    if not layers:
        raise ConfigError("model", type(model).__name__,
                          "has no SpikingLinear with an encoder: Optimal Brain Spiking allocates the steps of "
                          "spike encoders, build the model with an encoder (e.g. encoder=TernaryEncoder)")
    return layers


class SaliencyAccumulator(HookSet):
    """Sums :func:`channel_saliency` of every encoded SpikingLinear of ``model`` over calibration batches.

    A forward pre-hook on each layer sees its float input before the encoder (``[..., C_in]``) and
    adds ``Σ_tokens x ⊙ (x Wᵀ W)`` with the layer's :meth:`~SpikingLinear.effective_weight` to an
    fp64 ``[C_in]`` sum, with a token count: O(C_in) memory per layer, no activation is stored.
    Use it as a context manager (hooks removed on exit) or call :meth:`remove`.
    """

    def __init__(self, model: nn.Module):
        self.layers = _encoded_linears(model)
        self.sums: dict[str, Tensor] = {}
        self.tokens: dict[str, int] = dict.fromkeys(self.layers, 0)
        super().__init__()
        self._handles = [layer.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                         for name, layer in self.layers.items()]

    def _hook(self, name: str):
        def hook(layer: nn.Module, args: tuple, kwargs: dict):
            x = args[0] if args else kwargs["x"]  # SpikingLinear.forward(x), positional or keyword
            with torch.no_grad():  # calibration inside a training step must not build a graph
                total, count = _saliency_sum(x, layer.effective_weight())
            self.sums[name] = total if name not in self.sums else self.sums[name] + total
            self.tokens[name] += count
        return hook

    def saliency(self) -> dict[str, Tensor]:
        """``{layer name: [C_in] fp64 mean saliency}``; every layer must have seen tokens."""
        unseen = [name for name, count in self.tokens.items() if count == 0]
        if unseen:
            raise DataError(f"no calibration tokens reached {len(unseen)} encoded layer(s), e.g. {unseen[0]!r}: "
                            "the forward must run every SpikingLinear at least once")
        means = {name: self.sums[name] / self.tokens[name] for name in self.layers}
        bad = [name for name, s in means.items() if not torch.isfinite(s).all()]
        if bad:
            raise DataError(f"the saliency of {bad[0]!r} is not finite: the calibration activations overflow")
        return means


def _default_forward(model: nn.Module, batch: Batch):
    """``model(input_ids)``; an ``(inputs, targets)`` pair is run on its inputs."""
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


def salient_count(channels: int, low_p: float) -> int:
    """Channels marked salient: ``ceil((1 - low_p) · C)``, at least one when ``low_p < 1``.

    Computed as ``C - floor(low_p · C)`` (the reference keeps ``int(low_p · C)`` low channels),
    with ``low_p · C`` rounded to 9 decimals first so that e.g. ``0.29 · 100 = 28.999…`` is 29.
    """
    salient = channels - math.floor(round(low_p * channels, 9))
    return max(salient, 1) if low_p < 1 else 0


def top_channels(saliency: Tensor, count: int) -> Tensor:
    """``[C]`` bool mask of the ``count`` largest values; ties go to the lower channel index."""
    order = torch.sort(saliency, descending=True, stable=True).indices  # stable: deterministic ties
    mask = torch.zeros(saliency.shape[0], dtype=torch.bool, device=saliency.device)
    mask[order[:count]] = True
    return mask


def allocate_steps(model: nn.Module, batches: Iterable[Batch], low_p: float = 0.9, addbit: int = 1,
                   forward: Forward | None = None, separate: bool = False) -> dict[str, Tensor]:
    """Optimal Brain Spiking: give the salient input channels of every encoded layer more steps.

    Runs ``model`` over ``batches`` in eval mode and under ``torch.no_grad()`` (the training flag
    of every submodule is restored afterwards), computes :func:`channel_saliency` of each
    SpikingLinear with an encoder on its input (the activations the model produces as it runs,
    earlier layers spiking), marks its top :func:`salient_count` channels and calls
    ``encoder.allocate_channels(mask, addbit)``, replacing any previous allocation.

    Args:
        model: any module holding SpikingLinear layers with encoders (a SpikingLlama, or a layer).
        batches: calibration data, ``input_ids [B, T]`` LongTensors or ``(inputs, targets)`` pairs.
        low_p: fraction of channels that keep the base steps (SpikeLLM uses 0.9 or 0.95);
            1 allocates none.
        addbit: the salient channels get ``2^addbit`` times the steps (one or two more bits).
        forward: ``forward(model, batch)`` to run a batch, for models called another way.
        separate: the salient channels and the others take their per-token step bounds apart
            (see :meth:`SpikeEncoder.element_step`), as SpikeLLM's per-cluster quantizer does.

    Returns:
        ``{layer name: [C_in] bool mask of the salient channels}`` (a bare layer is named "").
    """
    low_p = check_float("low_p", low_p, 0.0, 1.0)
    addbit = check_int("addbit", addbit, 0, 8)
    layers = _encoded_linears(model)
    forward = forward or _default_forward
    modes = {module: module.training for module in model.modules()}
    seen = 0
    model.eval()  # no dropout, and the statistics the model will infer with
    try:
        with torch.no_grad(), SaliencyAccumulator(model) as accumulator:
            for batch in batches:
                forward(model, batch)
                seen += 1
    finally:
        for module, training in modes.items():
            module.training = training
    if seen == 0:
        raise DataError("allocate_steps got no calibration batches: pass a non-empty iterable of input_ids "
                        "(or (inputs, targets) pairs); an exhausted iterator is empty too")
    masks = {}
    for name, saliency in accumulator.saliency().items():
        layer = layers[name]
        mask = top_channels(saliency, salient_count(saliency.shape[0], low_p)).to(layer.weight.device)
        layer.encoder.allocate_channels(mask, addbit, separate)
        masks[name] = mask
    return masks


def average_steps(model: nn.Module) -> float:
    """Mean over all encoded input channels of the steps each one uses.

    A channel with step multiplier ``m`` (``channel_scale``, 1 when unallocated) fires counts up
    to ``max_count · m`` and needs ``encoder.steps_for(max_count · m)`` steps (``max_count`` is the
    larger of ``|min_count|`` and ``|max_count|``, as in :attr:`SpikeEncoder.num_steps`). E.g.
    ternary 4-bit (T = 7) with 10% of the channels at ``addbit=1``: ``0.9 · 7 + 0.1 · 14 = 7.7``.
    """
    total, channels = 0.0, 0
    for layer in _encoded_linears(model).values():
        encoder = layer.encoder
        bound = max(abs(encoder.min_count), abs(encoder.max_count))
        scale = encoder.channel_scale
        if scale is None:
            total += encoder.steps_for(bound) * layer.in_features
            channels += layer.in_features
            continue
        values, counts = torch.unique(scale, return_counts=True)  # a few distinct multipliers
        total += sum(encoder.steps_for(int(bound * v)) * int(c) for v, c in zip(values.tolist(), counts.tolist()))
        channels += scale.numel()
    return total / channels
