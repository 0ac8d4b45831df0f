"""The MatMul-free language model (Zhu et al., arXiv 2406.02528) as run on Loihi 2 (arXiv 2503.18002).

A stack of Metaformer blocks, each a token mixer and a channel mixer behind RMSNorms:

* token mixer, the MLGRU: from the normalised input ``x_t``, ``f_t = σ(W_f x_t)``,
  ``c_t = SiLU(W_c x_t)``, ``g_t = W_g x_t``; then ``h_t = f_t ⊙ h_{t-1} + (1 - f_t) ⊙ c_t`` and
  the output ``W_o (RMSNorm(h_t) ⊙ SiLU(g_t))``. The recurrence is element-wise, so there is no
  attention and no matrix product between activations; it runs as one scan over the sequence
  (:mod:`spikellm.kernels.recurrence`), or token by token with a carried state (:meth:`step`);
* channel mixer, a GLU: ``W_down RMSNorm(SiLU(W_gate x) ⊙ W_up x)``.

Every projection is a :class:`SpikingLinear`, so the ``neuron`` group sets its input encoder and
weight quantizer as for the LLaMA: ``neuron=bitnet`` gives the paper's BitLinear (8-bit per-token
absmax activations, as bit-plane spikes, and ternary absmean weights). Every projection input is
RMS-normalised first, as BitLinear does; projections that read the same input share one norm.

:func:`set_hardware_mode` switches a model to the Loihi 2 paper's fixed-point form (see
:mod:`spikellm.quant.fixed_point`): fixed-point activations and recurrent state, table sigmoid and
SiLU, RMSNorm with a shift-and-table inverse square root. Module names follow the LLaMA's where
the roles match (``embed_tokens``, ``layers``, ``norm``, ``lm_head``, ``mlp.{gate,up,down}_proj``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spikellm.checks import check_float, check_int
from spikellm.errors import ConfigError
from spikellm.models.llama import RMSNorm as LlamaRMSNorm
from spikellm.models.llama import init_decoder_weights
from spikellm.nn.spiking_linear import (EncoderFactory, SpikingLinear, WeightQuantizerFactory, projection_factory,
                                         shared_input_linears)
from spikellm.nn.work import RecurrenceWork
from spikellm.quant.fixed_point import HardwareQuant, lut, rsqrt_fixed, to_fixed


@dataclass
class MatMulFreeConfig:
    """Architecture of a MatMul-free LM (validated on construction).

    ``forget_lower_bound``: ``f = b + (1 - b) σ(·)``, HGRN's lower bound on the forget gate (0: none).
    ``max_seq_len`` bounds nothing in the recurrence; it is the longest block the data group may ask.
    """

    vocab_size: int = 2048
    dim: int = 256
    n_layers: int = 4
    ffn_dim: int | None = None  # None: 8/3 · dim rounded up to a multiple of 64, as for the LLaMA
    max_seq_len: int = 4096
    norm_eps: float = 1e-6
    forget_lower_bound: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self):
        for key in ("vocab_size", "dim", "n_layers", "max_seq_len"):
            check_int(key, getattr(self, key), 1)
        self.ffn_dim = check_int("ffn_dim", self.ffn_dim or 64 * math.ceil(8 * self.dim / 3 / 64), 1)
        check_float("forget_lower_bound", self.forget_lower_bound, 0.0, 1.0)
        if self.forget_lower_bound >= 1.0:
            raise ConfigError("forget_lower_bound", self.forget_lower_bound, "must be below 1 (1 freezes the state)")

    def check_neuron(self, neuron) -> None:
        """Refuse a ``neuron`` group this architecture cannot take (called before any data work)."""
        if neuron is not None and neuron.get("attention") is not None:
            raise ConfigError("neuron.attention", "set", "the MatMul-free LM has no attention products to spike; "
                                                         "use a neuron group without `attention`")

    def build(self, encoder: EncoderFactory | None = None, weight_quantizer: WeightQuantizerFactory | None = None,
              unroll: bool = False, attention_encoder=None, rotate: bool = False) -> MatMulFreeLM:
        self.check_neuron(None if attention_encoder is None else {"attention": attention_encoder})
        return MatMulFreeLM(self, encoder, weight_quantizer, unroll, rotate)


class RMSNorm(LlamaRMSNorm):
    """The LLaMA's RMSNorm; in hardware mode a fixed-point gain and a shift-and-table ``1/√(mean x²)``."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        self.hardware: HardwareQuant | None = None

    def forward(self, x: Tensor) -> Tensor:
        spec = self.hardware
        if spec is None:
            return super().forward(x)
        x32 = x.float()
        mean_square = x32.pow(2).mean(-1, keepdim=True) + self.eps
        gain = to_fixed(self.weight.float(), spec.weight_frac_bits)
        normed = x32 * rsqrt_fixed(mean_square, spec.norm_mantissa_bits) * gain
        return to_fixed(normed, spec.activation_frac_bits, spec.activation_bits).to(x.dtype)


