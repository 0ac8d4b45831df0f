"""GPTQ over a whole model, block after block (SpikeLLM's GPTQ pipeline; DESIGN.md §5).

Block ``i``'s calibration inputs are the outputs of blocks ``< i`` already quantized (weights and
spike encoders on), as in GPTQ's sequential loop. For each block, in fp32 while the rest of the
model stays in its stored dtype (:func:`~spikellm.nn.storage.materialized`):

1. one pass over the calibration batches accumulates the Hessian of each distinct input (q/k/v
   read the same tensor and share one Hessian, gate/up another: 4 per LLaMA block, not 7);
2. each projection is quantized against its Hessian and keeps the result as packed integers
   (:class:`~spikellm.nn.packed.PackedWeight`): its store from then on;
3. a second pass produces the next block's inputs.

A :class:`BlockResume` lets a conversion save each finished block and start again at the next.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from spikellm.errors import ConfigError
from spikellm.nn.packed import PackedWeight, format_for
from spikellm.nn.spiking_linear import SpikingLinear
from spikellm.nn.storage import compute_in, materialized, release_memory
from spikellm.posttrain.blocks import BlockResume, capture_block_inputs, decoder_blocks, observe_inputs, run_block
from spikellm.progress import progress_bar
from spikellm.quant.gptq import HessianAccumulator, LayerHessian
from spikellm.quant.weights import RoundToNearest

log = logging.getLogger(__name__)


@dataclass
class BlockTimes:
    """Where a block's time goes: the calibration forward passes, Hessian accumulation, the
    column loop (inversion included), in seconds."""

    forward: float = 0.0
    hessian: float = 0.0
    quantize: float = 0.0

    def as_dict(self) -> dict:
        return {"forward_s": round(self.forward, 3), "hessian_s": round(self.hessian, 3),
                "quantize_s": round(self.quantize, 3)}


def _grid_of(name: str, layer: SpikingLinear, grid):
    """The grid GPTQ rounds ``layer`` onto: the stage's, else the layer's own weight quantizer."""
    own = layer.weight_quantizer
    if grid is not None and own is not None:
        raise ConfigError("convert.stages.gptq.grid", type(grid).__name__,
                          f"and neuron.weight_quantizer ({type(own).__name__}) are both set; keep one (GPTQ replaces "
                          "the layer's quantizer by its own result)")
    chosen = grid if grid is not None else own
    if chosen is None:
        raise ConfigError("convert.stages.gptq.grid", None, f"{name} has no weight grid: set the stage's grid "
                                                            "(RoundToNearest, TernaryAbsMean, TernaryGIFGrid) or "
                                                            "neuron.weight_quantizer")
    if not (isinstance(chosen, RoundToNearest) or hasattr(chosen, "column_grid")):
        raise ConfigError("convert.stages.gptq.grid", type(chosen).__name__,
                          "GPTQ rounds onto RoundToNearest, TernaryAbsMean or TernaryGIFGrid")
    return chosen


class SharedHessians:
    """One :class:`LayerHessian` per projection, sharing an accumulator among projections that
    are called with the very same input tensor (and rotation) in the first calibration batch."""

    def __init__(self, layers: dict[str, SpikingLinear], dtype: torch.dtype, times: BlockTimes):
        self.layers, self.dtype, self.times = layers, dtype, times
        self.hessians: dict[str, LayerHessian] = {}
        # the first batch's inputs, by identity: held (so that no later tensor takes their place
        # in memory, as a freed input's address would) until the grouping is decided
        self._first_batch: dict[int, tuple[Tensor, bool, HessianAccumulator]] | None = {}
        self._leaders: set[str] = set()

    def observer(self, name: str) -> Callable[[Tensor], None]:
        layer = self.layers[name]

        def see(x: Tensor) -> None:
            began = time.perf_counter()
            if self._first_batch is not None:  # the first batch decides who shares: the very same tensor
                seen = self._first_batch.get(id(x))
                shared = seen[2] if seen is not None and seen[0] is x and seen[1] == bool(layer.rotate) else None
                self.hessians[name] = LayerHessian(layer, shared, dtype=self.dtype)
                if shared is None:
                    self._first_batch[id(x)] = (x, bool(layer.rotate), self.hessians[name].accumulator)
                    self._leaders.add(name)
            if name in self._leaders:
                self.hessians[name].add(x)
            self.times.hessian += time.perf_counter() - began

        return see

    def batch_done(self) -> None:
        self._first_batch = None

    @property
    def distinct(self) -> int:
        return len(self._leaders)


def _pack(result, grid) -> PackedWeight:
    fmt = format_for(grid.max_int) if isinstance(grid, RoundToNearest) else None
    return PackedWeight.from_integers(result.integers, result.scales, result.group_index, fmt=fmt)


@torch.no_grad()
def gptq_block(block: nn.Module, index: int, inputs, grid, options: dict, hessian_dtype: torch.dtype,
               advance: Callable[[float], None], times: BlockTimes) -> tuple[dict[str, float], int]:
    """Quantize every SpikingLinear of ``block`` (already in fp32) against the Hessians of its
    calibration ``inputs``; each keeps packed integers and loses its quantizer. Returns
    ``({name: relative output error}, distinct Hessians)``: ``(W - Q) H' (W - Q)ᵀ / W H' Wᵀ`` on
    the damped Hessian H' that GPTQ minimizes, over up to ``ERROR_ROWS`` output rows."""
    layers = {name: m for name, m in block.named_modules() if isinstance(m, SpikingLinear)}
    if not layers:
        raise ConfigError("model", type(block).__name__, "has no SpikingLinear in its blocks: spikify it first")
    grids = {name: _grid_of(f"block {index} {name}", layer, grid) for name, layer in layers.items()}
    hessians = SharedHessians(layers, hessian_dtype, times)
    began = time.perf_counter()

    def batch_done(_):
        hessians.batch_done()
        advance(1)

    observe_inputs(block, inputs, {name: hessians.observer(name) for name in layers}, after_batch=batch_done)
    times.forward += time.perf_counter() - began - times.hessian
    began = time.perf_counter()
    # the reported error's denominator needs each Hessian, which is freed as soon as it is inverted
    rows = {name: _sample_rows(layer.out_features) for name, layer in layers.items()}
    energy = {name: _output_energy(layer.weight.detach()[rows[name]].float(), hessians.hessians[name].accumulator.hessian,
                                   options["percdamp"]) for name, layer in layers.items()}
    errors = {}
    last_reader = {id(hessians.hessians[name].accumulator): name for name in layers}
    times.quantize += time.perf_counter() - began
    for name, layer in layers.items():
        began = time.perf_counter()
        layer_hessian = hessians.hessians[name]
        accumulator = layer_hessian.accumulator
        last = last_reader[id(accumulator)] == name
        layer.weight_quantizer = None
        result = layer_hessian.quantize(grids[name], release=True, **options)
        layer.packed = _pack(result, grids[name])
        errors[name] = float(result.row_loss[rows[name]].sum() / energy[name])
        if last:  # no other layer reads this input: its Hessian and inverse go
            accumulator.free()
        times.quantize += time.perf_counter() - began
        advance(1)
    return errors, hessians.distinct


