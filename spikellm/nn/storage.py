"""Where a model's weights live, apart from where it computes: billion-parameter models on a CPU.

- :func:`empty_parameters`: build a model whose parameters take no memory (on the meta device;
  buffers stay real, so rotary tables and encoder state are what the constructor computed), then
  :func:`assign_parameters` puts each tensor read from a file in place, in the asked dtype. A
  model is never held twice (no random initialisation, no ``load_state_dict`` copy).
- :func:`materialized`: a module's parameters in fp32 for the duration of a ``with`` (a block being
  calibrated), its store (bf16, or packed integers once a projection is quantized) kept aside
  and updated at the end; :func:`compute_in` does it for every decoder block and every other
  module that owns weights, around each forward, so a model stored in bf16 computes in fp32 one
  block at a time (GPTQModel and OmniQuant keep a 7B model in fp16 the same way).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from spikellm.nn.packed import PackedWeight
from spikellm.nn.spiking_linear import SpikingLinear


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Parameters created inside are on the meta device (no memory, no initialisation cost);
    buffers are not, so what a constructor computes into them (rotary tables, encoder flags) stays."""
    register = nn.Module.register_parameter

    def register_empty(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_empty
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_names(model: nn.Module) -> list[str]:
    """Parameters (and buffers) still on the meta device: what no file provided."""
    return [name for name, tensor in (*model.named_parameters(remove_duplicate=False),
                                      *model.named_buffers(remove_duplicate=False)) if tensor.is_meta]


def assign_parameters(model: nn.Module, tensors: Iterable[tuple[str, Tensor]],
                      packed: dict[str, PackedWeight] | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """Put each ``(name, tensor)`` in place as the parameter or buffer ``name`` (no copy beyond the
    cast to ``dtype``, which applies to floating-point parameters only); ``packed`` weights
    (``{layer name: PackedWeight}``) are dequantized once into their layer's weight and kept in
    its :attr:`~spikellm.nn.spiking_linear.SpikingLinear.packed`. A parameter tied under several
    names (embeddings and head) is filled once, for all of them. Returns the names the model does
    not have; a shape that differs from the model's is a ValueError."""
    modules = dict(model.named_modules(remove_duplicate=False))
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in modules.values():
        for leaf, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, leaf))
    unknown = []

    def place(module: nn.Module, leaf: str, tensor: Tensor, cast: bool) -> None:
        if leaf in module._buffers:
            old = module._buffers[leaf]
            _check_shape(module, leaf, old, tensor)
            module._buffers[leaf] = tensor.to(old.dtype) if old is not None and old.is_floating_point() else tensor
            return
        old = module._parameters[leaf]
        _check_shape(module, leaf, old, tensor)
        if cast and dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if not old.is_meta:  # the second name of a tied parameter, or a model built with memory
            old.data.copy_(tensor)
            return
        new = nn.Parameter(tensor, requires_grad=old.requires_grad)
        for owner, name in owners.pop(id(old), [(module, leaf)]):
            owner._parameters[name] = new
        owners[id(new)] = []

    for name, tensor in tensors:
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if module is None or not (leaf in module._parameters or leaf in module._buffers):
            unknown.append(name)
            continue
        place(module, leaf, tensor, cast=True)
    for name, weight in (packed or {}).items():
        layer = modules.get(name)
        if not isinstance(layer, SpikingLinear):
            unknown.append(f"{name}.qweight")
            continue
        place(layer, "weight", weight.dequantize(dtype or torch.float32), cast=False)
        layer.packed = weight
    return unknown


def _check_shape(module: nn.Module, leaf: str, old: Tensor | None, tensor: Tensor) -> None:
    if old is not None and tuple(tensor.shape) != tuple(old.shape):
        raise ValueError(f"{leaf} of {type(module).__name__} is {tuple(old.shape)} in the model, "
                         f"{tuple(tensor.shape)} in the file")


# ---- computing in fp32 over a store in another dtype ---------------------------------------------

