"""A projection's weight as it is stored: packed integers times per-row (or per-group) scales.

``W[:, j] = q[:, j] · scales[:, g(j)]``: ``q`` are small integers packed two (int4) or four
(ternary) to a byte, or int8 as is (:mod:`spikellm.kernels.packing`); ``scales [out, G]`` are
fp32; ``g(j)`` is column j's scale column: ``j // (in / G)`` for contiguous groups (one group:
a scale per row), or an explicit ``group_index [in]`` (GPTQ with act order and groups; SpikeLLM's
ternary GIF weights, whose salient columns have a scale of their own).

Every weight quantizer computes its values as one fp32 product ``q · s`` per element, so
:meth:`PackedWeight.dequantize` gives them back bit for bit, whatever the layout. A converted
model keeps its weights in this form from the moment they are quantized until they are written,
and a loaded one dequantizes them once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spikellm.errors import DataError
from spikellm.kernels.packing import FORMATS, pack_weights, packed_width, unpack_weights_reference

#: the largest integer each stored format holds (symmetric grids: int4 keeps -7..7 of its -8..7)
MAX_INT = {"ternary": 1, "int4": 7, "int8": 127}


def format_for(max_int: int) -> str | None:
    """The smallest packed format holding integers in ``[-max_int, max_int]`` (None: none does)."""
    return next((fmt for fmt in ("ternary", "int4", "int8") if max_int <= MAX_INT[fmt]), None)


@dataclass
class PackedWeight:
    """Packed integers ``data [out, packed_width(in)]`` in ``fmt``, ``scales [out, G]`` (fp32) and
    ``group_index [in]`` (None: contiguous groups of ``in / G`` columns)."""

    data: Tensor
    fmt: str
    in_features: int
    scales: Tensor
    group_index: Tensor | None = None

    @classmethod
    def from_integers(cls, integers: Tensor, scales: Tensor, group_index: Tensor | None = None,
                      fmt: str | None = None) -> "PackedWeight":
        """Pack ``integers [out, in]`` (any integer-valued dtype) with ``scales [out, G]``.

        ``group_index`` may also be given per column for a layout that is really contiguous (it is
        dropped then); a scale matrix with a column per input (a static grid) is reduced to its
        distinct columns, so ternary GIF weights store two scales per row, not one per weight."""
        integers = integers.detach()
        out_features, in_features = integers.shape
        scales = scales.detach().float().reshape(out_features, -1)
        if group_index is None and scales.shape[1] == in_features and in_features > 1:
            group_index = torch.arange(in_features, device=scales.device)
        if group_index is not None:
            group_index = group_index.detach().long().reshape(-1).to(scales.device)
            if group_index.numel() != in_features:
                raise ValueError(f"group_index has {group_index.numel()} entries for {in_features} columns")
            scales, group_index = _distinct_columns(scales[:, group_index])
            groups = scales.shape[1]
            if in_features % groups == 0 and torch.equal(group_index, _contiguous(in_features, groups, scales.device)):
                group_index = None
        top = int(integers.abs().max()) if integers.numel() else 0
        fmt = fmt or format_for(top)
        if fmt is None or top > MAX_INT.get(fmt, -1):
            raise ValueError(f"integers up to {top} do not fit a packed weight format ({', '.join(MAX_INT)})")
        return cls(pack_weights(integers, fmt), fmt, in_features, scales, group_index)

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def groups(self) -> int:
        return self.scales.shape[1]

    def columns(self) -> Tensor:
        """``g(j)`` for every column ``j`` (``[in]``, long)."""
        if self.group_index is not None:
            return self.group_index
        return _contiguous(self.in_features, self.groups, self.scales.device)

    def integers(self) -> Tensor:
        """``q [out, in]`` as int8."""
        return unpack_weights_reference(self.data, self.in_features, self.fmt)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``W [out, in]``: each element the fp32 product ``q · s`` its quantizer computed, then cast.

        The bytes are decoded through a 256-entry table of their values (one gather, no shifts
        and masks over the whole matrix: 2× faster, a 1.1B model's load is mostly this)."""
        if self.fmt == "int8":
            integers = self.data.float()
        else:
            table = _byte_values(self.fmt, self.data.device)
            integers = torch.nn.functional.embedding(self.data.long(), table).reshape(self.out_features, -1)
            if integers.shape[1] != self.in_features:  # the last byte of a row was padded
                integers = integers[:, :self.in_features].contiguous()
        if self.group_index is None and self.groups == 1:
            weight = integers.mul_(self.scales)
        else:
            weight = integers.mul_(self.scales[:, self.columns()])
        return weight if dtype == torch.float32 else weight.to(dtype)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.group_index is None else self.group_index.numel() * 4
        return self.data.numel() * self.data.element_size() + self.scales.numel() * 4 + extra

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        """What a file stores: ``<prefix>.qweight``, ``.qscale`` and, when columns pick their
        scales, ``.qgidx`` (int32)."""
        out = {f"{prefix}.qweight": self.data.contiguous(), f"{prefix}.qscale": self.scales.contiguous()}
        if self.group_index is not None:
            out[f"{prefix}.qgidx"] = self.group_index.to(torch.int32).contiguous()
        return out

    @classmethod
    def from_tensors(cls, get, prefix: str, fmt: str, shape: tuple[int, int], where: str = "") -> "PackedWeight":
        """Read back :meth:`tensors` through ``get(name) -> Tensor | None`` and check every shape
        against the layer's ``(out, in)``; anything missing or inconsistent is a DataError naming ``where``."""
        out_features, in_features = shape
        if fmt not in FORMATS:
            raise DataError(f"{where}: {prefix} has the weight format {fmt!r}; this spikellm reads "
                            f"{', '.join(FORMATS)} and float")
        data, scales, group_index = get(f"{prefix}.qweight"), get(f"{prefix}.qscale"), get(f"{prefix}.qgidx")
        for name, tensor in (("qweight", data), ("qscale", scales)):
            if tensor is None:
                raise DataError(f"{where} lacks the tensor '{prefix}.{name}'")
        width = packed_width(in_features, fmt)
        groups = scales.shape[1] if scales.dim() == 2 else 0
        bad = (tuple(data.shape) != (out_features, width) or scales.dim() != 2 or scales.shape[0] != out_features
               or groups == 0 or (group_index is None and in_features % groups)
               or (group_index is not None and (tuple(group_index.shape) != (in_features,)
                                                or int(group_index.min()) < 0 or int(group_index.max()) >= groups)))
        if bad:
            raise DataError(f"{where}: {prefix} has packed weights {tuple(data.shape)} and scales "
                            f"{tuple(scales.shape)}, not those of a {out_features}×{in_features} layer in {fmt}")
        return cls(data, fmt, in_features, scales.float(), None if group_index is None else group_index.long())

    def to(self, device) -> "PackedWeight":
        return PackedWeight(self.data.to(device), self.fmt, self.in_features, self.scales.to(device),
                            None if self.group_index is None else self.group_index.to(device))


