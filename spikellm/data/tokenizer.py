"""Tokenizers: a byte-level BPE trained on the corpus (cached on disk), or a local Hugging Face one."""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from spikellm.data.cache import cache_lock, check_file, discard, record_digest, write_cache_file
from spikellm.progress import byte_progress, is_local_rank_zero
from spikellm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # the 256 byte tokens and EOS
# Part of the BPE cache key: bump it when training settings change so stale caches are not reused.
BPE_FORMAT_VERSION = "bytelevel-bpe-v2"


class Tokenizer:
    """Text <-> token ids over a trained ``tokenizers.Tokenizer`` or a ``transformers`` tokenizer.

    Encoding adds no special tokens, and a literal ``<|endoftext|>`` (or the backend's eos text)
    inside a document is encoded as plain text, so only the data pipeline marks document ends.
    """

    def __init__(self, backend, eos_id: int | None = None):
        self._backend = backend
        self._raw = isinstance(backend, tokenizers.Tokenizer)
        if self._raw:
            backend.encode_special_tokens = True
            self.eos_id = backend.token_to_id(EOS) if eos_id is None else eos_id
            serialized = backend.to_str().encode()
        else:
            self.eos_id = backend.eos_token_id
            serialized = _serialize_pretrained(backend)
        if self.eos_id is None:
            raise DataError(f"the tokenizer has no end-of-text token ({EOS} or eos_token), which separates "
                            f"documents; add one to it or leave data.tokenizer_path unset to train a BPE")
        self.fingerprint = hashlib.sha256(serialized).hexdigest()

    @property
    def bos_id(self) -> int | None:
        """The beginning-of-sequence token of a pretrained tokenizer that has one (LLaMA's ``<s>``), else None."""
        return None if self._raw else self._backend.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (the model's embedding size must cover it)."""
        return self._backend.get_vocab_size(with_added_tokens=True) if self._raw else len(self._backend)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Token ids of each text; runs in parallel in the Rust backend, so prefer it for corpora."""
        texts = list(texts)
        if self._raw:  # the fast variant skips the character offsets, which nothing here uses
            return [encoding.ids for encoding in self._backend.encode_batch_fast(texts, add_special_tokens=False)]
        # verbose=False: documents are longer than model_max_length by design; they are packed into blocks later.
        return self._backend(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (a list or a 1-D tensor); special tokens are kept, so eos stays visible."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._backend.decode(ids, skip_special_tokens=False)

    def state(self) -> dict:
        """Plain strings and ints that :meth:`from_state` rebuilds this tokenizer from: what a
        checkpoint carries, so evaluation needs nothing but the checkpoint."""
        backend = self._backend if self._raw else getattr(self._backend, "backend_tokenizer", None)
        if backend is None:
            raise DataError("a slow (Python) Hugging Face tokenizer cannot be stored in a checkpoint; use its "
                            "fast version (tokenizer.json)")
        return {"json": backend.to_str(), "eos_id": int(self.eos_id)}

    @classmethod
    def from_state(cls, state: dict) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_str(state["json"]), eos_id=state["eos_id"])

    def save(self, directory: str | os.PathLike) -> None:
        """Write a Hugging Face tokenizer directory, loadable with ``build_tokenizer(tokenizer_path=...)``."""
        pretrained = _as_pretrained(self._backend) if self._raw else self._backend
        pretrained.save_pretrained(str(directory))


def check_tokenizer_args(vocab_size: int, tokenizer_path: str | os.PathLike | None) -> None:
    """Raise ConfigError for a missing tokenizer directory or a BPE vocab_size too small for bytes + eos."""
    if tokenizer_path is not None:
        if not Path(tokenizer_path).expanduser().is_dir():
            raise ConfigError("tokenizer_path", str(tokenizer_path),
                              "no such directory; set data.tokenizer_path to a local Hugging Face tokenizer "
                              "directory, or to null to train a byte-level BPE on the corpus")
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
        raise ConfigError("vocab_size", vocab_size,
                          f"must be an integer >= {MIN_BPE_VOCAB} (256 byte tokens + {EOS}) for the byte-level BPE")


def build_tokenizer(train_documents: Iterable[str], vocab_size: int, tokenizer_path: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike = "~/.cache/spikellm") -> Tokenizer:
    """The tokenizer at ``tokenizer_path``, or else a byte-level BPE trained on ``train_documents``.

    The BPE is cached under ``cache_dir`` keyed by the documents and ``vocab_size``, so a rerun on
    the same corpus loads it instead of training again. ``vocab_size`` is an upper bound: a small
    corpus may run out of merges first. It is ignored when ``tokenizer_path`` is given. (The data
    module streams its corpus to :func:`bpe_tokenizer` instead of listing it.)
    """
    check_tokenizer_args(vocab_size, tokenizer_path)
    if tokenizer_path is not None:
        return _load_pretrained(Path(tokenizer_path).expanduser())
    documents = list(train_documents)
    sizes = [len(doc.encode()) for doc in documents]
    return bpe_tokenizer(lambda: zip(documents, sizes), digest_documents(documents, ""), vocab_size, cache_dir,
                         sum(sizes))


def bpe_tokenizer(texts: Callable[[], Iterator[tuple[str, int]]], corpus_key: str, vocab_size: int,
                  cache_dir: str | os.PathLike, total_bytes: int) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` trained on the ``(text, UTF-8 size)`` pairs ``texts()``
    yields (streamed, with a progress bar over ``total_bytes``: never listed), cached under
    ``cache_dir`` by ``corpus_key`` (what identifies those texts) and the settings; built once
    under a file lock, so concurrent processes wait and load it."""
    def counted(advance):
        for text, size in texts():
            yield text
            advance(size)

    key = hashlib.sha256(f"{BPE_FORMAT_VERSION}:{vocab_size}:{corpus_key}".encode()).hexdigest()[:32]
    cache = Path(cache_dir).expanduser() / "tokenizers" / f"bpe-{key}.json"
    if not cache.exists() or check_file(cache) is not None:
        with cache_lock(cache):
            distrusted = check_file(cache) if cache.exists() else None
            if distrusted is not None:
                log.warning("the cached BPE tokenizer %s %s: training it again", cache, distrusted)
                discard(cache)
            if not cache.exists():
                log.info("training a %d-token byte-level BPE on %.1f MB of text", vocab_size, total_bytes / 1e6)
                start = time.monotonic()
                with byte_progress("training the BPE tokenizer", total_bytes) as advance:
                    backend = _train_bpe(counted(advance), vocab_size)
                serialized = backend.to_str().encode()
                write_cache_file(cache, lambda f: f.write(serialized))
                record_digest(cache, hashlib.sha256(serialized).hexdigest())
                log.info("trained the BPE in %.1f s", time.monotonic() - start)
    return Tokenizer(tokenizers.Tokenizer.from_file(str(cache)))


def digest_documents(documents: Iterable[str], salt: str) -> str:
    """A cache key for ``documents`` (in order) under ``salt`` (what else the cached result depends on)."""
    digest = hashlib.sha256(salt.encode() + b"\0")
    for doc in documents:  # length-prefixed, so ["ab", "c"] and ["a", "bc"] differ
        data = doc.encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:32]


