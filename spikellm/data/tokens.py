"""Corpus -> splits -> one flat file of token ids per split, read through a memory map.

Nothing here holds a corpus or its token ids whole, so memory does not grow with the corpus:

- :func:`scan` reads the documents once, in blocks, for their content hash (the cache key) and
  the per-document sizes and digests that a fraction split needs (16 bytes a document);
- :func:`split_by_fraction` holds out whole documents (or cuts a single one at a line break)
  from those sizes alone; a :class:`Split` is a selection of the scanned documents;
- :func:`chunk_texts` reads a selected document in chunks that end at line breaks, which
  :func:`write_tokens` tokenizes a batch at a time and appends to a temporary file, renamed
  into the cache when whole (:func:`cached_tokens`, under a lock: one process builds, the
  ranks of a DDP job and concurrent runs wait for it and read it);
- :class:`TokenBlocks` serves training blocks from the memory-mapped file.

Token files are raw arrays, ``uint16`` when the vocabulary fits, else ``uint32``:
``tokens/<key>-<dtype>.bin`` under the cache directory, ``<key>`` hashing the split's text,
how it was split and the tokenizer; beside each, the SHA-256 of its bytes
(:mod:`spikellm.data.cache`): a file edited, truncated or without a digest is tokenized again
with one warning, never read.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from spikellm.data.corpus import TextFile
from spikellm.data.cache import cache_lock, check_file, discard, record_digest, write_cache_file
from spikellm.progress import byte_progress

log = logging.getLogger(__name__)

# Part of the token cache key: bump it when the way documents become one token stream changes.
TOKENS_FORMAT_VERSION = "eos-between-documents-chunked-v2"
CHUNK_BYTES = 64 << 10  # text per tokenizer input: enough to amortise a call, small enough to share out over the cores
BATCH_BYTES = 4 << 20  # text per encode_batch call (the Rust backend spreads a batch's chunks over the cores)
MEMO_MIN_BYTES = 1 << 20  # files whose scan is remembered (smaller ones are read again: it is quick)

@dataclass
class Scan:
    """What one pass over a corpus learns: its content hash, and per document its UTF-8 size, its
    length in characters, the first 8 bytes of its SHA-256 (identical documents go to the same
    side of a split) and whether it has text (blank files are skipped)."""
    key: str
    sizes: np.ndarray
    chars: np.ndarray
    digests: np.ndarray
    kept: np.ndarray


def scan(documents: Iterable, memo_dir: Path | None = None) -> Scan:
    """Read ``documents`` once (blocks of :class:`TextFile` documents; strings whole) and hash
    them; what is learnt of large files is kept under ``memo_dir`` (see :func:`_check_file`)."""
    corpus = hashlib.sha256(b"corpus-v1\0")
    sizes, chars, digests, kept = array("q"), array("q"), array("Q"), bytearray()
    for doc in documents:
        if isinstance(doc, TextFile):
            (value, has_text, length), size = _check_file(doc, memo_dir), doc.size
        else:
            data = doc.encode()
            value = hashlib.sha256(data).digest()
            has_text, length, size = True, len(doc), len(data)  # blank strings were skipped by iter_documents
        corpus.update(size.to_bytes(8, "little") + value)  # length-prefixed, so ["ab", "c"] and ["a", "bc"] differ
        sizes.append(size)
        chars.append(length)
        digests.append(int.from_bytes(value[:8], "little"))
        kept.append(has_text)
    return Scan(corpus.hexdigest()[:32], np.frombuffer(sizes, np.int64), np.frombuffer(chars, np.int64),
                np.frombuffer(digests, np.uint64), np.frombuffer(bytes(kept), np.bool_))


def _check_file(doc: TextFile, memo_dir: Path | None) -> tuple[bytes, bool, int]:
    """:meth:`TextFile.check`, remembered by the file's identity (path, size, mtime in ns, inode)
    for files of :data:`MEMO_MIN_BYTES` or more: a rerun on an unchanged 1 GB corpus then reads
    none of it before finding its tokens in the cache (hashing it takes about a second)."""
    if memo_dir is None or doc.size < MEMO_MIN_BYTES:
        return doc.check()
    stat = doc.path.stat()
    memo = memo_dir / "scans" / f"{_key('scan-v1', str(doc.path.resolve()), *map(str, (stat.st_size, stat.st_mtime_ns, stat.st_ino)))}.json"
    try:
        found = json.loads(memo.read_text())
        return bytes.fromhex(found["sha256"]), found["text"], found["chars"]
    except (OSError, ValueError, KeyError):
        pass
    digest, has_text, chars = doc.check()
    record = {"sha256": digest.hex(), "text": has_text, "chars": chars}
    write_cache_file(memo, lambda f: f.write(json.dumps(record).encode()))
    return digest, has_text, chars


@dataclass
class Split:
    """The text of split ``name``: the ``keep``-ed documents of a corpus (``documents()`` iterates
    it afresh), some cut to a byte range (``ranges``). ``key`` hashes exactly this text; ``origin``
    says where it came from (``kind``: paths, fraction, hub)."""
    name: str
    documents: Callable[[], Iterable]
    keep: np.ndarray
    key: str
    sizes: np.ndarray
    kind: str
    origin: str
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        whole = int(self.sizes[self.keep].sum())
        return whole + sum(end - start - int(self.sizes[i]) for i, (start, end) in self.ranges.items())

    def materialize(self) -> list[str]:
        """The split's documents as strings, in memory (for small corpora and tests)."""
        return [_read(doc, *self.ranges[i]).decode() if i in self.ranges else doc if isinstance(doc, str) else doc.text()
                for i, doc in zip(range(len(self.keep)), self.documents()) if self.keep[i]]

    def texts(self, chunk_bytes: int | None = None) -> Iterator[tuple[str, int, bool]]:
        """``(text, its UTF-8 size, whether it starts a document)`` for each chunk, in corpus order."""
        for index, doc in zip(range(len(self.keep)), self.documents()):
            if self.keep[index]:
                start, end = self.ranges.get(index, (0, len(doc) if isinstance(doc, TextFile) else None))
                pieces = chunk_texts(doc, start, end, chunk_bytes or CHUNK_BYTES)
                for first, (text, size) in zip(itertools.chain((True,), itertools.repeat(False)), pieces):
                    yield text, size, first


