"""GPTQ over a whole model, block after block (SpikeLLM's GPTQ pipeline; DESIGN.md §5).

Block ``i``'s calibration inputs are the outputs of blocks ``< i`` already quantized (weights and
spike encoders on), as in GPTQ's sequential loop: every linear layer of the block accumulates the
Hessian of its inputs over the calibration batches, is quantized against it, and the block is
then re-run to produce the next block's inputs.
"""
from __future__ import annotations

import logging

import torch
from rich.progress import track
from torch import Tensor, nn

from spikellm.errors import ConfigError
from spikellm.nn.spiking_linear import SpikingLinear
from spikellm.posttrain.blocks import capture_block_inputs, decoder_blocks, observe_inputs, run_block
from spikellm.quant.gptq import LayerHessian
from spikellm.quant.weights import RoundToNearest

log = logging.getLogger(__name__)


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


@torch.no_grad()
def gptq_model(model: nn.Module, samples: Tensor, grid=None, block_size: int = 128, percdamp: float = 0.01,
               act_order: bool = True, batch_size: int = 1) -> dict[str, float]:
    """Quantize every SpikingLinear in the decoder blocks of ``model`` with GPTQ, block by block.

    ``grid`` is the quantizer every layer rounds onto; None uses each layer's own
    ``weight_quantizer``. Afterwards each layer holds its quantized weight and no quantizer.
    Returns ``{layer name: relative output error ||X(W - Q)ᵀ||² / ||XWᵀ||²}`` on the calibration
    inputs, the figure GPTQ minimizes.
    """
    was_training = model.training
    model.eval()
    errors: dict[str, float] = {}
    try:
        inputs = capture_block_inputs(model, samples, batch_size)
        for index, block in enumerate(track(decoder_blocks(model), description="GPTQ, block by block", transient=True)):
            layers = {name: m for name, m in block.named_modules() if isinstance(m, SpikingLinear)}
            if not layers:
                raise ConfigError("model", type(model).__name__, "has no SpikingLinear in its blocks: spikify it first")
            grids = {name: _grid_of(f"block {index} {name}", layer, grid) for name, layer in layers.items()}
            hessians = {name: LayerHessian(layer) for name, layer in layers.items()}
            observe_inputs(block, inputs, {name: hessian.add for name, hessian in hessians.items()})
            for name, layer in layers.items():
                original = layer.weight.detach().clone().double()
                layer.weight_quantizer = None
                hessians[name].quantize(grids[name], block_size=block_size, percdamp=percdamp, act_order=act_order)
                H = hessians[name].accumulator.hessian
                delta = original - layer.weight.double()
                errors[f"{index}.{name}"] = float(torch.einsum("oi,ij,oj->", delta, H, delta)
                                                  / torch.einsum("oi,ij,oj->", original, H, original).clamp_min(1e-30))
            inputs.hidden = [run_block(block, inputs, i) for i in range(len(inputs.hidden))]
            log.info("GPTQ block %d: mean relative output error %.3g", index,
                     sum(errors[f"{index}.{n}"] for n in layers) / len(layers))
    finally:
        model.train(was_training)
    return errors