def _contiguous(in_features: int, groups: int, device) -> Tensor:
    return torch.arange(in_features, device=device) // (in_features // groups)


def _distinct_columns(columns: Tensor, limit: int = 64) -> tuple[Tensor, Tensor]:
    """``(distinct columns [out, G], index [in])`` with ``distinct[:, index] == columns``, by exact
    comparison with one representative at a time (a weight has few: one per row, two for ternary
    GIF weights, one per group); past ``limit`` of them, ``unique(dim=1)`` (which sorts whole columns:
    seconds for a 5632 × 2048 matrix)."""
    index = torch.full((columns.shape[1],), -1, dtype=torch.long, device=columns.device)
    representatives = []
    while len(representatives) < limit:
        left = (index < 0).nonzero()
        if not len(left):
            return columns[:, representatives].contiguous(), index
        first = int(left[0])
        same = (columns == columns[:, first:first + 1]).all(0) & (index < 0)
        index[same] = len(representatives)
        representatives.append(first)
    used, inverse = torch.unique(columns, dim=1, return_inverse=True)
    return used.contiguous(), inverse


_TABLES: dict[tuple[str, str], Tensor] = {}


def _byte_values(fmt: str, device) -> Tensor:
    """``[256, values per byte]`` fp32: the integers each byte value decodes to, as
    :func:`~spikellm.kernels.packing.unpack_weights_reference` decodes them."""
    key = (fmt, str(device))
    if key not in _TABLES:
        codes = torch.arange(256, dtype=torch.uint8).reshape(256, 1)
        _TABLES[key] = unpack_weights_reference(codes, FORMATS[fmt], fmt).float().to(device)
    return _TABLES[key]