def _train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None) -> tokenizers.Tokenizer:
    """Train on ``texts`` as they come (an iterator: the trainer keeps word counts, not the text)."""
    backend = tokenizers.Tokenizer(models.BPE())
    # No prefix space: it would make decode(encode(text)) add a leading space.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # show_progress: the trainer's own bars (counting pairs, merges) after the texts are read; it
    # draws them only on a terminal
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=is_local_rank_zero(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # every byte, seen or not
    backend.train_from_iterator(iter(texts), trainer=trainer, length=length)
    return backend


def _as_pretrained(backend: tokenizers.Tokenizer):
    import transformers  # only saving and pretrained tokenizers need it, and it is slow to import

    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)


def model_tokenizer(directory, key: str = "ckpt") -> Tokenizer:
    """The tokenizer saved beside a model's weights; a directory without one is a DataError naming
    ``key`` (the model's setting, not the training data's ``data.tokenizer_path``)."""
    return _load_pretrained(Path(directory).expanduser(), key, "put the model's tokenizer files (tokenizer.json, "
                                                               "tokenizer_config.json) beside its weights")


def _load_pretrained(path: Path, key: str = "data.tokenizer_path",
                     fix: str = "it must be a Hugging Face tokenizer directory (save_pretrained)") -> Tokenizer:
    import transformers

    try:
        backend = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... with multi-line hints
        detail = str(e).strip().splitlines()
        raise DataError(f"{key}={path} holds no tokenizer that can be loaded ({type(e).__name__}: "
                        f"{detail[0][:160] if detail else ''}); {fix}") from None
    return Tokenizer(backend)


def _serialize_pretrained(backend) -> bytes:
    """The files ``save_pretrained`` writes, concatenated (not the source directory: it may hold model weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        backend.save_pretrained(tmp)
        return b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file())
