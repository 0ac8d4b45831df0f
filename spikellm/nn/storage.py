"""Where a model's weights live, apart from where it computes: billion-parameter models on a CPU.

- :func:`empty_parameters`: build a model whose parameters take no memory (on the meta device;
  buffers stay real, so rotary tables and encoder state are what the constructor computed), then
  :func:`assign_parameters` puts each tensor read from a file in place, in the asked dtype. A
  model is never held twice (no random initialisation, no ``load_state_dict`` copy).
- A parameter's *store* is where its values are between uses: in memory in its own dtype (bf16),
  as packed integers (:func:`release_packed`: a quantized projection), or still in its file
  (:func:`keep_on_disk`: a block a conversion has not reached). An empty stand-in (one NaN,
  expanded) takes its place, so a forward that forgot to fetch it fails loudly.
- :func:`materialized`: a module's parameters in fp32 for the duration of a ``with`` (a block being
  calibrated), fetched from their store and put back at the end (changed values stay in
  memory); :func:`compute_in` does it for every decoder block and every other module that owns
  weights, around each forward, so a model stored in bf16 computes in fp32 one block at a time
  (GPTQModel and OmniQuant keep a 7B model in fp16 the same way).
- :func:`trim_heap` gives glibc's freed heap back to the system between blocks.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

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
    placed = [0]

    def place(module: nn.Module, leaf: str, tensor: Tensor, cast: bool) -> None:
        placed[0] += tensor.numel() * tensor.element_size()
        if placed[0] > TRIM_EVERY:  # what reading and decoding freed goes back as the model fills
            placed[0] = 0
            trim_heap()
        if leaf in module._buffers:
            old = module._buffers[leaf]
            _check_shape(module, leaf, old, tensor)
            module._buffers[leaf] = tensor.to(old.dtype) if old is not None and old.is_floating_point() else tensor
            return
        old = module._parameters[leaf]
        _check_shape(module, leaf, old, tensor)
        if cast and dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if is_placeholder(old):  # kept on disk or released: the given values are its store now
            old.data = tensor.to(old.dtype)
            old._spikellm_read = None
            return
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


TRIM_EVERY = 256 << 20  # bytes placed between two heap trims while a model is filled


def _check_shape(module: nn.Module, leaf: str, old: Tensor | None, tensor: Tensor) -> None:
    if old is not None and tuple(tensor.shape) != tuple(old.shape):
        raise ValueError(f"{leaf} of {type(module).__name__} is {tuple(old.shape)} in the model, "
                         f"{tuple(tensor.shape)} in the file")


# ---- computing in fp32 over a store in another dtype ---------------------------------------------

def _placeholder(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An empty stand-in of ``like``'s shape: one NaN, expanded, so that a forward that was not
    given the real values fails loudly instead of computing with zeros."""
    return torch.full((), float("nan"), dtype=dtype or like.dtype, device=like.device).expand(like.shape)


def is_placeholder(tensor: Tensor) -> bool:
    return tensor.numel() > 1 and all(stride == 0 for stride in tensor.stride())


def release_packed(layer: SpikingLinear) -> None:
    """Free ``layer``'s float weight once its values are in ``layer.packed`` (a conversion holds a
    quantized projection at about a quarter of its bf16 bytes); :func:`materialized` restores it."""
    if layer.packed is None:
        raise ValueError("release_packed needs a packed weight")
    layer.weight.data = _placeholder(layer.weight.data)
    layer.weight._spikellm_read = None  # the packed integers, not the source file, hold it now