ERROR_ROWS = 128  # output rows the reported error is measured on: O(rows · in²), not O(out · in²)


def _sample_rows(out_features: int) -> Tensor:
    """Evenly spaced output rows (all of them when there are few)."""
    if out_features <= ERROR_ROWS:
        return torch.arange(out_features)
    return torch.linspace(0, out_features - 1, ERROR_ROWS).round().long()


def _output_energy(weight: Tensor, hessian: Tensor, percdamp: float) -> Tensor:
    """``W H' Wᵀ`` summed, on the damped Hessian ``H' = H + percdamp · mean(diag H) · I``, for the
    rows given: the denominator of the relative error (GPTQ's ``row_loss`` is on H' too)."""
    H = hessian.float()
    damp = percdamp * torch.diag(H).mean()
    return ((weight @ H) * weight).sum() + damp * weight.square().sum()


@torch.no_grad()
def gptq_model(model: nn.Module, samples: Tensor, grid=None, block_size: int = 128, percdamp: float = 0.01,
               act_order: bool = True, batch_size: int = 1, hessian_dtype: torch.dtype = torch.float32,
               resume: BlockResume | None = None) -> dict[str, float]:
    """Quantize every SpikingLinear in the decoder blocks of ``model`` with GPTQ, block by block.

    ``grid`` is the quantizer every layer rounds onto; None uses each layer's own
    ``weight_quantizer``. Afterwards each layer holds its quantized weight, its integers and
    scales in ``packed``, and no quantizer. A model stored in another dtype (bf16) computes each
    block in fp32 and keeps the quantized ones packed. Returns ``{layer name: relative output
    error ||X(W - Q)ᵀ||² / ||XWᵀ||²}`` on the calibration inputs, the figure GPTQ minimizes.
    ``resume``: start at a later block (and report each finished one). The errors are measured
    on up to ``ERROR_ROWS`` evenly spaced output rows of each layer (all rows of a small layer).
    """
    was_training = model.training
    model.eval()
    resume = resume or BlockResume()
    blocks = decoder_blocks(model)
    errors: dict[str, float] = {}
    for index, info in sorted(resume.infos.items()):
        errors.update({f"{index}.{name}": value for name, value in info.get("errors", {}).items()})
    options = dict(block_size=block_size, percdamp=percdamp, act_order=act_order)
    try:
        with compute_in(model, blocks):
            inputs = capture_block_inputs(model, samples, batch_size)
        if resume.hidden is not None:
            inputs.hidden = resume.hidden
        batches = len(inputs.hidden)
        per_block = 2 * batches + sum(isinstance(m, SpikingLinear) for m in blocks[0].modules())
        with progress_bar(f"GPTQ, {len(blocks)} blocks", total=len(blocks) * per_block) as advance:
            advance(resume.start * per_block)
            for index in range(resume.start, len(blocks)):
                block, times = blocks[index], BlockTimes()
                with materialized(block):
                    block_errors, distinct = gptq_block(block, index, inputs, grid, options, hessian_dtype,
                                                        advance, times)
                    began = time.perf_counter()
                    hidden = []
                    for i in range(batches):
                        hidden.append(run_block(block, inputs, i))
                        advance(1)
                    times.forward += time.perf_counter() - began
                inputs.hidden = hidden
                release_memory()
                errors.update({f"{index}.{name}": value for name, value in block_errors.items()})
                info = {"errors": block_errors, "hessians": distinct, **times.as_dict()}
                resume.infos[index] = info
                if resume.done is not None:  # saved before it is reported: a block said done is kept
                    resume.done(index, block, hidden, info)
                log.info("GPTQ block %d/%d: mean relative output error %.3g; %d Hessians; %.1f s forward, "
                         "%.1f s Hessians, %.1f s quantizing", index + 1, len(blocks),
                         sum(block_errors.values()) / len(block_errors), distinct, times.forward, times.hessian,
                         times.quantize)
    finally:
        model.train(was_training)
    return errors
