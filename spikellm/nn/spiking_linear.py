"""A linear layer fed by spike trains (DESIGN.md §4)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spikellm.neurons.base import SpikeEncoder
from spikellm.nn.packed import PackedWeight, format_for
from spikellm.ops.hadamard import hadamard_block, hadamard_transform
from spikellm.quant.weights import WeightQuantizer

EncoderFactory = Callable[[], SpikeEncoder]
WeightQuantizerFactory = Callable[[], WeightQuantizer]


class SpikingLinear(nn.Linear):
    """``nn.Linear`` whose input passes through a spike encoder and whose weight through a quantizer.

    With an encoder the layer computes ``Δ · Σ_t w_t (s_t @ Wᵀ)``: additions of weight rows selected
    by spikes. Training runs the collapsed form ``(n · Δ) @ Wᵀ`` (:meth:`forward`), which equals it;
    :meth:`forward_temporal` runs the spike train. ``unroll=True`` trains through the spike train on
    purpose (T matmuls, T× activation memory: the naive way, for comparison and for surrogate
    gradients). ``rotate=True`` encodes ``x H`` against ``W H`` for an orthonormal Hadamard H (same
    output, outliers spread over channels); :meth:`fold_rotation` stores ``W H`` once so inference
    rotates only the activations. With neither an encoder nor a quantizer nor a rotation it is
    exactly ``nn.Linear``.

    ``packed`` (a :class:`~spikellm.nn.packed.PackedWeight`, not a parameter) holds the integers
    and scales of a quantized weight: set by :meth:`fold_weight_quantizer`, by GPTQ and by the
    file readers; ``weight`` then holds their product, so the forward never quantizes again.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 encoder: SpikeEncoder | None = None, weight_quantizer: WeightQuantizer | None = None,
                 unroll: bool = False, rotate: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.encoder = encoder
        self.weight_quantizer = weight_quantizer
        self.unroll = unroll
        self.rotate = rotate
        if rotate:
            hadamard_block(in_features)  # fails now, with the width, if it cannot be rotated
        # whether ``weight`` already holds W H (saved with the model, so loading never rotates twice)
        self.register_buffer("rotation_folded", torch.tensor(False))
        # set by spikellm.nn.kernel_linear.use_kernels on a loaded checkpoint: the Triton path
        self.kernel_forward = None
        self.packed: PackedWeight | None = None

    def effective_weight(self) -> Tensor:
        weight = self.weight
        if self.rotate and not self.rotation_folded:
            weight = hadamard_transform(weight)
        return weight if self.weight_quantizer is None else self.weight_quantizer(weight)

    @torch.no_grad()
    def fold_rotation(self) -> None:
        """Store ``W H`` in ``weight`` (once), as an exported model would."""
        if self.rotate and not self.rotation_folded:
            self.weight.copy_(hadamard_transform(self.weight))
            self.rotation_folded.fill_(True)

    @torch.no_grad()
    def quantized_weight(self) -> PackedWeight | None:
        """The integers and scales of this layer's weight: its :attr:`packed` weight, or what its
        weight quantizer makes of ``weight`` (rotated first when the rotation is not folded yet);
        None for float weights or a grid no packed format holds (over 8 bits, learned clipping)."""
        if self.packed is not None:
            return self.packed
        quantizer = self.weight_quantizer
        fmt = format_for(getattr(quantizer, "max_int", 1 << 30))
        if fmt is None or not hasattr(quantizer, "scales_and_integers"):
            return None
        weight = self.weight
        if self.rotate and not self.rotation_folded:
            weight = hadamard_transform(weight)
        scale, integers = quantizer.scales_and_integers(weight.detach())
        return PackedWeight.from_integers(integers.reshape(self.out_features, -1),
                                          scale.reshape(self.out_features, -1), fmt=fmt)

    @torch.no_grad()
    def fold_weight_quantizer(self) -> None:
        """Quantize ``weight`` once and drop the quantizer, for inference: the forward then reads
        the stored values, bit-identical to what the quantizer gave it every time. Integer grids
        keep their integers and scales in :attr:`packed` (files, kernels)."""
        if self.weight_quantizer is None:
            return
        self.fold_rotation()
        packed = self.quantized_weight()
        value = packed.dequantize() if packed is not None else self.weight_quantizer(self.weight)
        self.weight.copy_(value)
        self.packed, self.weight_quantizer = packed, None

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_forward is not None:
            return self.kernel_forward(self, x)
        if self.rotate:
            x = hadamard_transform(x)
        if self.encoder is None:
            return F.linear(x, self.effective_weight(), self.bias)
        if self.unroll:
            return self._forward_unrolled(x)
        return F.linear(self.encoder(x), self.effective_weight(), self.bias)

    def shares_spikes_with(self, other: "SpikingLinear") -> bool:
        """Whether ``other``, fed the same input, would see the very same spike train: encoders of
        the same settings, no per-layer allocation or learned step, the same rotation, collapsed."""
        a, b = self.encoder, other.encoder
        # cheap checks first: this runs on every forward
        return (a is not None and b is not None and type(a) is type(b)
                and self.kernel_forward is None and other.kernel_forward is None
                and a.channel_scale is None and b.channel_scale is None
                and a.step_scale is None and b.step_scale is None
                and self.rotate == other.rotate and not self.unroll and not other.unroll
                and a.settings() == b.settings())

    def _spike_train(self, x: Tensor):
        """``(spikes [T, ...], element step, outlier counts or None, time weights)``."""
        spikes, step = self.encoder.spike_train(x)
        outliers = self.encoder.outlier_counts(x, step, self.encoder.decode(spikes))
        return spikes, step, outliers, self.encoder.time_weights().tolist()

    @torch.no_grad()
    def forward_temporal(self, x: Tensor) -> Tensor:
        """Spike-train form ``Δ · Σ_t w_t (s_t @ Wᵀ)`` (+ the outlier stream, + bias), fp32.

        A channel's extra steps (``Δ/m``) are folded into W's column, as hardware would store them,
        so a per-token Δ multiplies once, outside a sum of pure additions of weight rows.
        """
        if self.encoder is None:
            return self.forward(x)
        if self.rotate:
            x = hadamard_transform(x)
        spikes, step, outliers, time_weights = self._spike_train(x)
        weight = self.effective_weight().float()
        if self.encoder.channel_scale is not None:
            weight, step = weight / self.encoder.channel_scale, step * self.encoder.channel_scale
        if step.shape[-1] == 1:
            out = step * sum(w_t * (s_t @ weight.T) for w_t, s_t in zip(time_weights, spikes))
        else:  # a step per channel (granularity=channel) cannot leave the sum
            out = sum((w_t * s_t * step) @ weight.T for w_t, s_t in zip(time_weights, spikes))
        if outliers is not None:
            out = out + (outliers * step) @ weight.T
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype)

    def _forward_unrolled(self, x: Tensor) -> Tensor:
        """Train through the spike train: one matmul per time step, each input kept for backward."""
        weight = self.effective_weight()
        with torch.no_grad():
            spikes, step, outliers, time_weights = self._spike_train(x)
            inside = self.encoder.inside_window(x, step)
        out = sum(F.linear((w_t * s_t * step).to(x.dtype), weight) for w_t, s_t in zip(time_weights, spikes))
        if outliers is not None:
            out = out + F.linear((outliers * step).to(x.dtype), weight)
        # terms of value exactly zero that carry the gradients the train cannot: to x, the neuron's
        # surrogate where the encoder simulates one, else straight through the window as the
        # collapsed form; to a learnable step, LSQ through the collapsed form of the detached input
        # (which also records the statistics, as a collapsed forward would)
        surrogate = self.encoder.surrogate_value(x)
        to_input = surrogate - surrogate.detach() if surrogate is not None else (x - x.detach()) * inside
        collapsed = self.encoder(x.detach())
        out = out + F.linear((to_input + (collapsed - collapsed.detach())).to(x.dtype), weight)
        return out if self.bias is None else out + self.bias


