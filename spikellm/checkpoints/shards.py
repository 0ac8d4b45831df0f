"""Weights as ``transformers`` stores them: safetensors files, sharded with an index when large.

A directory holds ``model.safetensors``, or ``model-00001-of-0000N.safetensors`` ... with
``model.safetensors.index.json`` (``{"metadata": {...}, "weight_map": {name: file}}``), as
``save_pretrained`` writes them; every shard carries the same string metadata, and the SHA-256
of each of its tensors' bytes (:data:`TENSOR_DIGESTS`).

:func:`write_tensors` streams tensors into shards of at most ``max_shard_bytes`` (only one shard's
tensors are held at a time). :class:`TensorFiles` reads them one tensor at a time with plain file
reads into a new tensor of the asked dtype: no file is memory-mapped, so loading a model holds
the model and one tensor more, never a shard, a second copy, or pages of the file. Each tensor
read is checked against its digest when its file has them (files spikellm wrote), and every
floating-point tensor must hold finite values: an edited or corrupted file is a DataError naming
the tensor and the file, never a model that computes something else.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor

from spikellm.errors import DataError

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB: what saving holds in memory beyond the model, at most
# a shard's metadata key: ``{tensor name: SHA-256 of its bytes}`` as JSON (safetensors' header is
# written before the data, so the digests of a shard are of the tensors it was given)
TENSOR_DIGESTS = "spikellm_tensor_sha256"

# safetensors' dtype names
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 of a (contiguous, CPU) tensor's bytes, as safetensors stores them."""
    raw = tensor.detach().reshape(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
    return hashlib.sha256(memoryview(raw.numpy())).hexdigest()


def weights_digest(digests: dict[str, str]) -> str:
    """One SHA-256 over every tensor's: what a model's record (config.json) keeps, so weights whose
    per-tensor digests were stripped or replaced are refused too."""
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def has_weights(directory) -> bool:
    directory = Path(directory)
    return (directory / WEIGHTS).is_file() or (directory / INDEX).is_file()


def write_tensors(directory, tensors: Iterable[tuple[str, Tensor]], metadata: dict[str, str] | None = None,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, digests: dict[str, str] | None = None) -> list[Path]:
    """Write ``(name, tensor)`` pairs into ``directory`` (a new, temporary directory: callers make
    the whole write atomic) as one file or as shards with an index; returns the files written.
    ``digests`` receives each tensor's SHA-256 (for :func:`weights_digest`)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, Tensor] = {}
    size = total = 0

    def flush():
        nonlocal shard, size
        if shard:
            path = directory / f"model-{len(written) + 1:05d}.part"
            shard_digests = {name: tensor_digest(tensor) for name, tensor in shard.items()}
            if digests is not None:
                digests.update(shard_digests)
            save_file(shard, str(path), metadata={**metadata, TENSOR_DIGESTS: json.dumps(shard_digests)})
            written.append((path, list(shard)))
        shard, size = {}, 0

    for name, tensor in tensors:
        if name in shard or any(name in names for _, names in written):
            raise ValueError(f"the tensor {name!r} is written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor.detach().contiguous()
        size += nbytes
        total += nbytes
    flush()
    if not written:
        save_file({}, str(directory / WEIGHTS), metadata=metadata)
        return [directory / WEIGHTS]
    if len(written) == 1:
        written[0][0].rename(directory / WEIGHTS)
        return [directory / WEIGHTS]
    files, weight_map = [], {}
    for index, (path, names) in enumerate(written, 1):
        final = directory / f"model-{index:05d}-of-{len(written):05d}.safetensors"
        path.rename(final)
        files.append(final)
        weight_map.update(dict.fromkeys(names, final.name))
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total, **metadata},
                                               "weight_map": weight_map}, indent=2))
    return files


class TensorFiles:
    """The tensors of a model directory (one file or shards with an index), read one at a time.

    Every header is read and checked when the directory is opened (offsets inside the file, sizes
    that match the shapes, names listed once), so a truncated or foreign file fails before any
    model is built, as a DataError naming the file and ``fix`` (what the user should do)."""

    def __init__(self, directory, fix: str = "download or write it again"):
        self.directory = Path(directory)
        self.fix = fix
        self._advance = None  # set by progress(): called with the bytes of each tensor read
        self._entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        self._digests: dict[str, str] = {}  # by tensor name, from files that carry them
        self.metadata: dict[str, str] = {}
        index = self.directory / INDEX
        if index.is_file():
            try:
                listed = json.loads(index.read_text())
                files = sorted(set(listed["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise DataError(f"{index} cannot be read ({type(error).__name__}: {error}); {fix}") from None
        elif (self.directory / WEIGHTS).is_file():
            files = [WEIGHTS]
        else:
            raise DataError(f"{self.directory} has no {WEIGHTS} or {INDEX}; {fix}")
        for name in files:
            path = self.directory / name
            if Path(name).name != name:
                raise DataError(f"{index} names the shard {name!r} outside its directory; {fix}")
            meta = self._read_header(path)
            self.metadata = self.metadata or meta

    def _read_header(self, path: Path) -> dict[str, str]:
        try:
            size = path.stat().st_size
            with open(path, "rb") as handle:
                head = handle.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than its 8-byte header length")
                (length,) = struct.unpack("<Q", head)
                if length > min(_MAX_HEADER, size - 8):
                    raise ValueError(f"a header of {length} bytes in a file of {size}")
                header = json.loads(handle.read(length))
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
            start = 8 + length
            meta = header.pop("__metadata__", None) or {}
            digests = json.loads(meta.get(TENSOR_DIGESTS, "{}")) if isinstance(meta, dict) else {}
            if not isinstance(digests, dict):
                raise ValueError(f"its {TENSOR_DIGESTS} metadata is not an object")
            for name, info in header.items():
                dtype = _DTYPES.get(info.get("dtype"))
                shape = tuple(int(d) for d in info.get("shape"))
                begin, end = (int(v) for v in info.get("data_offsets"))
                if dtype is None:
                    raise ValueError(f"{name} has the unknown dtype {info.get('dtype')!r}")
                count = 1
                for dim in shape:
                    count *= dim
                if end - begin != count * torch.empty((), dtype=dtype).element_size() or begin < 0 \
                        or start + end > size:
                    raise ValueError(f"{name} lies outside the file or does not match its shape {list(shape)}")
                if name in self._entries:
                    raise ValueError(f"{name} is also in {self._entries[name][0].name}")
                self._entries[name] = (path, info["dtype"], shape, start + begin, end - begin)
                if name in digests:
                    self._digests[name] = str(digests[name])
        except (OSError, ValueError, TypeError, AttributeError, json.JSONDecodeError, struct.error) as error:
            raise DataError(f"{path} is not a readable safetensors file ({type(error).__name__}: "
                            f"{str(error)[:200]}): it is truncated or corrupt; {self.fix}") from None
        return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}

    def check_digest(self, recorded: str | None, record: str) -> None:
        """Refuse weights whose tensor digests are not those ``record`` (a file name) recorded as
        ``recorded`` (None: a file written before records kept one; nothing to check)."""
        if recorded is None:
            return
        if set(self._digests) != set(self._entries) or weights_digest(self._digests) != recorded:
            raise DataError(f"{self.directory}: the weights do not carry the tensor digests {record} records for "
                            f"them (stripped, or the files replaced); {self.fix}")

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._entries[name][1]]

    @property
    def nbytes(self) -> int:
        return sum(entry[4] for entry in self._entries.values())

    def get(self, name: str, dtype: torch.dtype | None = None) -> Tensor | None:
        """Tensor ``name`` (None when absent), read from disk into new memory, cast to ``dtype``."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        path, code, shape, offset, nbytes = entry
        raw = torch.empty(nbytes, dtype=torch.uint8)
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                got = handle.readinto(memoryview(raw.numpy()))
        except OSError as error:
            raise DataError(f"{path} cannot be read ({error}); {self.fix}") from None
        if got != nbytes:
            raise DataError(f"{path} ends inside the tensor {name}: it is truncated; {self.fix}")
        expected = self._digests.get(name)
        if expected is not None and hashlib.sha256(memoryview(raw.numpy())).hexdigest() != expected:
            raise DataError(f"{path}: the bytes of tensor {name} are not those it was written with (the file was "
                            f"edited or corrupted); {self.fix}")
        if self._advance is not None:
            self._advance(nbytes)
        tensor = raw.view(_DTYPES[code]).reshape(shape)
        if tensor.is_floating_point() and tensor.numel() and not all_finite(tensor):
            raise DataError(f"{path}: tensor {name} holds non-finite values (inf or nan), which no trained "
                            f"model has; {self.fix}")
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    @contextmanager
    def progress(self, description: str):
        """A progress bar (bytes, rate, time left) over reading every tensor, for large files."""
        from spikellm.progress import byte_progress

        log.info("%s: %d tensors, %.2f GB in %d file(s)", description, len(self._entries), self.nbytes / 1e9,
                 len({entry[0] for entry in self._entries.values()}))
        with byte_progress(description, self.nbytes) as advance:
            self._advance = advance
            try:
                yield
            finally:
                self._advance = None

    def items(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
        for name in self._entries:
            yield name, self.get(name, dtype)


def all_finite(tensor: Tensor) -> bool:
    """Whether every value is finite: a sum in the tensor's dtype (nan and inf propagate; ~10 GB/s)
    and, only when that sum is not finite (also when finite values overflow it), the exact check."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def weight_files(directory) -> list[Path]:
    """The weight files of a directory written by :func:`write_tensors` (for sizes and messages)."""
    directory = Path(directory)
    return sorted(p for p in directory.glob("model*.safetensors") if p.is_file())


def total_bytes(directory) -> int:
    return sum(os.path.getsize(p) for p in weight_files(directory))
