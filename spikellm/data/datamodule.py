"""Next-token prediction batches: corpus -> train/validation documents -> tokens -> packed blocks."""
from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from spikellm.data.corpus import check_source, load_documents
from spikellm.data.tokenizer import Tokenizer, atomic_write, build_tokenizer, check_tokenizer_args, digest_documents
from spikellm.checks import check_int
from spikellm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

HUB_SOURCES = ("wikitext2", "c4")  # they come with their own validation split
# Part of the token cache key: bump it when the way documents become one token stream changes.
TOKENS_FORMAT_VERSION = "eos-between-documents-v1"


class TextDataModule(LightningDataModule):
    """Batches of ``(inputs, targets)``, LongTensors ``[batch_size, block_size]``, from a text corpus.

    :meth:`setup` loads ``source`` (see :func:`~spikellm.data.load_documents`), holds out whole
    documents making up about ``val_fraction`` of its text for validation (chosen by ``seed``; see
    :func:`split_documents`; hub sources come with their own validation split), trains (or
    loads) the tokenizer on the training documents only, joins each split's documents with eos
    between them and packs the tokens into blocks of ``block_size + 1`` that overlap by one
    token: inputs are ``block[:-1]``, targets ``block[1:]``.
    The tokenizer and the token ids are cached under ``cache_dir``.
    """

    def __init__(self, source: str = "pydoc", path: str | None = None, text_field: str = "text",
                 block_size: int = 128, batch_size: int = 8, val_fraction: float = 0.05, vocab_size: int = 2048,
                 tokenizer_path: str | None = None, cache_dir: str = "~/.cache/spikellm", num_workers: int = 0,
                 seed: int = 0):
        super().__init__()
        # Everything checkable without reading the corpus fails here, at config time.
        check_source(source, path)
        check_int("block_size", block_size, 2)
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("seed", seed, 0)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ConfigError("val_fraction", val_fraction, "must be a number strictly between 0 and 1, e.g. 0.05")
        check_tokenizer_args(vocab_size, tokenizer_path)
        self.save_hyperparameters()
        self.cache_dir = Path(cache_dir).expanduser()
        self.tokenizer: Tokenizer | None = None
        self.train_tokens: torch.Tensor | None = None
        self.val_tokens: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size, special tokens included (after :meth:`setup`)."""
        return self._ready().vocab_size

    def setup(self, stage: str | None = None) -> None:
        """Load, split, tokenize and pack the corpus; later calls do nothing."""
        if self.tokenizer is not None:
            return
        hp = self.hparams
        if hp.source in HUB_SOURCES:
            train_docs = load_documents(hp.source, split="train")
            val_docs = load_documents(hp.source, split="validation")
        else:
            train_docs, val_docs = split_documents(load_documents(hp.source, hp.path, hp.text_field),
                                                   hp.val_fraction, hp.seed)
        tokenizer = build_tokenizer(train_docs, hp.vocab_size, hp.tokenizer_path, self.cache_dir)
        self.train_tokens = self._tokenize(train_docs, tokenizer, "train")
        self.val_tokens = self._tokenize(val_docs, tokenizer, "validation")
        train_blocks = (len(self.train_tokens) - 1) // hp.block_size
        if train_blocks < hp.batch_size:  # drop_last would leave no batch, and training would silently do nothing
            raise DataError(f"the train split packs into {train_blocks} blocks of {hp.block_size} tokens, fewer than "
                            f"one batch (data.batch_size={hp.batch_size}); lower data.batch_size or data.block_size, "
                            f"or add text")
        self.tokenizer = tokenizer  # set last: it marks setup as done
        log.info("%s: %d train and %d validation tokens, %d-token vocabulary", hp.source, len(self.train_tokens),
                 len(self.val_tokens), tokenizer.vocab_size)

    def state_dict(self) -> dict:
        """Saved in every Lightning checkpoint: the tokenizer, so a checkpoint evaluates on its own."""
        return {} if self.tokenizer is None else {"tokenizer": self.tokenizer.state()}

    def train_dataloader(self) -> DataLoader:
        """Shuffled full batches, in an order fixed by ``seed``."""
        self._ready()
        return self._loader(self.train_tokens, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(self.hparams.seed))

    def val_dataloader(self) -> DataLoader:
        """All validation blocks, in corpus order."""
        self._ready()
        return self._loader(self.val_tokens, shuffle=False, drop_last=False)

    def _loader(self, tokens: torch.Tensor, **kwargs) -> DataLoader:
        hp = self.hparams
        blocks = tokens.unfold(0, hp.block_size + 1, hp.block_size)  # a view: [n_blocks, block_size + 1]
        return DataLoader(TensorDataset(blocks[:, :-1], blocks[:, 1:]), batch_size=hp.batch_size,
                          num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), **kwargs)

    def _ready(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError("TextDataModule.setup() has not run yet; call it (a Trainer does) before using the data")
        return self.tokenizer

    def _tokenize(self, documents: Sequence[str], tokenizer: Tokenizer, split: str) -> torch.Tensor:
        key = digest_documents(documents, f"{TOKENS_FORMAT_VERSION}:{tokenizer.fingerprint}")
        cache = self.cache_dir / "tokens" / f"{key}.npy"
        if cache.exists():
            ids = np.load(cache)
        else:
            dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.int32  # half the disk for small vocabularies
            ids = _join_with_eos(tokenizer.encode_batch(documents), tokenizer.eos_id, dtype)
            atomic_write(cache, lambda f: np.save(f, ids))
        block_size = self.hparams.block_size
        if len(ids) < block_size + 1:
            more = " or raise data.val_fraction" if split == "validation" and self.hparams.source not in HUB_SOURCES \
                else ""
            raise DataError(f"the {split} split of the corpus has {len(ids)} tokens, but block_size={block_size} "
                            f"needs at least {block_size + 1}; lower data.block_size or add text{more}")
        return torch.from_numpy(ids.astype(np.int64))


def split_documents(documents: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split into (train, validation) documents, holding out about ``val_fraction`` of the text.

    Documents are held out in an order shuffled by ``seed`` while they fit in ``val_fraction`` of
    the characters (counting characters, not documents: document sizes often vary 100-fold), and
    identical documents go to the same side. A single document is cut in two by characters
    instead, at a newline near the cut if there is one.
    """
    unique = list(dict.fromkeys(documents))  # a copy on each side (pydoc's "if" and "else") would leak validation
    if len(unique) == 1:
        text = unique[0]
        cut = int(len(text) * (1 - val_fraction))
        # Prefer the nearest line break within a quarter of the validation share, so no split starts mid-line
        # yet the share stays close to val_fraction; one long line is cut where it is.
        window = int(len(text) * val_fraction / 4)
        breaks = [i + 1 for i in (text.rfind("\n", max(0, cut - window), cut), text.find("\n", cut, cut + window))
                  if 0 <= i < len(text) - 1]
        cut = min(breaks, key=lambda i: abs(i - cut), default=cut)
        return [text[:cut]], [text[cut:]]
    random.Random(seed).shuffle(unique)
    budget, held_out = val_fraction * sum(map(len, unique)), set()
    for doc in unique:
        if len(doc) <= budget:
            held_out.add(doc)
            budget -= len(doc)
    # Every document larger than the share: hold out the smallest (not all of them, as val_fraction < 1).
    held_out = held_out or {min(unique, key=len)}
    return [doc for doc in documents if doc not in held_out], [doc for doc in documents if doc in held_out]


def _join_with_eos(encoded: list[list[int]], eos_id: int, dtype) -> np.ndarray:
    """One token stream: the documents' ids with eos between documents."""
    stream = itertools.chain.from_iterable(itertools.chain((eos_id,), ids) for ids in encoded)
    return np.fromiter(stream, dtype, count=sum(map(len, encoded)) + len(encoded))[1:]  # drop the leading eos
