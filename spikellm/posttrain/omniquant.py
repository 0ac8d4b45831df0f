"""OmniQuant-style block-wise calibration (SpikeLLM's W4A4 pipeline; DESIGN.md §5).

Each decoder block is calibrated on its own, in network order, to make its quantized output (spike
encoders on every projection input, int-b weights) match the floating-point block's output on the
same inputs (MSE), with two kinds of learnable parameters trained by AdamW and then folded into
the weights, so the calibrated model is an ordinary spiking model with nothing extra to run:

- **LWC**, learnable weight clipping (:class:`LearnableClipping`): the int-b grid of each output
  channel (or group) spans ``sigmoid(c) · max|W|`` instead of ``max|W|``;
- **LET**, learnable equivalent transformations (:class:`SmoothingScales`): per-channel scales
  ``s`` moved from the activations into the weights where the block computes the same function
  in floating point: ``norm(x)/s`` into ``W_{q,k,v}·s`` and ``W_{gate,up}·s``, ``v/s`` into
  ``W_o·s``, and ``up/s`` into ``W_down·s`` (``silu(gate) ⊙ up`` is linear in ``up``). Channel
  outliers of the activations shrink, so the spike encoders' per-token steps resolve the rest.

The inputs of block ``i`` are the outputs of the already-calibrated blocks ``< i``. After every
epoch the block's calibration MSE is measured and the best parameters (the starting ones
included) are the ones folded in, so calibration never leaves a block worse than it found it.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from spikellm.checks import check_float, check_int
from spikellm.errors import ConfigError, DataError
from spikellm.nn.spiking_linear import SpikingLinear, fold_weight_quantizers
from spikellm.nn.storage import compute_in, materialized, release_memory
from spikellm.ops.rounding import round_half_up
from spikellm.posttrain.blocks import (BlockInputs, BlockResume, capture_block_inputs, decoder_blocks, floating_point,
                                      observe_inputs, run_block)
from spikellm.quant.weights import RoundToNearest, WeightQuantizer
from spikellm.progress import progress_bar

log = logging.getLogger(__name__)

LET_ARCHITECTURES = ("llama", "mistral", "qwen2")


def _round_ste(x: Tensor) -> Tensor:
    return x + (round_half_up(x) - x).detach()


class LearnableClipping(WeightQuantizer):
    """Symmetric int-b weights whose range is a learned fraction of each row's (group's) max.

    ``scale = sigmoid(clip_logit) · max|W| / (2^(b-1) - 1)``, integers ``round(W / scale)`` clamped
    to ``±(2^(b-1) - 1)``; the round is straight-through, so the loss reaches ``clip_logit``
    through the scale (OmniQuant's LWC, symmetric). ``init=4`` starts at 98.2 % of the max.
    """

    def __init__(self, out_features: int, in_features: int, bits: int = 4, group_size: int | None = None,
                 init: float = 4.0):
        super().__init__()
        self.bits = check_int("bits", bits, 2, 16)
        self.group_size = group_size or in_features
        if in_features % self.group_size:
            raise ConfigError("group_size", group_size, f"must divide the layer width {in_features}")
        self.max_int = 2 ** (self.bits - 1) - 1
        self.clip_logit = nn.Parameter(torch.full((out_features, in_features // self.group_size, 1), float(init)))

    @classmethod
    def like(cls, quantizer: RoundToNearest, weight: Tensor) -> "LearnableClipping":
        """Learnable clipping on the grid of ``quantizer`` (same bits and groups) for ``weight``."""
        return cls(weight.shape[0], weight.shape[1], quantizer.bits, quantizer.group_size).to(weight.device)

    @torch.no_grad()
    def scales_and_integers(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Per-group scales ``[out, groups, 1]`` and integers ``[out, groups, group]``, exactly
        rounded: what folding the clipping stores (RoundToNearest's layout)."""
        out_features, in_features = weight.shape
        grouped = weight.detach().float().reshape(out_features, in_features // self.group_size, self.group_size)
        bound = grouped.abs().amax(dim=-1, keepdim=True) * torch.sigmoid(self.clip_logit.float())
        scale = (bound / self.max_int).clamp_min(1e-8)
        return scale, round_half_up(grouped / scale).clamp(-self.max_int, self.max_int)

    def forward(self, weight: Tensor) -> Tensor:
        out_features, in_features = weight.shape
        grouped = weight.reshape(out_features, in_features // self.group_size, self.group_size)
        bound = grouped.abs().amax(dim=-1, keepdim=True) * torch.sigmoid(self.clip_logit)
        scale = (bound / self.max_int).clamp_min(1e-8)
        return (_round_ste(grouped / scale).clamp(-self.max_int, self.max_int) * scale).reshape(weight.shape)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}"


@dataclass
class _Pair:
    """One place where a per-channel scale moves from activations into weights."""

    name: str
    divide: list[tuple[str, int]]  # (parameter name in the block, dim of the channels): divided by s
    multiply: list[tuple[str, int]]  # multiplied by s (along dim)
    consumer_inputs: str  # the module whose input statistics initialize s
    repeat: int = 1  # the consumer's channels are this many copies of s (GQA: o_proj sees each v head n_rep times)
    head_dim: int = 1


def _linear_names(block: nn.Module) -> dict[str, str]:
    names = {name.rsplit(".", 1)[-1]: name for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    for needed in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        if needed not in names:
            raise ConfigError("model", type(block).__name__, f"block has no {needed}: smoothing (LET) supports "
                                                             f"LLaMA-like blocks ({', '.join(LET_ARCHITECTURES)})")
    return names


def _smoothing_pairs(block: nn.Module) -> list[_Pair]:
    """The four LET pairs of a LLaMA-like block (HF llama/mistral/qwen2 or our SpikingLlama)."""
    n = _linear_names(block)
    params = dict(block.named_parameters())
    for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        if norm not in params:
            raise ConfigError("model", type(block).__name__, f"block has no {norm}: smoothing (LET) supports "
                                                             f"LLaMA-like blocks ({', '.join(LET_ARCHITECTURES)})")
    attn = block.get_submodule(n["o_proj"].rsplit(".", 1)[0])
    head_dim = int(getattr(attn, "head_dim", 0) or 0)
    v, o = block.get_submodule(n["v_proj"]), block.get_submodule(n["o_proj"])
    if head_dim <= 0 or v.out_features % head_dim or o.in_features % v.out_features:
        raise ConfigError("model", type(block).__name__, "attention heads could not be read for v→o smoothing")

    def with_bias(name: str) -> list[tuple[str, int]]:
        bias = f"{name}.bias"
        return [(f"{name}.weight", 0)] + ([(bias, 0)] if bias in params else [])

    return [
        _Pair("qkv", [("input_layernorm.weight", 0)],
              [(f"{n[p]}.weight", 1) for p in ("q_proj", "k_proj", "v_proj")], n["q_proj"]),
        _Pair("gate_up", [("post_attention_layernorm.weight", 0)],
              [(f"{n[p]}.weight", 1) for p in ("gate_proj", "up_proj")], n["gate_proj"]),
        _Pair("v_o", with_bias(n["v_proj"]), [(f"{n['o_proj']}.weight", 1)], n["o_proj"],
              repeat=o.in_features // v.out_features, head_dim=head_dim),
        _Pair("up_down", with_bias(n["up_proj"]), [(f"{n['down_proj']}.weight", 1)], n["down_proj"]),
    ]


def _expand(scale: Tensor, pair: _Pair) -> Tensor:
    """``s`` on the consumer's channels: each v head's scales repeated for its query heads (GQA)."""
    if pair.repeat == 1:
        return scale
    heads = scale.reshape(-1, pair.head_dim)  # [n_kv, head_dim]
    return heads.repeat_interleave(pair.repeat, dim=0).reshape(-1)


def _reduce(channels: Tensor, pair: _Pair) -> Tensor:
    """The consumer's per-channel maxima brought back to ``s``'s channels (max over repeats)."""
    if pair.repeat == 1:
        return channels
    return channels.reshape(-1, pair.repeat, pair.head_dim).amax(dim=1).reshape(-1)


class SmoothingScales(nn.Module):
    """The learnable log-scales of a block's LET pairs, initialized as SmoothQuant:
    ``s = max|X|^α / max|W|^(1-α)`` per channel (X the consumer's input, W its columns)."""

    def __init__(self, block: nn.Module, input_absmax: dict[str, Tensor], alpha: float = 0.5):
        super().__init__()
        self.pairs = _smoothing_pairs(block)
        params = dict(block.named_parameters())
        self.log_scales = nn.ParameterDict()
        for pair in self.pairs:
            weight_max = torch.stack([params[name].detach().abs().amax(dim=0) for name, _ in pair.multiply]).amax(0)
            act_max = _reduce(input_absmax[pair.consumer_inputs], pair)
            weight_max = _reduce(weight_max, pair)
            scale = (act_max.clamp_min(1e-5) ** alpha / weight_max.clamp_min(1e-5) ** (1 - alpha)).clamp(1e-5, 1e5)
            self.log_scales[pair.name] = nn.Parameter(scale.float().log())

    def transformed(self, block_params: dict[str, Tensor]) -> dict[str, Tensor]:
        """The block's parameters with every pair's scale moved across (a function of the scales)."""
        out: dict[str, Tensor] = {}
        for pair in self.pairs:
            scale = self.log_scales[pair.name].exp()
            for name, _ in pair.divide:
                out[name] = out.get(name, block_params[name]) / scale.reshape(-1, *([1] * (block_params[name].dim() - 1)))
            expanded = _expand(scale, pair)
            for name, _ in pair.multiply:
                out[name] = out.get(name, block_params[name]) * expanded  # columns: broadcast on the last dim
        return out


@torch.no_grad()
def _input_absmax(block: nn.Module, inputs: BlockInputs, names: list[str]) -> dict[str, Tensor]:
    maxima: dict[str, Tensor] = {}

    def absmax(name: str, x: Tensor) -> None:
        x = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        maxima[name] = x if name not in maxima else torch.maximum(maxima[name], x)

    with floating_point(block):
        observe_inputs(block, inputs, {name: functools.partial(absmax, name) for name in names})
    return maxima


@dataclass
class BlockResult:
    index: int
    initial_mse: float
    final_mse: float


def calibrate_block(block: nn.Module, inputs: BlockInputs, epochs: int = 20, lwc_lr: float = 1e-2,
                    let_lr: float = 5e-3, lwc: bool = True, let: bool = True, alpha: float = 0.5,
                    index: int = 0, seed: int = 0, advance=None) -> BlockResult:
    """Calibrate one block in place (see the module docstring); returns its output MSE before and
    after. ``advance(1)`` after the targets' pass per batch and after each optimizer step."""
    linears = {name: m for name, m in block.named_modules() if isinstance(m, SpikingLinear)}
    if let and any(m.rotate for m in linears.values()):
        raise ConfigError("convert.stages.block.let", True, "smoothing does not combine with rotate=true "
                                                            "(a rotation mixes the channels it scales); set one off")
    clips = {}
    if lwc:
        for name, layer in linears.items():
            if isinstance(layer.weight_quantizer, RoundToNearest):
                clips[name] = LearnableClipping.like(layer.weight_quantizer, layer.weight)
    scales = SmoothingScales(block, _input_absmax(block, inputs, [p for p in _consumers(block)]), alpha) if let else None
    advance = advance or (lambda amount=1.0: None)
    with torch.no_grad(), floating_point(block):
        targets = []
        for i in range(len(inputs.hidden)):
            targets.append(run_block(block, inputs, i))
            advance(1)

    saved_quantizers = {name: linears[name].weight_quantizer for name in clips}
    requires = {p: p.requires_grad for p in block.parameters()}
    for p in requires:
        p.requires_grad_(False)
    for name, clip in clips.items():
        linears[name].weight_quantizer = clip
    base = {name: p for name, p in block.named_parameters()}

    def forward(i: int) -> Tensor:
        replaced = scales.transformed(base) if scales is not None else {}
        out = functional_call(block, replaced, (inputs.hidden[i], *inputs.args[i]), inputs.kwargs[i], strict=False)
        return out[0] if isinstance(out, (tuple, list)) else out

    def mse() -> float:
        with torch.no_grad():
            return sum(float(F.mse_loss(forward(i).float(), targets[i].float())) for i in range(len(targets))) / len(targets)

    try:
        initial = mse()
        clip_params = [p for c in clips.values() for p in c.parameters()]
        scale_params = list(scales.parameters()) if scales is not None else []
        learned = clip_params + scale_params
        best, best_state = initial, [p.detach().clone() for p in learned]
        groups = [g for g in ({"params": clip_params, "lr": lwc_lr}, {"params": scale_params, "lr": let_lr})
                  if g["params"]]
        if groups and epochs:
            optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
            generator = torch.Generator().manual_seed(seed + index)
            for epoch in range(epochs):
                for i in torch.randperm(len(targets), generator=generator).tolist():
                    loss = F.mse_loss(forward(i).float(), targets[i].float())
                    if not torch.isfinite(loss):
                        raise DataError(f"block {index} calibration diverged at epoch {epoch} (loss {float(loss)}); "
                                        "lower convert.stages.block.lwc_lr / let_lr")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    advance(1)
                current = mse()
                if current < best:  # keep the best epoch (the start included): a step may overshoot
                    best, best_state = current, [p.detach().clone() for p in learned]
        with torch.no_grad():
            for p, value in zip(learned, best_state):
                p.copy_(value)
        final = best
        _fold(block, linears, clips, scales, base)
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
        for name, quantizer in saved_quantizers.items():
            if linears[name].weight_quantizer is clips[name]:  # not folded (an error): put the grid back
                linears[name].weight_quantizer = quantizer
    return BlockResult(index, initial, final)


def _consumers(block: nn.Module) -> list[str]:
    return [pair.consumer_inputs for pair in _smoothing_pairs(block)]


@torch.no_grad()
def _fold(block: nn.Module, linears: dict[str, SpikingLinear], clips: dict[str, LearnableClipping],
          scales: SmoothingScales | None, base: dict[str, Tensor]) -> None:
    """Write the transformed, clipped and quantized weights into the block; drop the grids."""
    if scales is not None:
        for name, value in scales.transformed(base).items():
            base[name].copy_(value)
    for name, clip in clips.items():  # the weight now holds the int-b values themselves, packed
        linears[name].weight_quantizer = clip
        linears[name].fold_weight_quantizer()


def block_calibration(model: nn.Module, samples: Tensor, epochs: int = 20, lwc_lr: float = 1e-2,
                      let_lr: float = 5e-3, lwc: bool = True, let: bool = True, alpha: float = 0.5,
                      batch_size: int = 1, seed: int = 0, resume: BlockResume | None = None) -> list[BlockResult]:
    """Calibrate every decoder block of ``model`` in order on ``samples [N, T]`` (token ids).

    Weights quantized by a :class:`~spikellm.quant.RoundToNearest` get learnable clipping; LET
    needs a LLaMA-like architecture (llama, mistral, qwen2, or our SpikingLlama). Returns each
    block's output MSE against the floating-point block before and after calibration.
    """
    epochs = check_int("epochs", epochs, 0)
    lwc_lr = check_float("lwc_lr", lwc_lr, 0.0, 1.0)
    let_lr = check_float("let_lr", let_lr, 0.0, 1.0)
    alpha = check_float("alpha", alpha, 0.0, 1.0)
    model_type = getattr(getattr(model, "config", None), "model_type", "llama")
    if let and model_type not in LET_ARCHITECTURES:
        raise ConfigError("convert.stages.block.let", True, f"smoothing needs a LLaMA-like model "
                                                            f"({', '.join(LET_ARCHITECTURES)}), not {model_type}; "
                                                            "set let=false")
    was_training = model.training
    model.eval()
    resume = resume or BlockResume()
    results = [BlockResult(i, info["initial_mse"], info["final_mse"]) for i, info in sorted(resume.infos.items())]
    blocks = decoder_blocks(model)
    try:
        with torch.no_grad(), compute_in(model, blocks):
            inputs = capture_block_inputs(model, samples, batch_size)
        if resume.hidden is not None:
            inputs.hidden = resume.hidden
        # a step per epoch and calibration batch, plus the targets' and the outputs' passes
        per_block = (epochs + 2) * len(inputs.hidden)
        with progress_bar(f"block calibration (LWC/LET), {len(blocks)} blocks", len(blocks) * per_block) as advance:
            advance(resume.start * per_block)
            for index in range(resume.start, len(blocks)):
                block = blocks[index]
                with materialized(block):  # fp32 while it learns; the rest of the model as stored
                    with torch.enable_grad():
                        result = calibrate_block(block, inputs, epochs, lwc_lr, let_lr, lwc, let, alpha, index, seed,
                                                 advance)
                    fold_weight_quantizers(block)  # every grid of the block: packed integers from here on
                    with torch.no_grad():
                        hidden = [run_block(block, inputs, i) for i in range(len(inputs.hidden))]
                advance(len(hidden))
                inputs.hidden = hidden
                release_memory()
                results.append(result)
                info = {"initial_mse": result.initial_mse, "final_mse": result.final_mse}
                resume.infos[index] = info
                if resume.done is not None:  # saved before it is reported: a block said done is kept
                    resume.done(index, block, hidden, info)
                log.info("block %d/%d: output MSE %.3g -> %.3g", index + 1, len(blocks), result.initial_mse,
                         result.final_mse)
    finally:
        model.train(was_training)
    if not all(math.isfinite(r.final_mse) for r in results):
        raise DataError("block calibration produced a non-finite output; lower the learning rates")
    return results
