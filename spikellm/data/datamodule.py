"""Next-token prediction batches: corpus -> train/validation(/test) splits -> token files -> packed blocks."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler

from spikellm.data.corpus import check_paths, empty_corpus, iter_documents
from spikellm.data.tokenizer import Tokenizer, bpe_tokenizer, build_tokenizer, check_tokenizer_args
from spikellm.data.tokens import Split, TokenBlocks, cached_tokens, split_by_fraction, whole_split
from spikellm.checks import check_int
from spikellm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

HUB_SOURCES = ("wikitext2", "c4")  # they come with their own validation split
SPLIT_KEYS = {"train": "train_path", "validation": "val_path", "test": "test_path"}


class TextDataModule(LightningDataModule):
    """Batches of ``(inputs, targets)``, LongTensors ``[batch_size, block_size]``, from a text corpus.

    Splits: ``train_path`` and ``val_path`` (and ``test_path``), each a file or a folder of
    .txt/.json/.jsonl files, are the splits as given; otherwise :meth:`setup` loads ``source``
    (see :func:`~spikellm.data.iter_documents`: ``path`` or ``train_path`` for local text) and
    holds out whole documents making up about ``val_fraction`` of its text for validation
    (chosen by ``seed``; see :func:`~spikellm.data.tokens.split_by_fraction`); hub sources come
    with their own validation split. The tokenizer is trained (or loaded) on the training split
    only; each split's documents are tokenized, eos between them, into a token file, and packed
    into blocks of ``block_size + 1`` that overlap by one token: inputs are ``block[:-1]``,
    targets ``block[1:]``.

    Memory does not grow with the corpus: the text is streamed in chunks (see
    :mod:`spikellm.data.tokens`) and ``train_tokens``, ``val_tokens`` and ``test_tokens`` are
    read-only ``np.memmap`` arrays (uint16, or uint32 for vocabularies over 65,536) of the token
    files, which are cached under ``cache_dir`` by content, with the tokenizer.
    """

    def __init__(self, source: str = "pydoc", path: str | None = None, text_field: str = "text",
                 block_size: int = 128, batch_size: int = 8, val_fraction: float = 0.05, vocab_size: int = 2048,
                 tokenizer_path: str | None = None, cache_dir: str = "~/.cache/spikellm", num_workers: int = 0,
                 seed: int = 0, train_path: str | None = None, val_path: str | None = None,
                 test_path: str | None = None):
        super().__init__()
        # Everything checkable without reading the corpus fails here, at config time.
        from spikellm.data.corpus import SOURCES
        if source not in SOURCES:
            raise ConfigError("source", source, "one of: " + ", ".join(SOURCES))
        check_paths(source, path, train_path, val_path, test_path)
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
        self.train_tokens: np.ndarray | None = None
        self.val_tokens: np.ndarray | None = None
        self.test_tokens: np.ndarray | None = None
        self._splits: dict[str, Split] = {}
        self._resume_at: tuple[int, int] | None = None  # (epoch, batch) to go on from, from a checkpoint

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size, special tokens included (after :meth:`setup`)."""
        return self._ready().vocab_size

    def setup(self, stage: str | None = None) -> None:
        """Split, tokenize (or find in the cache) and map the corpus; later calls do nothing.

        Every process of a DDP job calls it: one builds each cache file under a lock, the others
        wait for it and map the same file."""
        if self.tokenizer is not None:
            return
        hp, start = self.hparams, time.monotonic()
        splits = self._plan_splits()
        train = splits["train"]
        if hp.tokenizer_path is not None:
            tokenizer = build_tokenizer([], hp.vocab_size, hp.tokenizer_path)
        else:
            tokenizer = bpe_tokenizer(lambda: ((text, size) for text, size, _ in train.texts()), train.key,
                                      hp.vocab_size, self.cache_dir, train.nbytes)
        tokens = {name: cached_tokens(self.cache_dir, split, tokenizer) for name, split in splits.items()}
        for name, ids in tokens.items():
            if len(ids) < hp.block_size + 1:
                more = " or raise data.val_fraction" if splits[name].kind == "fraction" and name == "validation" else ""
                raise DataError(f"the {name} split ({splits[name].origin}) has {len(ids)} tokens, but "
                                f"block_size={hp.block_size} needs at least {hp.block_size + 1}; lower "
                                f"data.block_size or add text{more}")
        self.train_tokens, self.val_tokens, self.test_tokens = tokens["train"], tokens["validation"], tokens.get("test")
        self._splits = splits
        train_blocks = (len(self.train_tokens) - 1) // hp.block_size
        if train_blocks < hp.batch_size:  # drop_last would leave no batch, and training would silently do nothing
            raise DataError(f"the train split packs into {train_blocks} blocks of {hp.block_size} tokens, fewer than "
                            f"one batch (data.batch_size={hp.batch_size}); lower data.batch_size or data.block_size, "
                            f"or add text")
        self.tokenizer = tokenizer  # set last: it marks setup as done
        log.info("%s: %s tokens, %d-token vocabulary; data ready in %.1f s", hp.source,
                 ", ".join(f"{len(ids):,} {name}" for name, ids in tokens.items()), tokenizer.vocab_size,
                 time.monotonic() - start)

    def _plan_splits(self) -> dict[str, Split]:
        """Which text makes each split (one pass over the corpus, for its content hash)."""
        hp = self.hparams
        documents = lambda key, value, split="train": partial(iter_documents, hp.source, value, hp.text_field, split,
                                                              f"data.{key}")
        empty = lambda key, value, split="train": empty_corpus(hp.source, value, f"data.{key}", split)
        if hp.source in HUB_SOURCES:
            return {name: whole_split(name, documents("path", None, name), "hub", f"the {name} split of {hp.source} "
                                      f"on the Hugging Face hub", empty("path", None, name), self.cache_dir)
                    for name in ("train", "validation")}
        given = {name: getattr(hp, key) for name, key in SPLIT_KEYS.items() if getattr(hp, key) is not None}
        splits = {name: whole_split(name, documents(SPLIT_KEYS[name], value), "paths",
                                    f"data.{SPLIT_KEYS[name]}={value}", empty(SPLIT_KEYS[name], value), self.cache_dir)
                  for name, value in given.items()}
        if "validation" not in splits:  # held out from data.path (or data.train_path, or pydoc)
            key, value = ("train_path", hp.train_path) if hp.train_path is not None else ("path", hp.path)
            origin = f"data.{key}={value}" if hp.source == "text" else "the pydoc corpus"
            splits["train"], splits["validation"] = split_by_fraction(documents(key, value), hp.val_fraction,
                                                                      hp.seed, origin, empty(key, value),
                                                                      self.cache_dir)
        return splits

    def split_summary(self) -> dict[str, dict]:
        """Per split (train, validation, and test when there is one): its token count, ``kind``
        (``paths``: files given as that split; ``fraction``: held out of one corpus by
        ``val_fraction``; ``hub``: a hub dataset's own split) and where it came from, in words.
        Needs :meth:`setup`."""
        self._ready()
        tokens = {"train": self.train_tokens, "validation": self.val_tokens, "test": self.test_tokens}
        return {name: {"tokens": len(tokens[name]), "kind": split.kind, "from": split.origin}
                for name, split in self._splits.items()}

    def state_dict(self) -> dict:
        """Saved in every Lightning checkpoint: the tokenizer, so a checkpoint evaluates on its own,
        and where training is in the data (``train_position``), so a resumed run goes on with the
        batch that comes next (see :meth:`train_dataloader`)."""
        state = {} if self.tokenizer is None else {"tokenizer": self.tokenizer.state()}
        hp = self.hparams
        # which documents were held out: evaluation measures on these, never on ones it trained on
        state["split"] = {"source": hp.source, "seed": hp.seed, "val_fraction": hp.val_fraction,
                          "explicit": bool(getattr(hp, "train_path", None))}
        position = self._train_position()
        if position is not None:
            hp = self.hparams
            state["train_position"] = {**position, "seed": hp.seed, "batch_size": hp.batch_size,
                                       "block_size": hp.block_size, "blocks": self._train_blocks(),
                                       "world_size": self._world_size()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Lightning calls it when ``trainer.fit(ckpt_path=...)`` restores a checkpoint, before it
        asks for the train loader: training goes on from the batch after the checkpoint's."""
        self.check_resumable(state)
        position = state.get("train_position")
        self._resume_at = None if position is None else divmod(int(position["batches_done"]),
                                                               int(position["epoch_batches"]))

    def check_resumable(self, state: dict, source: str = "the checkpoint") -> None:
        """Raise a :class:`DataError` if ``state`` (a :meth:`state_dict` from a checkpoint) was made
        on other data than this module's: another tokenizer, or a batching under which the
        checkpoint's place in the epoch means other batches. Needs :meth:`setup`."""
        tokenizer = self._ready()
        theirs = state.get("tokenizer")
        if theirs is not None and not _same_tokenizer(theirs, tokenizer.state()):
            raise DataError(f"{source} was trained with another tokenizer ({_describe_tokenizer(theirs)}) than "
                            f"data={self.hparams.source} gives ({_describe_tokenizer(tokenizer.state())}); resume "
                            f"with the data settings it was trained with (data.source, data.path, data.vocab_size, "
                            f"data.tokenizer_path, data.val_fraction, data.train_path, seed)")
        position = state.get("train_position")
        if position is None:
            return
        hp = self.hparams
        ours = {"seed": hp.seed, "batch_size": hp.batch_size, "block_size": hp.block_size,
                "blocks": self._train_blocks(), "world_size": self._world_size()}
        differ = [key for key in ours if position.get(key, 1 if key == "world_size" else None) != ours[key]]
        if differ:
            keys = {"seed": "data.seed", "batch_size": "data.batch_size", "block_size": "data.block_size",
                    "blocks": "training blocks", "world_size": "processes (trainer.devices × num_nodes)"}
            what = ", ".join(f"{keys[k]} {position.get(k)} there, {ours[k]} here" for k in differ)
            raise DataError(f"{source} was trained on other batches ({what}): its place in the epoch would "
                            f"mean other data; resume with the data settings it was trained with")

    def train_dataloader(self) -> DataLoader:
        """Shuffled full batches: epoch ``e`` in an order that depends on ``seed`` and ``e`` only
        (:class:`EpochShuffle`; Lightning sets the epoch). After :meth:`load_state_dict` (a resumed
        run) the interrupted epoch goes on from the first batch it had not trained on."""
        self._ready()
        hp = self.hparams
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochShuffle(self._train_blocks(), hp.batch_size, hp.seed, replicas, rank)
        if self._resume_at is not None:
            sampler.resume(*self._resume_at)
            self._resume_at = None  # once: a later loader (a reload) starts its epochs whole
        return self._loader(self.train_tokens, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        """All validation blocks, in corpus order."""
        self._ready()
        return self._loader(self.val_tokens, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        """All test blocks (``data.test_path``), in corpus order."""
        self._ready()
        if self.test_tokens is None:
            raise DataError("no test split: set data.test_path=<file or folder> (with data=text) to evaluate on one")
        return self._loader(self.test_tokens, shuffle=False, drop_last=False)

    def _loader(self, tokens: np.ndarray, **kwargs) -> DataLoader:
        hp = self.hparams
        return DataLoader(TokenBlocks(tokens, hp.block_size), batch_size=hp.batch_size,
                          num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), **kwargs)

    def _train_blocks(self) -> int:
        return (len(self.train_tokens) - 1) // self.hparams.block_size  # what _loader's unfold makes

    def _train_position(self) -> dict | None:
        """How many training batches the attached trainer has trained on, and how many make its
        epoch; None outside a trainer.

        Read from Lightning's progress, not from the loader, which runs a batch ahead. The total
        count, not the epoch counter: Lightning counts an epoch cut short by ``max_steps`` as done,
        and a run resumed from there goes on with the rest of that epoch under the next number.
        """
        trainer = self.trainer
        if trainer is None or self.tokenizer is None:
            return None
        epoch_batches = trainer.num_training_batches
        if not isinstance(epoch_batches, int) or epoch_batches <= 0:  # before fit set the loader up
            epoch_batches = self._train_blocks() // (self.hparams.batch_size * self._world_size())
        return {"batches_done": int(trainer.fit_loop.epoch_loop.batch_progress.total.processed),
                "epoch_batches": int(epoch_batches)}

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _ready(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError("TextDataModule.setup() has not run yet; call it (a Trainer does) before using the data")
        return self.tokenizer


class EpochShuffle(DistributedSampler):
    """Block indices in a shuffled order per epoch: epoch ``e``'s order is a pure function of
    ``(seed, e)`` (epoch 0 is ``torch.randperm(n)`` under ``seed``), so a resumed run sees the same
    order as an uninterrupted one. Lightning calls :meth:`set_epoch` before each epoch.

    Across ``num_replicas`` processes (DDP), global batch ``g`` is ``perm[g·B·W : (g+1)·B·W]`` and
    rank ``r`` takes its ``r``-th slice of ``B``: together the ranks train on the very batch one
    process with batch ``B·W`` would, and only whole global batches are used. A
    ``DistributedSampler`` subclass, so Lightning does not wrap (and reshuffle) it.

    :meth:`resume` makes the next iteration start at a given batch of a given epoch (the batches
    before it were trained on before the checkpoint). ``len`` stays the whole epoch: Lightning
    counts the skipped batches among the epoch's and ends it after the rest. Lightning may number
    that epoch one higher than the data's (it counts an epoch cut short by ``max_steps`` as done);
    the offset is kept for the epochs after it.
    """

    # epoch e's generator seed is seed + e * _EPOCH_STRIDE (mod 2^64): an odd constant (the golden
    # ratio's 64-bit fraction) keeps the (seed, epoch) pairs of small seeds apart
    _EPOCH_STRIDE = 0x9E3779B97F4A7C15

    def __init__(self, n: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        # DistributedSampler's own __init__ would ask torch.distributed; these are its attributes
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.num_replicas, self.rank, self.shuffle, self.drop_last = num_replicas, rank, True, True
        self.epoch = 0  # the data's epoch: Lightning's plus _offset
        self._offset = 0
        self._skip: int | None = None  # batches to skip at the start of the next iteration
        self._resumed_epoch: int | None = None  # until the first set_epoch after resume()

    def set_epoch(self, epoch: int) -> None:
        """Lightning's epoch number, before each of its epochs."""
        if self._resumed_epoch is not None:
            self._offset, self._resumed_epoch = self._resumed_epoch - epoch, None
        self.epoch = epoch + self._offset

    def resume(self, epoch: int, batches: int) -> None:
        """Start the next iteration at batch ``batches`` of epoch ``epoch`` (the next number that
        :meth:`set_epoch` receives is that epoch's)."""
        self.epoch, self._skip, self._resumed_epoch = epoch, batches, epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed + epoch * self._EPOCH_STRIDE) % 2 ** 64)
        return torch.randperm(self.n, generator=generator)

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.num_replicas) * self.batch_size

    def __iter__(self):
        skip, self._skip = self._skip or 0, None
        order = self.permutation(self.epoch)
        global_batch = self.batch_size * self.num_replicas
        for start in range(skip * global_batch, self.n - global_batch + 1, global_batch):
            mine = start + self.rank * self.batch_size
            yield from order[mine:mine + self.batch_size].tolist()


def _same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two :meth:`Tokenizer.state` dicts tokenize alike (the same serialized tokenizer and eos)."""
    return a.get("eos_id") == b.get("eos_id") and json.loads(a["json"]) == json.loads(b["json"])


def _describe_tokenizer(state: dict) -> str:
    digest = hashlib.sha256(state["json"].encode()).hexdigest()[:12]
    return f"{Tokenizer.from_state(state).vocab_size} tokens, sha256 {digest}"


def split_documents(documents: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split documents in memory into (train, validation) as the data module splits a corpus
    (:func:`~spikellm.data.tokens.split_by_fraction`: about ``val_fraction`` of the characters held
    out, whole documents chosen by ``seed``, a single document cut at a line break)."""
    documents = list(documents)
    empty = DataError("split_documents needs at least one non-blank document")
    train, val = split_by_fraction(lambda: iter(documents), val_fraction, seed, "documents", empty)
    return train.materialize(), val.materialize()
