"""What every model file of spikellm stores for a model with spiking projections, and how it
comes back: quantized projections as packed integers and scales (:class:`PackedWeight`), every
other tensor as it is held (the stored dtype: bf16 for a converted 7B, fp32 for a model trained
here), tied tensors once. Weight quantizers are folded on the way out: what is written is the
weight the layer multiplies, so nothing loaded ever quantizes a weight again."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from spikellm.errors import DataError
from spikellm.nn.packed import PackedWeight
from spikellm.nn.spiking_linear import SpikingLinear
from spikellm.nn.storage import is_placeholder, is_released, materialized, on_disk, stored_value

PACKED_SUFFIXES = (".qweight", ".qscale", ".qgidx")
_BITS = {"ternary": 2, "int4": 4, "int8": 8}


def weight_format(layer: SpikingLinear, packed: PackedWeight | None = None) -> tuple[str, int | None, int | None]:
    """``(format, bits, group_size)`` a projection's weight is stored in: ``int4``, ``int8``,
    ``ternary`` (packed integers) or ``float``. ``packed``: its :meth:`~SpikingLinear.quantized_weight`
    when the caller has it already."""
    packed = packed if packed is not None else layer.quantized_weight()
    if packed is None:
        return "float", None, None
    bits = getattr(layer.weight_quantizer, "bits", None) or _BITS[packed.fmt]
    group = getattr(layer.weight_quantizer, "group_size", None)
    if layer.weight_quantizer is None and packed.group_index is None and packed.groups > 1:
        group = packed.in_features // packed.groups
    return packed.fmt, bits, group


def stored_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype ``model``'s floating-point parameters are held (and so written) in."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def cast_as_stored(tensors: Iterator[tuple[str, Tensor]], dtypes: dict[str, torch.dtype] | None,
                   tally: dict[torch.dtype, int] | None = None) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` pairs with each floating-point tensor that ``dtypes`` names cast to its
    dtype there (a model read in fp32 from bf16 files is written back as it was read); ``tally``
    counts the bytes written per floating-point dtype (what ``torch_dtype`` then says)."""
    for name, tensor in tensors:
        wanted = (dtypes or {}).get(name)
        if wanted is not None and tensor.is_floating_point() and tensor.dtype != wanted:
            tensor = tensor.to(wanted)
        if tally is not None and tensor.is_floating_point():
            tally[tensor.dtype] = tally.get(tensor.dtype, 0) + tensor.numel() * tensor.element_size()
        yield name, tensor


def main_dtype(tally: dict[torch.dtype, int], model: nn.Module) -> str:
    """The name of the dtype most floating-point bytes were written in (else the model's)."""
    dtype = max(tally, key=tally.get) if tally else stored_dtype_of(model)
    return str(dtype).removeprefix("torch.")


def layer_record(layer: SpikingLinear, fmt: str, bits, group) -> dict:
    return {"weight_format": fmt, "bits": bits, "group_size": group, "in_features": layer.in_features,
            "out_features": layer.out_features, "rotate": bool(layer.rotate),
            "encoder": None if layer.encoder is None else f"{type(layer.encoder).__name__}({layer.encoder.extra_repr()})"}


@torch.no_grad()
def stored_tensors(model: nn.Module, layers: dict[str, SpikingLinear],
                   skip_on_disk: bool = False) -> tuple[dict[str, dict], Iterator[tuple[str, Tensor]]]:
    """``(layer records, (name, tensor) pairs)`` to write for ``model``: each projection of
    ``layers`` (``{name: SpikingLinear}``) as packed integers when its weight is quantized (its
    ``.weight`` is then not written) or as the weight it multiplies otherwise, every other entry
    of the state dict as held, tensors shared by several names (tied embeddings) once. The pairs
    are produced lazily: a writer holds one shard of them at a time. A parameter still in its
    source file (:func:`~spikellm.nn.storage.keep_on_disk`) is read from it, or left out with
    ``skip_on_disk`` (a conversion's snapshot: rebuilding the model reads it from there again)."""
    records, packed = {}, {}
    for name, layer in layers.items():
        if skip_on_disk and on_disk(layer.weight) is not None:
            continue
        with materialized(layer, layer.weight.dtype if on_disk(layer.weight) is None else torch.float32):
            weight = layer.quantized_weight()
        fmt, bits, group = weight_format(layer, weight)
        records[name] = layer_record(layer, fmt, bits, group)
        if weight is not None:
            packed[name] = weight
        elif is_released(layer):
            raise ValueError(f"{name} holds no weight and no packed integers")

    def pairs() -> Iterator[tuple[str, Tensor]]:
        # a quantizer no packed format holds (over 8 bits): the values it gives, stored rotated
        folded = {name for name, layer in layers.items() if layer.weight_quantizer is not None and name not in packed}
        seen: set[int] = set()
        params = dict(model.named_parameters(remove_duplicate=False))
        for key, value in model.state_dict().items():
            layer, _, leaf = key.rpartition(".")
            if key in params and is_placeholder(value) and not (leaf == "weight" and layer in packed):
                if skip_on_disk:
                    continue
                value = stored_value(params[key])  # a block a conversion never needed: still in its file
            if leaf == "weight" and layer in packed:
                yield from packed[layer].tensors(layer).items()
                continue
            if leaf == "weight" and layer in folded:
                with materialized(layers[layer], value.dtype):
                    value = layers[layer].effective_weight().detach().clone()
            if leaf == "rotation_folded" and (layer in packed or layer in folded):
                value = torch.tensor(True)  # what is written is the rotated weight
            if value.numel():
                if value.data_ptr() in seen:  # tied: stored once
                    continue
                seen.add(value.data_ptr())
            value = value.detach()
            if not value.is_contiguous() or value.untyped_storage().nbytes() != value.numel() * value.element_size():
                value = value.contiguous().clone()  # safetensors stores no views
            yield key, value

    return records, pairs()


def read_packed(files, records: dict[str, dict], where: str) -> dict[str, PackedWeight]:
    """The :class:`PackedWeight` of every projection ``records`` lists with an integer format,
    read from ``files`` (a :class:`~spikellm.checkpoints.shards.TensorFiles`)."""
    out = {}
    for name, info in records.items():
        if not isinstance(info, dict) or info.get("weight_format", "float") == "float":
            continue
        try:
            shape = (int(info["out_features"]), int(info["in_features"]))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: the record of layer {name!r} lacks its in_features / out_features") from None
        out[name] = PackedWeight.from_tensors(files.get, name, info["weight_format"], shape, where=str(where))
    return out


def is_packed_tensor(name: str, packed: dict) -> bool:
    """Whether file tensor ``name`` is one of the packed tensors of a layer in ``packed``."""
    for suffix in PACKED_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in packed:
            return True
    return False