def _fixed(x: Tensor, spec: HardwareQuant | None) -> Tensor:
    """An activation on the hardware grid (identity in float mode)."""
    return x if spec is None else to_fixed(x, spec.activation_frac_bits, spec.activation_bits).to(x.dtype)


def _sigmoid(x: Tensor, spec: HardwareQuant | None) -> Tensor:
    return torch.sigmoid(x) if spec is None else lut(torch.sigmoid, x, spec)


def _silu(x: Tensor, spec: HardwareQuant | None) -> Tensor:
    # hardware: x · σ(x) with σ from the table, the product on the activation grid
    return F.silu(x) if spec is None else _fixed(x * lut(torch.sigmoid, x, spec), spec)


class MLGRU(nn.Module):
    """The MatMul-free linear GRU (see the module docstring); ``h`` is ``[B, dim]`` per layer."""

    def __init__(self, cfg: MatMulFreeConfig, linear):
        super().__init__()
        self.dim, self.lower_bound = cfg.dim, cfg.forget_lower_bound
        self.i_proj = linear(cfg.dim, cfg.dim)
        self.f_proj = linear(cfg.dim, cfg.dim)
        self.g_proj = linear(cfg.dim, cfg.dim)
        self.g_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.o_proj = linear(cfg.dim, cfg.dim)
        self.hardware: HardwareQuant | None = None
        self.matmul_work = RecurrenceWork()  # f·h and (1 - f)·c per channel: priced by the operation counter

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(f, (1 - f) ⊙ c, g)`` of ``x [B, T, dim]``: what the recurrence and the output read."""
        spec = self.hardware
        i, f, g = (_fixed(t, spec) for t in shared_input_linears(x, (self.i_proj, self.f_proj, self.g_proj)))
        forget = _sigmoid(f.float(), spec)
        if self.lower_bound:
            forget = self.lower_bound + (1 - self.lower_bound) * forget
        if spec is not None:  # the gate on the state's grid, so the update is an integer multiply
            forget = to_fixed(forget, spec.state_frac_bits)
        candidate = _silu(i.float(), spec)
        return forget, (1 - forget) * candidate, g

    def forward(self, x: Tensor, state: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x [B, T, dim]``, ``state [B, dim]`` (None: zeros) → ``(out [B, T, dim], final state)``;
        where ``mask [B, T]`` is False (padding) the state passes unchanged (f = 1, no input)."""
        forget, inputs, g = self.gates(x)
        if mask is not None:
            keep = mask[..., None]
            forget, inputs = forget.masked_fill(~keep, 1.0), inputs.masked_fill(~keep, 0.0)
        states, final = self.scan(forget, inputs, state)
        out = self.g_norm(states.to(x.dtype)) * _silu(g, self.hardware)
        return self.o_proj(_fixed(out, self.hardware)), final

    def scan(self, forget: Tensor, inputs: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        from spikellm.kernels.recurrence import fixed_point_recurrence, fixed_point_recurrence_reference, recurrence

        spec = self.hardware
        if spec is None:
            return recurrence(forget, inputs, state)
        # integers: the gate in [0, 2^F], the input and the state with F fractional bits
        scale = 2.0 ** spec.state_frac_bits
        forget_q = _int32(forget.detach() * scale)
        inputs_q = to_fixed(inputs, spec.state_frac_bits)
        initial = None if state is None else _int32(state.double() * scale)
        integer_scan = fixed_point_recurrence if forget_q.is_cuda else fixed_point_recurrence_reference
        states_q, final_q = integer_scan(forget_q, _int32(inputs_q.detach().double() * scale),
                                         spec.state_frac_bits, initial)
        states = states_q.float() / scale
        if torch.is_grad_enabled() and inputs.requires_grad:  # float gradients through the integer scan
            reference, _ = recurrence(forget, inputs, None if state is None else state.float())
            states = reference + (states - reference).detach()
        return states, final_q.float() / scale


def _int32(x: Tensor) -> Tensor:
    """Round to integers and saturate to int32, as a fixed-point register does (a cast would wrap)."""
    return torch.round(x.double()).clamp(-(2 ** 31), 2 ** 31 - 1).to(torch.int32)


class GLU(nn.Module):
    """The channel mixer: ``down(RMSNorm(SiLU(gate x) ⊙ up x))``."""

    def __init__(self, cfg: MatMulFreeConfig, linear):
        super().__init__()
        self.gate_proj = linear(cfg.dim, cfg.ffn_dim)
        self.up_proj = linear(cfg.dim, cfg.ffn_dim)
        self.down_norm = RMSNorm(cfg.ffn_dim, cfg.norm_eps)
        self.down_proj = linear(cfg.ffn_dim, cfg.dim)
        self.hardware: HardwareQuant | None = None

    def forward(self, x: Tensor) -> Tensor:
        gate, up = (_fixed(t, self.hardware) for t in shared_input_linears(x, (self.gate_proj, self.up_proj)))
        return self.down_proj(self.down_norm(_fixed(_silu(gate, self.hardware) * up, self.hardware)))


class Block(nn.Module):
    def __init__(self, cfg: MatMulFreeConfig, linear):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.token_mixer = MLGRU(cfg, linear)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = GLU(cfg, linear)
        self.hardware: HardwareQuant | None = None

    def forward(self, x: Tensor, state: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mixed, state = self.token_mixer(self.input_layernorm(x), state, mask)
        x = _fixed(x + mixed, self.hardware)
        return _fixed(x + self.mlp(self.post_attention_layernorm(x)), self.hardware), state


@dataclass
class RecurrentState:
    """The MatMul-free LM's decoding state (:meth:`MatMulFreeLM.new_state`): each layer's state
    ``[B, dim]`` after the tokens so far, updated in place by every forward it is passed to."""

    layers: list[Tensor] | None = None


class MatMulFreeLM(nn.Module):
    """The MatMul-free LM; ``encoder``/``weight_quantizer`` build one module per projection, as in
    :class:`~spikellm.models.llama.SpikingLlama` (``unroll`` and ``rotate`` likewise)."""

    def __init__(self, config: MatMulFreeConfig, encoder: EncoderFactory | None = None,
                 weight_quantizer: WeightQuantizerFactory | None = None, unroll: bool = False, rotate: bool = False):
        super().__init__()
        self.config = config

        linear = projection_factory(encoder, weight_quantizer, unroll, rotate)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, linear) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)  # floating point (DESIGN.md §4)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        init_decoder_weights(self, config.n_layers)

    def forward(self, input_ids: Tensor, state: list[Tensor] | RecurrentState | None = None,
                return_state: bool = False,
                attention_mask: Tensor | None = None) -> Tensor | tuple[Tensor, list[Tensor]]:
        """``input_ids [B, T]`` → logits ``[B, T, vocab]`` (and each layer's final state ``[B, dim]``).

        ``state``: the layers' states after earlier tokens, to continue a sequence in chunks; or a
        :class:`RecurrentState` (:meth:`new_state`), updated in place: the decoding protocol every
        model here shares, whose ``attention_mask`` spans the earlier tokens and these (as a KV
        cache's does). Otherwise ``attention_mask [B, T]`` (of these tokens; the state carries the
        past): 0 at (left) padding, which leaves every state as it was, so a padded prompt ends in
        its own state.
        """
        if isinstance(state, RecurrentState):
            mask = None if attention_mask is None else attention_mask[:, -input_ids.shape[1]:]
            logits, state.layers = self(input_ids, state.layers, return_state=True, attention_mask=mask)
            return (logits, state.layers) if return_state else logits
        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"state holds {len(state)} layers' states, the model has {len(self.layers)}")
        mask = None if attention_mask is None else attention_mask.to(device=input_ids.device, dtype=torch.bool)
        if mask is not None and mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask of shape {tuple(mask.shape)}, expected {tuple(input_ids.shape)}")
        x = self.embed_tokens(input_ids)
        finals = []
        for index, layer in enumerate(self.layers):
            x, final = layer(x, None if state is None else state[index], mask)
            finals.append(final)
        logits = self.lm_head(self.norm(x))
        return (logits, finals) if return_state else logits

    @torch.no_grad()
    def step(self, input_ids: Tensor, state: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """Recurrent inference: one token per sequence, ``input_ids [B]`` → ``(logits [B, vocab], state)``.

        Constant time and memory per token; the states equal those of :meth:`forward` on the whole prefix.
        Called as a module (hooks, such as the operation counter's, see every step).
        """
        logits, state = self(input_ids.reshape(-1, 1), state, return_state=True)
        return logits[:, 0], state

    def new_state(self) -> RecurrentState:
        """An empty decoding state: pass it to every forward of one sequence (batch)."""
        return RecurrentState()

    @property
    def max_context(self) -> None:
        """None: the recurrence runs on any length."""
        return None

    def spiking_linears(self) -> dict[str, SpikingLinear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, SpikingLinear)}


def set_hardware_mode(model: MatMulFreeLM, spec: HardwareQuant | None = HardwareQuant()) -> MatMulFreeLM:
    """Run ``model`` in the Loihi 2 paper's fixed-point form (``spec``) or back in floating point (None)."""
    if not isinstance(model, MatMulFreeLM):
        raise ConfigError("model", type(model).__name__, "the hardware-aware mode is defined for the MatMul-free LM")
    for module in model.modules():
        if hasattr(module, "hardware"):
            module.hardware = spec
    return model