def is_released(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return isinstance(weight, Tensor) and weight.dim() == 2 and is_placeholder(weight) and \
        getattr(layer, "packed", None) is not None


def keep_on_disk(param: nn.Parameter, read: Callable[[], Tensor]) -> None:
    """Leave ``param``'s values in a file: ``read()`` returns them (as stored) whenever a block
    needs them. A conversion keeps every block of the source this way until its block runs, so a
    model is never held whole: its memory is the embeddings, the blocks done (packed) and one."""
    param.data = _placeholder(param.data)
    param._spikellm_read = read


def on_disk(param: Tensor) -> Callable[[], Tensor] | None:
    read = getattr(param, "_spikellm_read", None)
    return read if read is not None and is_placeholder(param) else None


def stored_value(param: Tensor) -> Tensor:
    """``param``'s values as stored: in memory, or read from its file now (in ``param``'s dtype)."""
    read = on_disk(param)
    return param.detach() if read is None else read().to(param.dtype)


@contextmanager
def materialized(module: nn.Module, dtype: torch.dtype = torch.float32, recurse: bool = True) -> Iterator[None]:
    """``module``'s floating-point parameters in ``dtype`` inside the ``with`` (its own only, when
    not ``recurse``).

    A released projection (:func:`release_packed`) gets its packed values, a parameter kept on
    disk (:func:`keep_on_disk`) is read. At the end every parameter goes back to its own dtype,
    keeping what was learned or folded meanwhile, except a projection's weight that holds packed
    integers (given inside by GPTQ or a folded quantizer, or released before): it is released,
    its integers being its store; and a parameter read from disk and left unchanged (no in-place
    change, no new tensor) goes back to its file. Parameters already in ``dtype`` are left alone,
    so nested and repeated use costs nothing."""
    layers = {id(m.weight): m for m in (module.modules() if recurse else [module]) if isinstance(m, SpikingLinear)}
    stores: list[tuple[nn.Parameter, torch.dtype, tuple | None]] = []
    for param in module.parameters(recurse=recurse):
        layer = layers.get(id(param))
        read = on_disk(param)
        if layer is not None and is_released(layer):
            stores.append((param, param.dtype, None))
            param.data = layer.packed.dequantize(dtype)
        elif read is not None:
            original = param.dtype
            param.data = read().to(dtype)
            stores.append((param, original, (param.data_ptr(), param._version)))
        elif param.is_floating_point() and param.dtype != dtype:
            stores.append((param, param.dtype, None))
            param.data = param.data.to(dtype)
    try:
        yield
    finally:
        for param, original, read_as in stores:
            layer = layers.get(id(param))
            if layer is not None and layer.packed is not None:  # its store is the packed integers
                layer.weight.data = _placeholder(param.data, original)
                param._spikellm_read = None
            elif read_as is not None and read_as == (param.data_ptr(), param._version):
                param.data = _placeholder(param.data, original)  # unchanged: back to its file
            else:
                param.data = param.data.to(original)
                if read_as is not None:
                    param._spikellm_read = None  # changed: held in memory from now on


@torch.no_grad()
def store_as(model: nn.Module, dtype: torch.dtype) -> None:
    """Hold ``model`` as a conversion stores it: every weight quantizer folded into packed
    integers (the projection's store from then on), every other floating-point parameter in
    ``dtype``. :func:`compute_in` then computes it in fp32 exactly as it is written."""
    from spikellm.nn.spiking_linear import fold_weight_quantizers

    fold_weight_quantizers(model)
    for module in model.modules():
        if isinstance(module, SpikingLinear) and module.packed is not None and not is_released(module):
            release_packed(module)
    for param in model.parameters():
        if param.is_floating_point() and not is_placeholder(param) and param.dtype != dtype:
            param.data = param.data.to(dtype)


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
        if isinstance(module, nn.Embedding) and on_disk(module.weight) is None:
            return None  # a lookup: rows cast on the way out, not the whole table
        context = materialized(module, dtype, recurse=id(module) in order)
        context.__enter__()
        active.setdefault(id(module), []).append(context)
        return _cast_inputs(args, kwargs, dtype)

    def hook(module, args, output):
        contexts = active.get(id(module))
        if contexts:
            contexts.pop().__exit__(None, None, None)
            if id(module) in order:  # a block's fp32 copy is gone: give it back before the next one
                trim_heap()
        if isinstance(module, nn.Embedding) and output.is_floating_point() and output.dtype != dtype:
            return output.to(dtype)
        return None

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


def release_memory() -> None:
    """Give freed memory back to the system: a conversion frees a block's fp32 copy, Hessians and
    activations after every block, and glibc would otherwise keep much of it in its heap."""
    import gc

    gc.collect()
    trim_heap()


_LIBC = []


def trim_heap() -> None:
    """glibc's ``malloc_trim(0)`` (a few ms): freed tensors under its mmap threshold (32 MB) stay in
    its heap otherwise, and a forward over 22 blocks read one at a time grows it by gigabytes."""
    import ctypes

    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)