def whole_split(name: str, documents: Callable[[], Iterable], kind: str, origin: str, empty: Exception,
                memo_dir: Path | None = None) -> Split:
    """Every non-blank document of a corpus as split ``name``; ``empty`` is raised if there is none."""
    found = scan(documents(), memo_dir)
    if not found.kept.any():
        raise empty
    return Split(name, documents, found.kept.copy(), _key(found.key, "whole"), found.sizes, kind, origin)


def split_by_fraction(documents: Callable[[], Iterable], val_fraction: float, seed: int, origin: str,
                      empty: Exception, memo_dir: Path | None = None) -> tuple[Split, Split]:
    """(train, validation) of a corpus, holding out about ``val_fraction`` of its text.

    Documents are held out in an order shuffled by ``seed`` while they fit in ``val_fraction`` of
    the characters (counting characters, not documents: document sizes often vary 100-fold), and
    identical documents go to the same side. A single document is cut in two instead, at
    ``val_fraction`` of its bytes, moved to a line break near the cut if there is one.
    """
    found = scan(documents(), memo_dir)
    kept = np.flatnonzero(found.kept)
    # identical documents are one: their first occurrences, in corpus order
    _, first = np.unique(found.digests[kept], return_index=True)
    unique = kept[np.sort(first)]
    if len(unique) == 0:
        raise empty
    train_keep, val_keep = np.zeros_like(found.kept), np.zeros_like(found.kept)
    ranges: tuple[dict, dict] = ({}, {})
    if len(unique) == 1:
        index = int(unique[0])
        doc = next(itertools.islice(documents(), index, None))
        size = int(found.sizes[index])
        cut = _cut_single(doc, size, val_fraction)
        train_keep[index] = val_keep[index] = True
        ranges = ({index: (0, cut)}, {index: (cut, size)})
    else:
        order = list(range(len(unique)))
        random.Random(seed).shuffle(order)
        sizes = found.chars[unique]
        budget, held = val_fraction * int(sizes.sum()), []
        for u in order:
            if sizes[u] <= budget:
                held.append(u)
                budget -= sizes[u]
        # Every document larger than the share: hold out the smallest (not all of them, as val_fraction < 1).
        held = held or [min(order, key=lambda u: sizes[u])]
        held_out = np.isin(found.digests, found.digests[unique[held]]) & found.kept
        val_keep, train_keep = held_out, found.kept & ~held_out
    how = f"fraction:{val_fraction!r}:{seed}"
    make = lambda name, keep, cut: Split(name, documents, keep, _key(found.key, how, name), found.sizes, "fraction",
                                         origin if name == "train" else _held_out(origin, val_fraction, seed), cut)
    return make("train", train_keep, ranges[0]), make("validation", val_keep, ranges[1])


