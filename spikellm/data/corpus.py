"""Corpora as lists of documents: the embedded pydoc text, local files, or Hugging Face hub datasets."""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from spikellm.errors import ConfigError, DataError

SOURCES = ("pydoc", "text", "wikitext2", "c4")
TEXT_SUFFIXES = (".txt", ".json", ".jsonl")
# c4 is loaded one shard per split: the whole English corpus is ~300 GB.
C4_SHARDS = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
HUB_SPLITS = ("train", "validation", "test")  # test: wikitext2 only (the perplexity protocol's split)
PROBE_TIMEOUT_S = 3.0
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")  # " = Title = " starts an article; " = = Section = = " does not


def check_source(source: str, path: str | os.PathLike | None) -> None:
    """Raise ConfigError unless ``source`` is known and, for local text, ``path`` exists."""
    if source not in SOURCES:
        raise ConfigError("source", source, "one of: " + ", ".join(SOURCES))
    if source != "text":
        return
    if path is None:
        raise ConfigError("path", None, "source 'text' reads local files; set data.path to a .txt/.json/.jsonl "
                                        "file or a directory of them")
    if not Path(path).expanduser().exists():
        raise ConfigError("path", str(path), "no such file or directory; set data.path to an existing "
                                             ".txt/.json/.jsonl file or directory")


def check_paths(source: str, path=None, train_path=None, val_path=None, test_path=None) -> None:
    """Raise ConfigError for a combination of ``data.path`` / ``data.train_path`` / ``data.val_path`` /
    ``data.test_path`` that cannot mean one thing, or a path that is missing or holds no text."""
    given = {key: value for key, value in (("train_path", train_path), ("val_path", val_path),
                                           ("test_path", test_path)) if value is not None}
    if source != "text":
        for key, value in given.items():
            raise ConfigError(key, str(value), f"source {source!r} comes with its own splits; use data=text for "
                                               f"local files")
        return
    if path is not None and train_path is not None:
        raise ConfigError("train_path", str(train_path), "data.path is split by data.val_fraction; set data.path or "
                                                         "data.train_path (with data.val_path), not both")
    if val_path is not None and train_path is None:
        raise ConfigError("val_path", str(val_path), "needs data.train_path for the training text; set "
                                                     "data.train_path=<file or folder>, or drop data.val_path to "
                                                     "hold out data.val_fraction of data.path")
    if path is None and train_path is None:
        raise ConfigError("path", None, "source 'text' reads local files; set data.path=<file or folder> (split by "
                                        "data.val_fraction) or data.train_path=<...> and data.val_path=<...>")
    for key, value in {"path": path, **given}.items():
        if value is None:
            continue
        where = Path(value).expanduser()
        if not where.exists():
            raise ConfigError(key, str(value), f"no such file or directory; set data.{key} to an existing "
                                               f".txt/.json/.jsonl file or directory")
        if not any(file.stat().st_size for file in corpus_files(where)):
            raise ConfigError(key, str(value), f"empty (no text); point data.{key} at a non-empty .txt/.json/.jsonl "
                                               f"file or directory")
    for key, value in given.items():
        if key != "train_path" and _same(value, train_path):
            raise ConfigError(key, str(value), f"it is data.train_path too: {key[:-5]} text would repeat training "
                                               f"text; set data.{key} to other files")