#: an empty weight of a projection whose values live in its ``packed`` integers: NaN, so that any
#: forward that was not given the packed values fails loudly instead of computing with zeros
def _placeholder(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.full((), float("nan"), dtype=dtype or like.dtype, device=like.device).expand(like.shape)


def release_packed(layer: SpikingLinear) -> None:
    """Free ``layer``'s float weight once its values are in ``layer.packed`` (a conversion holds a
    quantized projection at about a quarter of its bf16 bytes); :func:`materialized` restores it."""
    if layer.packed is None:
        raise ValueError("release_packed needs a packed weight")
    layer.weight.data = _placeholder(layer.weight.data)


def is_released(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return isinstance(weight, Tensor) and weight.dim() == 2 and weight.stride() == (0, 0) and weight.numel() > 1


@contextmanager
def materialized(module: nn.Module, dtype: torch.dtype = torch.float32, recurse: bool = True) -> Iterator[None]:
    """``module``'s floating-point parameters in ``dtype`` inside the ``with`` (its own only, when
    not ``recurse``).

    A released projection (:func:`release_packed`) gets its packed values. At the end every
    parameter goes back to its own dtype, keeping what was learned or folded meanwhile, except a
    projection's weight that holds packed integers (given inside by GPTQ or a folded quantizer,
    or released before): it is released, its integers being its store. Parameters already in ``dtype`` are left alone, so nested
    and repeated use costs nothing."""
    layers = {id(m.weight): m for m in (module.modules() if recurse else [module]) if isinstance(m, SpikingLinear)}
    stores: list[tuple[nn.Parameter, torch.dtype]] = []
    for param in module.parameters(recurse=recurse):
        layer = layers.get(id(param))
        if layer is not None and is_released(layer):
            stores.append((param, param.dtype))
            param.data = layer.packed.dequantize(dtype)
        elif param.is_floating_point() and param.dtype != dtype:
            stores.append((param, param.dtype))
            param.data = param.data.to(dtype)
    try:
        yield
    finally:
        for param, original in stores:
            layer = layers.get(id(param))
            if layer is not None and layer.packed is not None:  # its store is the packed integers
                layer.weight.data = _placeholder(param.data, original)
            else:
                param.data = param.data.to(original)


def weight_units(model: nn.Module, blocks: Iterable[nn.Module]) -> list[nn.Module]:
    """The decoder ``blocks`` and every other module that owns parameters directly (embeddings,
    final norm, head): the units :func:`compute_in` materializes one at a time."""
    blocks = list(blocks)
    inside = {id(m) for block in blocks for m in block.modules()}
    others = [m for m in model.modules() if id(m) not in inside and any(True for _ in m.parameters(recurse=False))]
    return blocks + others


@contextmanager
def compute_in(model: nn.Module, blocks: Iterable[nn.Module], dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """Every forward of ``model`` inside the ``with`` runs each unit (:func:`weight_units`) in
    ``dtype`` while it runs, one at a time (its floating-point inputs cast too); the store is
    untouched in between. Free for units already in ``dtype``."""
    blocks = list(blocks)
    order = {id(block): index for index, block in enumerate(blocks)}
    active: dict[int, list] = {}

    def pre_hook(module, args, kwargs):
        context = materialized(module, dtype, recurse=id(module) in order)
        context.__enter__()
        active.setdefault(id(module), []).append(context)
        return _cast_inputs(args, kwargs, dtype)

    def hook(module, args, output):
        contexts = active.get(id(module))
        if contexts:
            contexts.pop().__exit__(None, None, None)

    handles = []
    for unit in weight_units(model, blocks):
        handles.append(unit.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(unit.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for contexts in active.values():  # a forward that raised between its hooks
            while contexts:
                contexts.pop().__exit__(None, None, None)


def _cast_inputs(args: tuple, kwargs: dict, dtype: torch.dtype):
    """Floating-point tensor arguments in ``dtype`` (a block's hidden states and rotary tables)."""
    def cast(value):
        if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        if isinstance(value, tuple) and any(isinstance(v, Tensor) for v in value):
            return tuple(cast(v) for v in value)
        return value
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
