"""Exact operation counts of a model run, from the spike counts its encoders produce.

Nothing is estimated from tensor values: dense MACs follow from shapes, accumulates from the
integer spike counts, ``ACs = Σ_t nnz(s_t) × fan_out``, where the number of non-zero spikes of an
activation is the encoder's closed form of its count (``spikes_per_count``; a multi-level GIF spike
is one event). Counted:

* every projection: without an encoder, MACs ``nnz(x) × out`` (an input of exactly zero, as
  activation sparsity makes them, multiplies nothing on an event-driven core; ``dense_macs`` keeps
  ``tokens × in × out``), else ACs ``spikes × out`` (and the sparse outlier stream, one MAC per
  output per outlier event);
* attention products, causal: token ``i`` attends to ``j <= i``, so ``Q·Kᵀ`` and ``P·V`` each cost
  ``Σ_i (i + 1) × head_dim`` MACs per query head; with spiking K (V), each spike of key (value)
  ``j`` adds one entry for each of the ``T - j`` queries and each query head of its group;
* the MatMul-free LM's recurrence ``h_t = f_t ⊙ h_{t-1} + (1 - f_t) ⊙ c_t``: two MACs per channel
  and token (kind ``recurrence``), the work that replaces the attention products;
* the lm_head, ``tokens × dim × vocab`` MACs.

Embeddings, norms, softmax and SiLU stay floating point and are not counted (DESIGN.md §4, §6).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from spikellm.energy.cost import CostModel
from spikellm.energy.report import EnergyReport, LayerOps
from spikellm.nn.hadamard import hadamard_transform
from spikellm.nn.spiking_linear import SpikingLinear


class OperationCounter:
    """Hooks that count the operations of every forward of ``model`` until :meth:`remove`.

    Use as a context manager around the forwards to count; :meth:`report` prices them.
    """

    def __init__(self, model: nn.Module):
        from spikellm.models.llama import Attention
        from spikellm.models.matmulfree import MLGRU

        self.model = model
        self.ops: dict[str, LayerOps] = {}
        self.tokens = 0
        self.sequences = 0
        self._handles = []
        self._order: dict[str, int] = defaultdict(int)
        for index, (name, module) in enumerate(model.named_modules()):
            self._order[name] = index
            if isinstance(module, SpikingLinear):
                self._handles.append(module.register_forward_hook(self._projection_hook(name)))
            elif isinstance(module, Attention):
                self._handles.append(module.register_forward_hook(self._attention_hook(name, module)))
                for encoder in (module.encoder or {}).values():
                    self._handles.append(encoder.register_forward_hook(self._attention_encoder_hook(name, module)))
            elif isinstance(module, MLGRU):
                self._handles.append(module.register_forward_hook(self._recurrence_hook(name)))
            elif isinstance(module, nn.Linear) and name.endswith("lm_head"):
                self._handles.append(module.register_forward_hook(self._head_hook(name)))
        if not self._handles:
            raise ValueError("the model has no SpikingLinear, attention or lm_head to count")
        self._handles.append(model.register_forward_pre_hook(self._count_tokens, with_kwargs=True))

    def _count_tokens(self, model, inputs, kwargs):
        # input_ids [B, T] of a language model (positional, or by keyword for a Hugging Face one),
        # or the activations of a bare layer
        x = inputs[0] if inputs else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        shape = x.shape if not x.is_floating_point() else x.shape[:-1]
        self.tokens += shape.numel()
        self.sequences += shape[0] if len(shape) > 1 else 1

    def __enter__(self) -> "OperationCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _layer(self, name: str, kind: str) -> LayerOps:
        if name not in self.ops:
            self.ops[name] = LayerOps(name=name, kind=kind)
        return self.ops[name]

    def _projection_hook(self, name: str):
        @torch.no_grad()
        def hook(layer: SpikingLinear, inputs, output):
            x = inputs[0]
            tokens = x.numel() // layer.in_features
            ops = self._layer(name, "projection")
            ops.dense_macs += tokens * layer.in_features * layer.out_features
            if layer.encoder is None:
                ops.macs += (x != 0).sum().item() * layer.out_features
                return
            encoder = layer.encoder
            seen = hadamard_transform(x) if layer.rotate else x
            counts, step = encoder.encode(seen)
            spikes = encoder.spikes_per_count(counts).sum(dtype=torch.float64).item()
            ops.spikes += spikes
            ops.activations += counts.numel()
            ops.steps = encoder.num_steps
            ops.acs += spikes * layer.out_features
            outliers = encoder.outlier_counts(seen, step, counts)
            if outliers is not None:
                ops.macs += (outliers != 0).sum().item() * layer.out_features
        return hook

    def _attention_hook(self, name: str, attention):
        def hook(module, inputs, output):
            batch, seq = inputs[0].shape[0], inputs[0].shape[1]
            # query i attends to keys 0..i: Σ_i (i + 1) = T(T+1)/2 pairs per query head and sequence
            dense = 2 * batch * attention.n_heads * seq * (seq + 1) // 2 * attention.head_dim  # Q·Kᵀ and P·V
            ops = self._layer(f"{name}.products", "attention")
            ops.dense_macs += dense
            if attention.encoder is None:
                ops.macs += dense
        return hook

    def _attention_encoder_hook(self, name: str, attention):
        @torch.no_grad()
        def hook(encoder, inputs, output):
            x = inputs[0]  # K after RoPE, or V: [B, H_kv, T, D]
            counts, _ = encoder.encode(x)
            spikes = encoder.spikes_per_count(counts).sum(dim=-1, dtype=torch.float64)  # [B, H_kv, T]
            seq = x.shape[-2]
            queries = torch.arange(seq, 0, -1, device=x.device, dtype=torch.float64)  # T - j see key j
            ops = self._layer(f"{name}.products", "attention")
            ops.acs += (spikes * queries).sum().item() * (attention.n_heads // attention.n_kv_heads)
            ops.spikes += spikes.sum().item()
            ops.activations += counts.numel()
            ops.steps = max(ops.steps, encoder.num_steps)
        return hook

    def _recurrence_hook(self, name: str):
        def hook(module, inputs, output):
            macs = 2 * inputs[0].numel()  # f·h and (1 - f)·c per channel and token of x [B, T, dim]
            ops = self._layer(f"{name}.recurrence", "recurrence")
            ops.macs += macs
            ops.dense_macs += macs
        return hook

    def _head_hook(self, name: str):
        def hook(layer: nn.Linear, inputs, output):
            tokens = inputs[0].numel() // layer.in_features
            ops = self._layer(name, "lm_head")
            ops.macs += tokens * layer.in_features * layer.out_features
            ops.dense_macs += tokens * layer.in_features * layer.out_features
        return hook

    def report(self, cost: CostModel) -> EnergyReport:
        layers = sorted(self.ops.values(),
                        key=lambda ops: self._order[ops.name.removesuffix(".products").removesuffix(".recurrence")])
        return EnergyReport(cost=cost, tokens=self.tokens, sequences=self.sequences, layers=layers)