def _held_out(origin: str, val_fraction: float, seed: int) -> str:
    return f"{val_fraction * 100:g}% of {origin}, held out by seed {seed}"


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _cut_single(doc, size: int, val_fraction: float) -> int:
    """Where to cut a single document: ``(1 - val_fraction)`` of its bytes, moved to the nearest
    line break within a quarter of the validation share (so no split starts mid-line, yet the
    share stays close), else to a character boundary."""
    cut = int(size * (1 - val_fraction))
    window = int(size * val_fraction / 4)
    base = max(0, cut - window - 4)  # 4 bytes more: the start of a character the cut may fall inside
    data = _read(doc, base, min(size, cut + window + 1))
    at = cut - base
    breaks = [base + i + 1 for i in (data.rfind(b"\n", max(0, cut - window) - base, at), data.find(b"\n", at, at + window))
              if 0 <= i and base + i < size - 1]
    if breaks:
        return min(breaks, key=lambda i: abs(i - cut))
    return base + _char_boundary(data, at)


def _read(doc, start: int, end: int) -> bytes:
    return doc.read(start, end) if isinstance(doc, TextFile) else doc.encode()[start:end]


def _char_boundary(data: bytes, at: int) -> int:
    """``at``, or the start of the UTF-8 character it falls inside."""
    while 0 < at < len(data) and data[at] & 0xC0 == 0x80:  # 10xxxxxx: a continuation byte
        at -= 1
    return at


def chunk_texts(doc, start: int = 0, end: int | None = None, size: int = CHUNK_BYTES) -> Iterator[tuple[str, int]]:
    """Bytes ``start:end`` of a document as ``(text, UTF-8 size)`` chunks of at most ``size`` bytes.

    A chunk ends, by preference, at a line break with text on both sides: byte-level BPE
    pre-tokenization (GPT-2's pattern) splits there anyway, so the chunks tokenize as the whole
    document does. Failing that (within the chunk's second half), at any line break; else at a
    character boundary.
    """
    if isinstance(doc, str):
        if end is None and start == 0 and len(doc) * 4 <= size:  # small: no need to encode and decode
            yield doc, len(doc.encode())
            return
        data = doc.encode()
        read = lambda a, b: data[a:b]
        end = len(data) if end is None else end
    else:
        read = doc.read
    while start < end:
        limit = min(size, end - start)
        block = read(start, start + limit + 1)[:end - start]  # one byte more: what follows a line break
        cut = limit if limit == end - start else _chunk_end(block, limit)
        yield block[:cut].decode("utf-8"), cut
        start += cut


def _chunk_end(block: bytes, limit: int) -> int:
    newline = block.rfind(b"\n", 0, limit)
    if newline < 0:
        return _char_boundary(block, limit) or limit
    i = newline
    while i >= limit // 2:
        if i > 0 and not block[i - 1:i].isspace() and not block[i + 1:i + 2].isspace():
            return i + 1
        i = block.rfind(b"\n", 0, i)
    return newline + 1