def fold_weight_quantizers(model: nn.Module) -> int:
    """:meth:`SpikingLinear.fold_weight_quantizer` on every projection of ``model`` (for inference:
    a loaded model never quantizes a weight again); returns how many were folded."""
    layers = [m for m in model.modules() if isinstance(m, SpikingLinear) and m.weight_quantizer is not None]
    for layer in layers:
        layer.fold_weight_quantizer()
    return len(layers)


def projection_factory(encoder: EncoderFactory | None, weight_quantizer: WeightQuantizerFactory | None,
                       unroll: bool = False, rotate: bool = False) -> Callable[[int, int], SpikingLinear]:
    """``linear(in_features, out_features)``: a :class:`SpikingLinear` with its own encoder and weight
    quantizer from the factories (None: float inputs / float weights), as a model builds each projection."""

    def linear(in_features: int, out_features: int) -> SpikingLinear:
        return SpikingLinear(in_features, out_features, encoder=encoder() if encoder else None,
                             weight_quantizer=weight_quantizer() if weight_quantizer else None,
                             unroll=unroll, rotate=rotate)

    return linear


def shared_input_linears(x: Tensor, layers: Sequence[SpikingLinear]) -> list[Tensor]:
    """The outputs of ``layers`` that read the same ``x`` (q/k/v, gate/up).

    Where their encoders would fire the very same train, ``x`` is encoded once and the train goes
    to every weight matrix, as a chip broadcasts it: one encoding and one saved activation instead
    of one per layer, each layer's statistics still updated. Otherwise each layer runs on its own.
    """
    first, rest = layers[0], layers[1:]
    # layers with hooks (calibration passes, user probes) are called as modules, so hooks see them
    hooked = any(layer._forward_pre_hooks or layer._forward_hooks for layer in layers)
    if hooked or not all(first.shares_spikes_with(layer) for layer in rest):
        return [layer(x) for layer in layers]
    if first.rotate:
        x = hadamard_transform(x)
    encoded = first.encoder(x, siblings=tuple(layer.encoder for layer in rest))
    return [F.linear(encoded, layer.effective_weight(), layer.bias) for layer in layers]
