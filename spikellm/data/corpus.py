"""Corpora as lists of documents: the embedded pydoc text, local files, or Hugging Face hub datasets."""
from __future__ import annotations

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


def load_documents(source: str, path: str | os.PathLike | None = None, text_field: str = "text",
                   split: str = "train") -> list[str]:
    """Load a corpus as a list of non-blank documents.

    ``source`` is ``pydoc`` (Python's bundled documentation, works offline), ``text`` (the files at
    ``path``: one .txt file per document, .json lists of strings or objects, .jsonl objects, with
    the text under ``text_field``), or a hub dataset (``wikitext2``, ``c4``), of which ``split``
    (train or validation) is loaded; local sources ignore ``split`` (the caller splits them).
    """
    check_source(source, path)
    if source == "pydoc":
        from pydoc_data.topics import topics
        documents, where = [topics[name] for name in sorted(topics)], "the pydoc corpus"
    elif source == "text":
        documents, where = _load_local(Path(path).expanduser(), text_field), f"data.path={path}"
    else:
        documents, where = _load_hub(source, split), f"the {split} split of {source!r}"
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise DataError(f"the corpus is empty: {where} has no non-blank text; add text or point data.path "
                        f"at a non-empty .txt/.json/.jsonl file or directory")
    return documents


def _load_local(path: Path, text_field: str) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()) if path.is_dir() \
        else [path]
    documents = []
    for file in files:
        text = _read_utf8(file)
        if file.suffix == ".json":
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); "
                                f"fix the file or rename it to .txt to read it as plain text") from None
            if not isinstance(items, list):
                raise DataError(f"{file}: expected a JSON list of strings or objects, got "
                                f"{type(items).__name__}; wrap the documents in a list")
            documents += [_text_of(item, text_field, file, f"item {i}") for i, item in enumerate(items)]
        elif file.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}: line {number}: invalid JSON ({e.msg}); "
                                    f"each line of a .jsonl file must be one JSON object") from None
                documents.append(_text_of(item, text_field, file, f"line {number}"))
        else:  # .txt, or a single file of any other name given directly: the whole file is one document
            documents.append(text)
    return documents


def _read_utf8(file: Path) -> str:
    raw = file.read_bytes()
    # NUL never occurs in UTF-8 text but does in every binary format (and in UTF-16), so reject early.
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"{file} is a binary file (NUL byte at offset {nul}), not UTF-8 text; "
                        f"remove it from data.path or convert it to UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{file} is not valid UTF-8 (byte offset {e.start}: {raw[e.start:e.start + 1]!r}); "
                        f"re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


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


def _load_hub(source: str, split: str) -> list[str]:
    rows = hub_rows(source, split)
    return _wikitext_articles(rows) if source == "wikitext2" else list(rows)


def hub_rows(source: str, split: str) -> list[str]:
    """The raw ``text`` rows of a hub corpus split (WikiText: one row per line, as the GPTQ
    perplexity protocol joins them); fails fast, with the fix, when the hub cannot be reached."""
    if split not in HUB_SPLITS or (source == "c4" and split == "test"):
        raise ConfigError("split", split, "one of: train, validation" + (", test" if source == "wikitext2" else ""))
    # Offline, `datasets` retries each request for ~25 s before failing; a 3 s probe fails fast instead.
    # In offline mode `datasets` only reads its cache, which is fast, so the probe would only be in the way.
    if not hub_offline_requested() and (reason := _probe_hub()):
        raise _hub_error(source, f"offline: {reason}")
    import datasets
    try:
        return list(datasets.load_dataset(**_hub_args(source, split))["text"])
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


def _wikitext_articles(lines) -> list[str]:
    """Join WikiText's rows (one per line) into one document per article, so eos separates articles."""
    articles: list[list[str]] = []
    for line in lines:
        if _WIKITEXT_TITLE.match(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["".join(article) for article in articles]
