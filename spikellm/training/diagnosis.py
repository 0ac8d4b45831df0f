"""Which layer went non-finite: the diagnosis :class:`~spikellm.training.nonfinite.StopOnNonFinite`
runs once a step diverged (``diagnose=True``, the default; this module is loaded only then).

The step's batch is run again (the weights are still those it diverged with) with hooks on every
module, to find the first one in forward order whose output went non-finite and what it read (an
input already non-finite, a non-finite parameter, or finite values that overflowed); where the
forward stays finite, the backward is run too, to find the first module in backward order whose
input gradient went non-finite.
"""
from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from spikellm.neurons.base import SpikeEncoder


def _tensors(value):
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def nonfinite_state(tensors) -> str | None:
    """``"nan"``/``"inf"`` for the worst non-finite floating tensor, None if all are finite."""
    worst = None
    for t in tensors:
        if t.is_floating_point() or t.is_complex():
            t = t.detach()
            if bool(torch.isnan(t).any()):
                return "nan"
            if bool(torch.isinf(t).any()):
                worst = "inf"
    return worst


def _max_abs(tensors) -> float:
    values = [t.detach().abs().max().float().item() for t in tensors if t.is_floating_point() and t.numel()]
    return max(values, default=0.0)


def _clean(name: str) -> str:
    """A module or parameter name as the model spells it: no task or wrapper prefixes."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name.removeprefix("module.").removeprefix("model.")


def locate(trainer, module: pl.LightningModule, batch, batch_idx: int, gradients: bool):
    """Re-run ``batch`` with a hook on every module: ``(description, layer name)`` of the first
    module whose output is non-finite or, with ``gradients`` and a finite forward, of the first
    one in backward order whose input gradient went non-finite from a finite output gradient."""
    order: dict[str, int] = {}  # module name -> position in forward order (first call)
    first: dict = {}
    outputs: list[Tensor] = []  # outputs that require grad, in forward order
    largest: dict[str, float] = {}  # module name -> max |input| (first call), when diagnosing gradients

    def forward_hook(name):
        def record(mod, args, kwargs, output):
            order.setdefault(name, len(order))
            if gradients and name not in largest:
                largest[name] = _max_abs(_tensors((args, kwargs)))
            outputs.extend(t for t in _tensors(output) if t.requires_grad)
            if first or nonfinite_state(_tensors(output)) is None:
                return
            inputs = list(_tensors((args, kwargs)))
            first.update(name=name, output=nonfinite_state(_tensors(output)), input=nonfinite_state(inputs),
                         params=[f"{pname} has {nonfinite_state([p])}"
                                 for pname, p in mod.named_parameters(recurse=False)
                                 if nonfinite_state([p]) is not None],
                         max_input=_max_abs(inputs), encoder=isinstance(mod, SpikeEncoder))
        return record

    backward: dict = {}

    def backward_hook(name):
        def record(mod, grad_input, grad_output):
            if backward:
                return
            bad_in = nonfinite_state(g for g in grad_input if g is not None)
            if bad_in is not None:
                backward.update(name=name, grad=bad_in,
                                grad_output=nonfinite_state(g for g in grad_output if g is not None))
        return record

    named = [(_clean(name), m) for name, m in module.named_modules() if name]
    handles = [m.register_forward_hook(forward_hook(name), with_kwargs=True) for name, m in named]
    if gradients:
        handles += [m.register_full_backward_hook(backward_hook(name)) for name, m in named]
    try:
        with torch.set_grad_enabled(gradients), trainer.precision_plugin.train_step_context(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # full backward hooks on modules whose inputs need no gradient
            loss = _rerun_loss(trainer, module, batch, batch_idx)
            finite_forward = not first and isinstance(loss, Tensor) and nonfinite_state([loss]) is None
            if gradients and finite_forward and loss.requires_grad and outputs:
                # backward through every module without touching .grad (nor a DDP/FSDP gradient
                # hook): ask for the gradient of the earliest activation only
                torch.autograd.grad(loss, outputs[:1], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    if first:
        name = first["name"]
        if first["params"]:
            cause = "its " + ", ".join(first["params"])
        elif first["input"]:
            cause = f"its input already had {first['input']}"
        else:
            cause = f"its input and parameters were finite, max |input| {first['max_input']:.3g}: it overflowed"
        what = "spike encoder; " if first["encoder"] else ""
        return f"first non-finite output ({first['output']}) in {name} ({what}{cause})", name
    if isinstance(loss, Tensor) and nonfinite_state([loss]) is not None:
        return "every module output was finite; the loss computation itself went non-finite", None
    if not gradients:
        return "the batch re-run gave a finite loss (a non-deterministic divergence?)", None
    if backward:
        name = backward["name"]
        if backward["grad_output"]:
            how = f"its output gradient already had {backward['grad_output']}, from code between modules"
        else:
            how = "from a finite output gradient"
        if name in largest:
            how += f"; max |input| {largest[name]:.3g}"
        return f"backward first went non-finite ({backward['grad']}) in {name} ({how})", name
    return _locate_gradient(module, order)


def _rerun_loss(trainer, module: pl.LightningModule, batch, batch_idx: int):
    """The batch's loss again: the task's ``training_loss`` where it has one (no logging), else its
    ``training_step``. Through the strategy's wrapper where parameters are sharded (FSDP), so they
    are gathered as in training; a DDP wrapper is bypassed (its parameters are whole)."""
    from torch.nn.parallel import DistributedDataParallel

    if hasattr(module, "training_loss"):
        method, args = "training_loss", (batch,)
    else:
        method, args = "training_step", (batch, batch_idx)
    wrapper = getattr(trainer.strategy, "model", None)
    redirect = getattr(trainer.strategy, "_forward_redirection", None)
    if wrapper is not None and wrapper is not module and redirect is not None \
            and not isinstance(wrapper, DistributedDataParallel):
        out = redirect(wrapper, module, method, *args)
    else:
        out = getattr(module, method)(*args)
    out = out.get("loss") if isinstance(out, dict) else out
    return out[0] if isinstance(out, (tuple, list)) else out


def _locate_gradient(module: nn.Module, order: dict[str, int]):
    """The parameter with a non-finite gradient that backward reached first: the one of the module
    latest in forward order (registration order where the module did not run)."""
    bad = []
    for index, (mname, mod) in enumerate(module.named_modules()):
        for pname, p in mod.named_parameters(recurse=False):
            if p.grad is not None and nonfinite_state([p.grad]) is not None:
                name = _clean(mname)
                bad.append((order.get(name, -1), index, name, pname, nonfinite_state([p.grad])))
    if not bad:
        return "no parameter gradient of this rank is non-finite (another rank's was)", None
    _, _, name, pname, kind = max(bad)
    return (f"first non-finite parameter gradient in backward order ({kind}) in {name}.{pname}, "
            f"{len(bad)} parameter gradients non-finite in all"), name