def token_dtype(vocab_size: int):
    """uint16 when every id fits (half the disk and page cache), else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_tokens(path: Path, texts: Iterable[tuple[str, int, bool]], tokenizer, total_bytes: int, name: str) -> int:
    """Tokenize ``texts`` (:meth:`Split.texts`) a batch at a time into ``path``, eos between
    documents, atomically; the number of tokens."""
    dtype, eos = token_dtype(tokenizer.vocab_size), [tokenizer.eos_id]
    count, first = 0, True
    digest = hashlib.sha256()  # of the bytes as written: the cache's content digest, at no extra read

    def write(f):
        nonlocal count, first
        with byte_progress(f"tokenizing the {name} split", total_bytes) as advance:
            for batch in _batches(texts, BATCH_BYTES):
                pieces = []
                for (_, _, starts), ids in zip(batch, tokenizer.encode_batch([text for text, _, _ in batch])):
                    if starts and not first:
                        pieces.append(eos)
                    pieces.append(ids)
                    first = False
                n = sum(map(len, pieces))
                data = np.fromiter(itertools.chain.from_iterable(pieces), dtype, count=n).tobytes()
                f.write(data)
                digest.update(data)
                count += n
                advance(sum(size for _, size, _ in batch), count)

    start = time.monotonic()
    write_cache_file(path, write)
    record_digest(path, digest.hexdigest())
    seconds = time.monotonic() - start
    log.info("tokenized the %s split: %d tokens from %.1f MB in %.1f s (%.0f tokens/s)", name, count,
             total_bytes / 1e6, seconds, count / max(seconds, 1e-9))
    return count


def _batches(texts, max_bytes: int):
    batch, size = [], 0
    for item in texts:
        batch.append(item)
        size += item[1]
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def open_tokens(path: Path, dtype) -> np.ndarray:
    """A token file as a read-only memory map (an empty file, which cannot be mapped, as an empty array)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def cached_tokens(cache_dir: Path, split: Split, tokenizer) -> np.ndarray:
    """The split's token ids, from the cache or tokenized into it (once: under a file lock)."""
    dtype = token_dtype(tokenizer.vocab_size)
    key = _key(TOKENS_FORMAT_VERSION, split.key, tokenizer.fingerprint)
    path = cache_dir / "tokens" / f"{key}-{np.dtype(dtype).name}.bin"
    if path.exists() and check_file(path) is None:  # unchanged since it was checked: a stat
        return open_tokens(path, dtype)
    with cache_lock(path):  # another process may have built (or checked) it while this one waited
        distrusted = check_file(path) if path.exists() else None
        if distrusted is not None:
            log.warning("the cached token file of the %s split (%s) %s: tokenizing it again", split.name, path,
                        distrusted)
            discard(path)
        if not path.exists():
            write_tokens(path, split.texts(), tokenizer, split.nbytes, split.name)
    return open_tokens(path, dtype)


class TokenBlocks(Dataset):
    """Block ``i`` of a token stream: ``(tokens[i·B : i·B+B], tokens[i·B+1 : i·B+B+1])`` as int64
    tensors, read from a memory map (only the pages of the blocks drawn are ever read).

    Pickles as the file's name (for DataLoader workers), not its contents."""

    def __init__(self, tokens: np.ndarray, block_size: int):
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.block_size)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} of {len(self)}")
        start = index * self.block_size
        block = torch.from_numpy(self.tokens[start:start + self.block_size + 1].astype(np.int64))
        return block[:-1], block[1:]

    def __getstate__(self):
        tokens = self.tokens
        if isinstance(tokens, np.memmap):
            return {"file": tokens.filename, "dtype": tokens.dtype.str, "block_size": self.block_size}
        return {"tokens": tokens, "block_size": self.block_size}

    def __setstate__(self, state):
        tokens = state.get("tokens")
        if tokens is None:
            tokens = np.memmap(state["file"], dtype=np.dtype(state["dtype"]), mode="r")
        self.tokens, self.block_size = tokens, state["block_size"]
