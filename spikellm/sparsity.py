"""Training-free activation sparsity (arXiv 2501.16337; DESIGN.md §5, last row).

Every linear-layer input gets a magnitude threshold: entries with ``|x| < threshold`` are zeroed,
so the layer skips their weight columns (fewer MACs, fewer spikes). The thresholds are calibrated
layer by layer in network order (module registration order): the candidates of a layer are
quantiles of its ``|input|`` on the calibration batches (keep fraction ``k`` → the ``1 - k``
quantile), and the sparsest candidate whose calibration loss stays ``≤ tolerance ×`` the running
reference (the loss with the thresholds fixed so far) is kept; the reference then becomes that loss.
The final loss is therefore at most ``tolerance ** n_layers`` times the dense loss.

Thresholds are applied by a forward pre-hook on each layer, keyed by module name, so they work on
:class:`~spikellm.models.llama.SpikingLlama` and on HF models spikified with
:func:`~spikellm.models.spikify.spikify` alike; :func:`remove_thresholds` takes them off again.
"""
from __future__ import annotations

import logging

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spikellm.checks import check_float
from spikellm.progress import progress_bar
from spikellm.errors import ConfigError, DataError
from spikellm.nn.spiking_linear import SpikingLinear

DEFAULT_KEEP = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
_ATTR = "_activation_thresholds"  # model attribute: {name: (ActivationThreshold, hook handle)}
_SAMPLES = 1 << 16  # |x| values kept per layer to compute the candidate quantiles

Batch = Tensor | tuple[Tensor, Tensor]
LossFn = Callable[[nn.Module, Sequence[Batch]], float]


class ActivationThreshold(nn.Module):
    """Zeroes the entries with ``|x| < threshold`` (inference only; ``threshold = 0`` is off).

    While ``tracking`` it counts the inputs it saw and how many it zeroed; :attr:`sparsity` is
    their ratio (the fraction zeroed). :meth:`reset_stats` clears the counts.
    """

    def __init__(self, threshold: float = 0.0, tracking: bool = True):
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(check_float("threshold", threshold, 0.0, math.inf))))
        self.tracking = tracking
        self.zeroed = 0
        self.count = 0

    def set_threshold(self, value: float) -> None:
        self.threshold.fill_(check_float("threshold", float(value), 0.0, math.inf))

    def reset_stats(self) -> None:
        self.zeroed = 0
        self.count = 0

    @property
    def sparsity(self) -> float:
        return self.zeroed / self.count if self.count else 0.0

    def forward(self, x: Tensor) -> Tensor:
        threshold = float(self.threshold)
        if threshold <= 0.0:
            if self.tracking:
                self.count += x.numel()
                self.zeroed += int((x == 0).sum())
            return x
        mask = x.abs() < threshold
        if self.tracking:
            self.count += x.numel()
            self.zeroed += int(mask.sum())
        return x.masked_fill(mask, 0.0)

    def extra_repr(self) -> str:
        return f"threshold={float(self.threshold):.4g}"


log = logging.getLogger(__name__)