def _same(a, b) -> bool:
    return b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def corpus_files(path: Path) -> list[Path]:
    """The corpus files at ``path``: the file itself, or a directory's .txt/.json/.jsonl files (recursively, sorted)."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    return [path]


def load_documents(source: str, path: str | os.PathLike | None = None, text_field: str = "text",
                   split: str = "train") -> list[str]:
    """Load a corpus as a list of non-blank documents, in memory (for small corpora: the data
    module streams them with :func:`iter_documents` instead).

    ``source`` is ``pydoc`` (Python's bundled documentation, works offline), ``text`` (the files at
    ``path``: one .txt file per document, .json lists of strings or objects, .jsonl objects, with
    the text under ``text_field``), or a hub dataset (``wikitext2``, ``c4``), of which ``split``
    (train or validation) is loaded; local sources ignore ``split`` (the caller splits them).
    """
    check_source(source, path)
    documents = [doc if isinstance(doc, str) else doc.text() for doc in iter_documents(source, path, text_field, split)]
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise empty_corpus(source, path, "data.path", split)
    return documents


def iter_documents(source: str, path=None, text_field: str = "text", split: str = "train", key: str = "data.path"):
    """The documents of a corpus, one at a time: strings, or a :class:`TextFile` for each .txt file
    (read in byte ranges later, never whole). Blank strings are skipped; a blank file is found
    blank when it is read. ``key`` is the config key ``path`` came from, for messages."""
    if source == "pydoc":
        from pydoc_data.topics import topics
        documents = (topics[name] for name in sorted(topics))
    elif source == "text":
        documents = _iter_local(Path(path).expanduser(), text_field, key)
    else:
        documents = _iter_hub(source, split)
    for doc in documents:
        if not isinstance(doc, str) or doc.strip():
            yield doc


def empty_corpus(source: str, path, key: str, split: str = "train") -> DataError:
    """The error for a corpus without non-blank text."""
    where = f"{key}={path}" if source == "text" else "the pydoc corpus" if source == "pydoc" else \
        f"the {split} split of {source!r}"
    return DataError(f"the corpus is empty: {where} has no non-blank text; add text or point {key} at a non-empty "
                     f".txt/.json/.jsonl file or directory")


class TextFile:
    """A .txt file as one document, read in byte ranges so that no corpus is ever held whole.

    Offsets count the UTF-8 bytes of the text, after a byte-order mark (which is not text).
    :meth:`check` reads it once, block by block, checking that it is UTF-8 text, and hashes it.
    """

    BLOCK = 4 << 20

    def __init__(self, path: str | os.PathLike, key: str = "data.path"):
        self.path, self.key = Path(path), key
        with open(self.path, "rb") as f:
            self._start = 3 if f.read(3) == b"\xef\xbb\xbf" else 0
        self.size = self.path.stat().st_size - self._start

    def __len__(self) -> int:
        return self.size

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``start:end`` of the text."""
        with open(self.path, "rb") as f:
            f.seek(self._start + start)
            return f.read(max(0, end - start))

    def check(self) -> tuple[bytes, bool, int]:
        """Read the file block by block and raise DataError unless it is UTF-8 text; its SHA-256,
        whether it has any non-blank text, and how many characters."""
        digest = hashlib.sha256()
        decoder, blank, offset, chars = codecs.getincrementaldecoder("utf-8")(), True, self._start, 0
        with open(self.path, "rb") as f:
            f.seek(self._start)
            while block := f.read(self.BLOCK):
                digest.update(block)
                # NUL never occurs in UTF-8 text but does in every binary format (and in UTF-16), so reject early.
                if (nul := block.find(b"\0")) >= 0:
                    raise DataError(f"{self.path} is a binary file (NUL byte at offset {offset + nul}), not UTF-8 "
                                    f"text; remove it from {self.key} or convert it to UTF-8 text")
                pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
                try:
                    text = decoder.decode(block)
                except UnicodeDecodeError as e:
                    raise DataError(f"{self.path} is not valid UTF-8 (byte offset {offset - pending + e.start}: "
                                    f"{e.object[e.start:e.start + 1]!r}); re-encode it as UTF-8, e.g. "
                                    f"iconv -f latin1 -t utf-8") from None
                blank = blank and not text.strip()
                offset, chars = offset + len(block), chars + len(text)
        if decoder.getstate()[0]:
            raise DataError(f"{self.path} is not valid UTF-8 (it ends inside a character); re-encode it as UTF-8, "
                            f"e.g. iconv -f latin1 -t utf-8")
        return digest.digest(), not blank, chars

    def text(self) -> str:
        """The whole text, checked (for small files: the pipeline reads byte ranges instead)."""
        self.check()
        return self.read(0, self.size).decode("utf-8")


def _iter_local(path: Path, text_field: str, key: str):
    for file in corpus_files(path):
        if file.suffix == ".json":  # a JSON list is parsed whole: prefer .jsonl or .txt for large corpora
            text = TextFile(file, key).text()
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); "
                                f"fix the file or rename it to .txt to read it as plain text") from None
            if not isinstance(items, list):
                raise DataError(f"{file}: expected a JSON list of strings or objects, got "
                                f"{type(items).__name__}; wrap the documents in a list")
            yield from (_text_of(item, text_field, file, f"item {i}") for i, item in enumerate(items))
        elif file.suffix == ".jsonl":
            yield from _iter_jsonl(file, text_field, key)
        else:  # .txt, or a single file of any other name given directly: the whole file is one document
            yield TextFile(file, key)