def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The layers that get thresholds, by full name in module order: every :class:`SpikingLinear`
    if the model has any (the head and embeddings stay dense, DESIGN.md §4), else every
    ``nn.Linear`` except the output head."""
    spiking = {n: m for n, m in model.named_modules() if isinstance(m, SpikingLinear)}
    if spiking:
        return spiking
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and n.split(".")[-1] != "lm_head"}


def _installed(model: nn.Module) -> dict:
    return model.__dict__.get(_ATTR, {})


def install_thresholds(model: nn.Module, thresholds: dict[str, float] | None = None,
                       names: Iterable[str] | None = None) -> dict[str, ActivationThreshold]:
    """Put an :class:`ActivationThreshold` before each linear layer (``names``, default
    :func:`linear_layers`) and set the values in ``thresholds`` (others start at 0, off).
    Layers that already have one keep it. Returns ``{name: ActivationThreshold}`` in module order."""
    layers = linear_layers(model) if names is None else _resolve(model, names)
    installed = model.__dict__.setdefault(_ATTR, {})
    thresholds = dict(thresholds or {})
    unknown = set(thresholds) - set(layers) - set(installed)
    if unknown:
        raise ConfigError("thresholds", sorted(unknown), "must name linear layers of the model")
    for name, layer in layers.items():
        if name not in installed:
            gate = ActivationThreshold()

            def pre_hook(module, args, gate=gate):
                return (gate(args[0]),) + tuple(args[1:])

            installed[name] = (gate, layer.register_forward_pre_hook(pre_hook))
    for name, value in thresholds.items():
        installed[name][0].set_threshold(value)
    return gates(model)


def _resolve(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    names = list(names)
    bad = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if bad:
        raise ConfigError("names", bad, "must name nn.Linear modules of the model")
    order = {n: i for i, n in enumerate(modules)}
    return {n: modules[n] for n in sorted(set(names), key=order.__getitem__)}


def gates(model: nn.Module) -> dict[str, ActivationThreshold]:
    """The installed thresholds, ``{name: ActivationThreshold}`` in module order."""
    return {name: gate for name, (gate, _) in _installed(model).items()}


def remove_thresholds(model: nn.Module) -> None:
    """Take every threshold off ``model``: it computes exactly as before :func:`install_thresholds`."""
    for gate, handle in _installed(model).values():
        handle.remove()
    model.__dict__.pop(_ATTR, None)


def _check_batches(batches) -> list[Batch]:
    if isinstance(batches, Tensor) or (isinstance(batches, tuple) and len(batches) == 2
                                       and all(isinstance(b, Tensor) for b in batches)):
        batches = [batches]  # one batch given bare
    batches = list(batches)
    if not batches:
        raise DataError("calibration needs at least one batch; got none")
    for i, batch in enumerate(batches):
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        ok = isinstance(inputs, Tensor) and inputs.dim() == 2 and inputs.numel() > 0
        if isinstance(batch, (tuple, list)):
            ok = ok and len(batch) == 2 and isinstance(batch[1], Tensor)
        elif ok:
            ok = inputs.shape[1] >= 2 and not inputs.is_floating_point()  # next-token needs 2 tokens
        if not ok:
            raise DataError(f"calibration batch {i} must be input_ids [B, T>=2] (a LongTensor) or "
                            f"(inputs [B, T], targets); got {type(batch).__name__}")
    return batches


def _logits(output) -> Tensor:
    return output.logits if hasattr(output, "logits") else output


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean cross-entropy per target token: next-token for ``input_ids`` batches, against
    ``targets`` (``-100`` ignored) for ``(inputs, targets)`` batches."""
    total, tokens = 0.0, 0
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            inputs, targets = batch
            logits = _logits(model(inputs))
        else:
            logits = _logits(model(batch))[:, :-1]
            targets = batch[:, 1:]
        flat_targets = targets.reshape(-1)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_targets,
                                       ignore_index=-100, reduction="sum"))
        tokens += int((flat_targets != -100).sum())
    return total / max(tokens, 1)


@torch.no_grad()
def _input_samples(model: nn.Module, layers: dict[str, nn.Module], batches: Sequence[Batch]) -> dict[str, Tensor]:
    """One dense pass: a seeded subsample of each layer's ``|input|`` (at most ``_SAMPLES``)."""
    per_batch = math.ceil(_SAMPLES / len(batches))
    generator = torch.Generator().manual_seed(0)
    samples: dict[str, list[Tensor]] = {name: [] for name in layers}
    handles = []
    for name, layer in layers.items():
        def hook(module, args, name=name):
            flat = args[0].detach().abs().reshape(-1).float().cpu()
            if flat.numel() > per_batch:
                flat = flat[torch.randperm(flat.numel(), generator=generator)[:per_batch]]
            samples[name].append(flat)
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in samples.items() if parts}