def _iter_jsonl(file: Path, text_field: str, key: str):
    TextFile(file, key).check()  # binary or non-UTF-8: the same one line as for .txt files
    with open(file, encoding="utf-8-sig") as f:  # a line at a time: a .jsonl file may be of any size
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}: line {number}: invalid JSON ({e.msg}); "
                                f"each line of a .jsonl file must be one JSON object") from None
            yield _text_of(item, text_field, file, f"line {number}")


def _text_of(item, text_field: str, file: Path, where: str) -> str:
    if isinstance(item, dict):
        if text_field not in item:
            fields = ", ".join(map(str, item)) or "none"
            raise DataError(f"{file}: {where}: object has no field {text_field!r} (fields: {fields}); "
                            f"set data.text_field to the field holding the text")
        item = item[text_field]
    if not isinstance(item, str):
        raise DataError(f"{file}: {where}: expected a string or an object with a string {text_field!r} field, got "
                        f"{type(item).__name__}; fix the file")
    return item


def hub_offline_requested() -> bool:
    """Whether the user asked the Hugging Face libraries to stay offline (they then read caches)."""
    return any(os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def hub_reachable() -> bool:
    """Whether a connection to the hub opens within a few seconds (see :func:`_probe_hub`)."""
    return _probe_hub() is None


def _probe_hub() -> str | None:
    """Why the hub cannot be reached, or None if a TCP connection to it opens within the timeout."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname, endpoint.port or 443
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:  # socket.gaierror (no DNS) and timeouts are OSErrors too
        return f"{host}:{port} unreachable: {e}"
    return None


def _iter_hub(source: str, split: str):
    rows = (text for batch in hub_dataset(source, split).iter(batch_size=1000) for text in batch["text"])
    return _wikitext_articles(rows) if source == "wikitext2" else rows


def hub_rows(source: str, split: str) -> list[str]:
    """The raw ``text`` rows of a hub corpus split (WikiText: one row per line, as the GPTQ
    perplexity protocol joins them); fails fast, with the fix, when the hub cannot be reached."""
    return list(hub_dataset(source, split)["text"])


def hub_dataset(source: str, split: str):
    """A hub corpus split as a ``datasets.Dataset`` (Arrow, memory-mapped from the datasets cache: read
    in batches, never whole); fails fast, with the fix, when the hub cannot be reached."""
    if split not in HUB_SPLITS or (source == "c4" and split == "test"):
        raise ConfigError("split", split, "one of: train, validation" + (", test" if source == "wikitext2" else ""))
    # Offline, `datasets` retries each request for ~25 s before failing; a 3 s probe fails fast instead.
    # In offline mode `datasets` only reads its cache, which is fast, so the probe would only be in the way.
    if not hub_offline_requested() and (reason := _probe_hub()):
        raise _hub_error(source, f"offline: {reason}")
    import datasets
    try:
        return datasets.load_dataset(**_hub_args(source, split))
    except Exception as e:  # any failure (offline cache miss, HTTP, corrupt download) has the same fix
        detail = str(e).strip().splitlines()
        raise _hub_error(source, f"{type(e).__name__}: {detail[0] if detail else 'no detail'}") from e


def _hub_args(source: str, split: str) -> dict:
    if source == "wikitext2":
        return dict(path="wikitext", name="wikitext-2-raw-v1", split=split)
    return dict(path="allenai/c4", data_files={split: C4_SHARDS[split]}, split=split)


def _hub_error(source: str, reason: str) -> DataError:
    return DataError(f"cannot load {source!r} from the Hugging Face hub ({reason}); download it where there "
                     f"is network, or point at local files: data=text data.path=/path/to/train.txt")


def _wikitext_articles(lines):
    """Join WikiText's rows (one per line) into one document per article, so eos separates articles."""
    article: list[str] = []
    for line in lines:
        if _WIKITEXT_TITLE.match(line) and article:
            yield "".join(article)
            article = []
        article.append(line)
    if article:
        yield "".join(article)