def check_keep(keep) -> list[float]:
    try:
        values = list(keep)
    except TypeError:
        raise ConfigError("keep", keep, "must be a list of fractions in (0, 1]") from None
    if not values:
        raise ConfigError("keep", keep, "must be a non-empty list of fractions in (0, 1]")
    for value in values:
        check_float("keep", value, 0.0, 1.0, low_open=True)
    return sorted(set(float(v) for v in values))  # sparsest (smallest keep) first


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn | None = None,
                         keep: Sequence[float] = DEFAULT_KEEP, tolerance: float = 1.0005,
                         names: Iterable[str] | None = None) -> dict[str, dict]:
    """Calibrate one threshold per linear-layer input, layer by layer in network order.

    ``batches``: ``input_ids [B, T]`` LongTensors or ``(inputs, targets)`` pairs. ``loss_fn(model,
    batches) -> float`` is the calibration loss (default :func:`calibration_loss`). For each layer
    the candidates are the ``1 - k`` quantiles of its dense ``|input|`` for ``k`` in ``keep``; the
    sparsest one whose loss is ``≤ tolerance ×`` the running reference is kept (none: the layer stays
    dense, threshold 0) and the reference becomes its loss. Runs in eval mode under no_grad and
    restores the mode. Leaves the thresholds installed, their sparsity counts set by one final pass
    over the batches (see :func:`sparsity_report`).

    Returns ``{name: {"threshold", "sparsity", "keep", "loss"}}`` in network order: ``sparsity`` is
    the fraction of that layer's inputs zeroed on the batches once all thresholds are fixed,
    ``keep`` the chosen keep fraction (1.0 when dense), ``loss`` the reference after that layer.
    """
    tolerance = check_float("tolerance", tolerance, 1.0, math.inf)
    candidates = check_keep(keep)
    batches = _check_batches(batches)
    loss_fn = loss_fn or calibration_loss
    was_training = model.training
    model.eval()
    try:
        layers = linear_layers(model) if names is None else _resolve(model, names)
        if not layers:
            raise ConfigError("names", list(layers), "the model has no linear layers to threshold")
        installed = install_thresholds(model, {}, names=list(layers))
        for gate in installed.values():
            gate.set_threshold(0.0)
            gate.tracking = False
        samples = _input_samples(model, layers, batches)
        reference = float(loss_fn(model, batches))
        result: dict[str, dict] = {}
        # each candidate is a full pass over the calibration batches: say how many, and show them
        tokens = sum((b[0] if isinstance(b, (tuple, list)) else b).numel() for b in batches)
        log.info("activation thresholds: %d layers, up to %d candidates each, one pass over %d calibration "
                 "tokens per candidate", len(layers), len(candidates), tokens)
        # the bar counts passes (at most one per candidate); a layer that settles early skips the rest
        with progress_bar(f"activation thresholds, {len(layers)} layers", len(layers) * len(candidates)) as advance:
            for name in layers:
                gate = installed[name]
                chosen, chosen_keep, passes = 0.0, 1.0, 0
                values = samples.get(name)
                if values is not None and values.numel():
                    quantiles = torch.quantile(values, torch.tensor([1.0 - k for k in candidates]))
                    for k, threshold in zip(candidates, quantiles.tolist()):
                        if threshold <= 0.0:
                            continue
                        gate.set_threshold(threshold)
                        loss = float(loss_fn(model, batches))
                        passes += 1
                        advance(1)
                        if loss <= tolerance * reference:
                            chosen, chosen_keep, reference = threshold, k, loss
                            break
                advance(len(candidates) - passes)
                gate.set_threshold(chosen)
                result[name] = {"threshold": chosen, "keep": chosen_keep, "loss": reference}
        for gate in installed.values():
            gate.reset_stats()
            gate.tracking = True
        for batch in batches:  # one pass with everything fixed: the per-layer sparsity
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
        for name, info in result.items():
            info["sparsity"] = installed[name].sparsity
        return result
    finally:
        model.train(was_training)


@torch.no_grad()
def sparsity_report(model: nn.Module, batches: Iterable[Batch] | None = None) -> dict:
    """Per-layer input sparsity and the compute-weighted sparsity of the thresholded layers.

    With ``batches`` the counts are reset and measured on them (eval mode, restored after);
    without, the counts gathered so far are used (e.g. those left by :func:`calibrate_thresholds`).
    Each layer is weighted by its MACs per token, ``in_features × out_features``, so the weighted
    sparsity is the fraction of the thresholded layers' MACs skipped. Returns ``{"layers": {name:
    {"threshold", "sparsity", "macs"}}, "weighted_sparsity", "total_macs"}``.
    """
    installed = gates(model)
    if not installed:
        raise ConfigError("model", type(model).__name__, "has no thresholds installed (install_thresholds)")
    modules = dict(model.named_modules())
    if batches is not None:
        batches = _check_batches(batches)
        was_training = model.training
        model.eval()
        try:
            for gate in installed.values():
                gate.reset_stats()
                gate.tracking = True
            for batch in batches:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
        finally:
            model.train(was_training)
    layers, weighted, total = {}, 0.0, 0
    for name, gate in installed.items():
        module = modules[name]
        macs = module.in_features * module.out_features
        layers[name] = {"threshold": float(gate.threshold), "sparsity": gate.sparsity, "macs": macs}
        weighted += gate.sparsity * macs
        total += macs
    return {"layers": layers, "weighted_sparsity": weighted / total if total else 0.0, "total_macs": total}
