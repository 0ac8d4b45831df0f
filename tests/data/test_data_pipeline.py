"""The tokenized-corpus pipeline at scale (memory-mapped token files cached by content,
streamed tokenization, atomic cache writes) and explicit train/validation/test splits."""
import json
import logging
import pickle
import random
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line
import tokenizers
import torch

from spikellm.data import TextDataModule, Tokenizer
from spikellm.data import tokenizer as tokenizer_module
from spikellm.data import tokens as tokens_module
from spikellm.data.corpus import TextFile
from spikellm.data.datamodule import split_documents
from spikellm.data.tokens import TokenBlocks, chunk_texts, token_dtype
from spikellm.errors import ConfigError, DataError

WORDS = "spike neuron threshold membrane fires counts rate time step layer token model the a of and".split()


def corpus_text(lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    text = []
    for i in range(lines):
        text.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + ".\n")
        if i % 7 == 6:
            text.append("\n")  # paragraphs: blank lines, where a chunk must not be cut
    return "".join(text)


def module(tmp_path, **kwargs) -> TextDataModule:
    defaults = dict(source="text", block_size=16, batch_size=2, vocab_size=300, cache_dir=tmp_path / "cache")
    dm = TextDataModule(**{**defaults, **kwargs})
    dm.setup("fit")
    return dm


@pytest.fixture
def files(tmp_path):
    (tmp_path / "train.txt").write_text(corpus_text(600, seed=1))
    (tmp_path / "val.txt").write_text(corpus_text(80, seed=2))
    (tmp_path / "test.txt").write_text(corpus_text(60, seed=3))
    return tmp_path


# ---------------------------------------------------------------------------------------------
# bounded memory: the data module reads token files through a memory map

def test_loaders_read_a_memory_map_not_a_copy(files):
    dm = module(files, path=str(files / "train.txt"))
    for tokens in (dm.train_tokens, dm.val_tokens):
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and tokens.ndim == 1
        assert not tokens.flags.writeable  # the cache is never written through the map
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert isinstance(loader.dataset, TokenBlocks) and isinstance(loader.dataset.tokens, np.memmap)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (2, 16) and x.dtype == torch.long and torch.equal(x[:, 1:], y[:, :-1])
    # a worker process gets the file's name, not its tokens
    dataset = dm.train_dataloader().dataset
    clone = pickle.loads(pickle.dumps(dataset))
    assert len(pickle.dumps(dataset)) < 1000 and all(torch.equal(a, b) for a, b in zip(clone[3], dataset[3]))


def test_blocks_are_the_packed_token_stream(files):
    dm = module(files, path=str(files / "train.txt"))
    blocks = dm.val_dataloader().dataset
    assert len(blocks) == (len(dm.val_tokens) - 1) // 16
    x, y = blocks[len(blocks) - 1]
    start = (len(blocks) - 1) * 16
    assert x.tolist() == dm.val_tokens[start:start + 16].tolist() and y.tolist() == dm.val_tokens[start + 1:start + 17].tolist()
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_token_dtype_follows_the_vocabulary():
    assert token_dtype(2048) == token_dtype(65536) == np.uint16
    assert token_dtype(65537) == token_dtype(152064) == np.uint32


class WideTokenizer:
    """A stand-in with a vocabulary past uint16: ids are the code points of the text."""
    vocab_size, eos_id, fingerprint = 200_000, 199_999, "wide"

    def encode_batch(self, texts):
        return [[ord(c) + 70_000 for c in text] for text in texts]


def test_wide_vocabularies_are_stored_as_uint32(tmp_path):
    path = tmp_path / "tokens.bin"
    pieces = [("ab", 2, True), ("c", 1, False), ("d", 1, True)]  # two documents, the first in two chunks
    tokens_module.write_tokens(path, iter(pieces), WideTokenizer(), total_bytes=4, name="test")
    tokens = tokens_module.open_tokens(path, np.uint32)
    assert tokens.tolist() == [70_097, 70_098, 70_099, 199_999, 70_100]


def test_streamed_tokenization_equals_whole_document_tokenization(tmp_path, monkeypatch):
    """Chunks end at a line break between non-blank characters: the byte-level BPE pre-tokenizes
    there anyway, so a document cut into 1 KB chunks has the tokens of the whole document."""
    text = corpus_text(2000)
    (tmp_path / "big.txt").write_text(text)
    whole = module(tmp_path, path=str(tmp_path / "big.txt"), cache_dir=tmp_path / "whole")
    monkeypatch.setattr(tokens_module, "CHUNK_BYTES", 1024)
    monkeypatch.setattr(tokens_module, "BATCH_BYTES", 4096)
    chunked = module(tmp_path, path=str(tmp_path / "big.txt"), cache_dir=tmp_path / "chunked")
    assert chunked.tokenizer.fingerprint == whole.tokenizer.fingerprint
    assert np.array_equal(chunked.train_tokens, whole.train_tokens) and np.array_equal(chunked.val_tokens,
                                                                                         whole.val_tokens)
    assert np.array_equal(whole.train_tokens, whole.tokenizer.encode(split_documents([text], 0.05, 0)[0][0]))


def test_chunks_cover_the_text_and_end_at_line_breaks(tmp_path):
    text = "é" * 300 + "\n" + corpus_text(200) + "x" * 3000  # a 2-byte character, then lines, then no newline
    (tmp_path / "t.txt").write_text(text)
    for doc in (text, TextFile(tmp_path / "t.txt")):
        chunks = list(chunk_texts(doc, 0, len(text.encode()), 512))
        assert "".join(chunk for chunk, _ in chunks) == text and all(n == len(c.encode()) for c, n in chunks)
        assert all(n <= 512 for _, n in chunks)
        inside = [c for c, _ in chunks[1:-8]]  # the lines: each chunk ends a line with text on both sides
        assert all(c.endswith("\n") and not c[-2].isspace() for c in inside)


def test_documents_are_joined_with_eos(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.txt").write_text(corpus_text(40, seed=i))
    (folder / "more.jsonl").write_text("".join(json.dumps({"text": corpus_text(20, seed=9 + i)}) + "\n"
                                               for i in range(3)))
    (tmp_path / "val.txt").write_text(corpus_text(40, seed=20))
    dm = module(tmp_path, train_path=str(folder), val_path=str(tmp_path / "val.txt"))
    assert (dm.train_tokens == dm.tokenizer.eos_id).sum() == 6  # 7 documents
    first = dm.tokenizer.decode(dm.train_tokens).split("<|endoftext|>")
    assert first[:4] == [corpus_text(40, seed=i) for i in range(4)] and len(first) == 7


# ---------------------------------------------------------------------------------------------
# the cache: keyed by content, written atomically, built once across processes

def test_a_second_setup_reads_the_cache(files, monkeypatch):
    first = module(files, path=str(files / "train.txt"))
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda *_: pytest.fail("tokenized again despite the cache"))
    monkeypatch.setattr(tokenizer_module, "_train_bpe", lambda *_: pytest.fail("trained again despite the cache"))
    again = module(files, path=str(files / "train.txt"))
    assert np.array_equal(again.train_tokens, first.train_tokens)
    assert again.train_tokens.filename == first.train_tokens.filename


def _damage_train_tokens(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "half":
        data = data[:len(data) // 2 // 2 * 2]
    elif how == "odd":
        data = data[:-1]
    elif how == "overwritten":  # 10 % of the ids, in place: the size does not change
        ids = np.frombuffer(bytes(data), np.uint16).copy()
        rows = np.random.default_rng(0).choice(len(ids), len(ids) // 10, replace=False)
        ids[rows] = np.random.default_rng(1).integers(0, 256, len(rows))
        data = bytearray(ids.tobytes())
    elif how == "out-of-vocabulary":
        ids = np.frombuffer(bytes(data), np.uint16).copy()
        ids[::5] = 65000
        data = bytearray(ids.tobytes())
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["half", "odd", "overwritten", "out-of-vocabulary"])
def test_a_damaged_token_cache_is_rebuilt_with_one_warning(files, caplog, how):
    """A cut, edited or foreign token file was trained on silently (or failed deep in
    numpy / the embedding); its digest now sends it back to the tokenizer, once, with a warning."""
    first = module(files, path=str(files / "train.txt"))
    path, expected = Path(first.train_tokens.filename), np.array(first.train_tokens)
    del first
    _damage_train_tokens(path, how)
    with caplog.at_level(logging.WARNING, logger="spikellm.data.tokens"):
        again = module(files, path=str(files / "train.txt"))
    assert np.array_equal(np.array(again.train_tokens), expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "tokenizing it again" in warnings[0]
    assert ("truncated or edited" if how in ("half", "odd") else "edited or corrupted") in warnings[0]


def test_a_touched_but_intact_token_cache_is_hashed_once(files, monkeypatch):
    """A changed stamp (a copy, a touch) costs one full hash, then the new stamp is trusted."""
    from spikellm.data import cache as integrity

    first = module(files, path=str(files / "train.txt"))
    path = Path(first.train_tokens.filename)
    path.touch()
    hashed = []
    original = integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda p: hashed.append(p) or original(p))
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda *_: pytest.fail("a touched intact cache was rebuilt"))
    module(files, path=str(files / "train.txt"))
    module(files, path=str(files / "train.txt"))
    assert hashed == [path]


def test_a_truncated_cached_tokenizer_is_trained_again(files, caplog):
    first = module(files, path=str(files / "train.txt"))
    cache = next(p for p in (files / "cache" / "tokenizers").glob("bpe-*.json") if ".sha256" not in p.name)
    cache.write_bytes(cache.read_bytes()[:len(cache.read_bytes()) // 3])
    with caplog.at_level(logging.WARNING, logger="spikellm.data.tokenizer"):
        again = module(files, path=str(files / "train.txt"))
    assert again.tokenizer.fingerprint == first.tokenizer.fingerprint
    assert any("training it again" in r.getMessage() and "truncated or edited" in r.getMessage()
               for r in caplog.records)


def test_the_cache_follows_the_content_not_the_name(files, monkeypatch):
    first = module(files, path=str(files / "train.txt"))
    (files / "copy.txt").write_bytes((files / "train.txt").read_bytes())
    assert module(files, path=str(files / "copy.txt")).train_tokens.filename == first.train_tokens.filename
    with open(files / "train.txt", "a") as f:
        f.write("one more line.\n")
    assert module(files, path=str(files / "train.txt")).train_tokens.filename != first.train_tokens.filename


def test_an_interrupted_tokenization_leaves_no_cache(files, monkeypatch):
    """A failure mid-write leaves no token file a later run would trust; what a SIGKILL leaves (a
    half-written temporary) is removed by the next writer of that file."""
    (files / "train.txt").write_text(corpus_text(20000))  # several batches
    monkeypatch.setattr(tokens_module, "BATCH_BYTES", 64 << 10)
    reference = module(files, path=str(files / "train.txt"), cache_dir=files / "reference")
    name = Path(reference.train_tokens.filename).name  # the key is the content's: the same in any cache
    calls, original = [], Tokenizer.encode_batch

    def encode_then_die(self, texts):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_batch", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        module(files, path=str(files / "train.txt"))
    cache = files / "cache" / "tokens"
    assert calls and not list(cache.glob("*.bin")) and not list(cache.glob(".*.tmp"))
    stale = cache / f".{name}.abc123.tmp"  # a killed writer's temporary
    stale.write_bytes(b"\0" * 100)
    monkeypatch.setattr(Tokenizer, "encode_batch", original)
    dm = module(files, path=str(files / "train.txt"))
    assert np.array_equal(dm.train_tokens, reference.train_tokens) and not stale.exists()
    assert not list(cache.glob(".*.tmp"))


def test_concurrent_setups_tokenize_once(files, monkeypatch):
    """Ranks of a DDP job (or two runs) on one cache: one builds each file under a lock, the others wait and read it."""
    calls, original = [], Tokenizer.encode_batch

    def counting(self, texts):
        calls.append(threading.get_ident())
        return original(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_batch", counting)
    results, errors = [], []

    def run():
        try:
            results.append(module(files, path=str(files / "train.txt")).train_tokens)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and np.array_equal(*results) and len(set(calls)) == 1


def test_tokenizer_training_streams_and_progress_is_logged(files, monkeypatch, caplog):
    seen = []
    original = tokenizers.Tokenizer.train_from_iterator

    def spy(self, iterator, trainer=None, length=None):
        seen.append(iterator)
        return original(self, iterator, trainer=trainer, length=length)

    monkeypatch.setattr(tokenizers.Tokenizer, "train_from_iterator", spy)
    with caplog.at_level(logging.INFO, logger="spikellm.data"):
        module(files, path=str(files / "train.txt"))
    assert len(seen) == 1 and not isinstance(seen[0], (list, tuple))  # an iterator, not the corpus in a list
    assert any("tokens/s" in r.getMessage() and "train split" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# explicit splits

def test_explicit_train_validation_and_test_files(files):
    dm = module(files, train_path=str(files / "train.txt"), val_path=str(files / "val.txt"),
                test_path=str(files / "test.txt"))
    decode = dm.tokenizer.decode
    assert decode(dm.train_tokens) == (files / "train.txt").read_text()
    assert decode(dm.val_tokens) == (files / "val.txt").read_text()
    assert decode(dm.test_tokens) == (files / "test.txt").read_text()
    x, y = next(iter(dm.test_dataloader()))
    assert x.tolist()[0] == dm.test_tokens[:16].tolist() and y.tolist()[0] == dm.test_tokens[1:17].tolist()
    summary = dm.split_summary()
    assert summary["train"] == {"tokens": len(dm.train_tokens), "kind": "paths",
                                "from": f"data.train_path={files / 'train.txt'}"}
    assert summary["validation"]["from"] == f"data.val_path={files / 'val.txt'}"
    assert summary["test"]["tokens"] == len(dm.test_tokens)


def test_explicit_folders(files):
    for name, sub in (("train.txt", "tr"), ("val.txt", "va")):
        (files / sub / "nested").mkdir(parents=True)
        (files / sub / "nested" / "a.txt").write_text((files / name).read_text())
    dm = module(files, train_path=str(files / "tr"), val_path=str(files / "va"))
    assert dm.tokenizer.decode(dm.val_tokens) == (files / "val.txt").read_text()


def test_fraction_split_summary(files):
    dm = module(files, path=str(files / "train.txt"), val_fraction=0.1, seed=3)
    summary = dm.split_summary()
    assert set(summary) == {"train", "validation"}
    assert summary["train"]["kind"] == summary["validation"]["kind"] == "fraction"
    assert summary["validation"]["from"] == f"10% of data.path={files / 'train.txt'}, held out by seed 3"
    assert summary["train"]["tokens"] == len(dm.train_tokens) and summary["validation"]["tokens"] == len(dm.val_tokens)
    assert 0.07 < len(dm.val_tokens) / (len(dm.train_tokens) + len(dm.val_tokens)) < 0.13
    # train_path without val_path is the same fraction split of that path
    alone = module(files, train_path=str(files / "train.txt"), val_fraction=0.1, seed=3)
    assert np.array_equal(alone.val_tokens, dm.val_tokens)
    assert alone.split_summary()["validation"]["from"].startswith("10% of data.train_path=")


def test_pydoc_summary_and_split_is_unchanged(tmp_path):
    dm = TextDataModule(block_size=32, batch_size=4, vocab_size=512, cache_dir=tmp_path)
    dm.setup("fit")
    assert dm.split_summary()["train"]["kind"] == "fraction" and "pydoc" in dm.split_summary()["train"]["from"]
    from spikellm.data import load_documents
    _, val = split_documents(load_documents("pydoc"), 0.05, 0)
    assert dm.tokenizer.decode(dm.val_tokens) == "<|endoftext|>".join(val)


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("kwargs,pattern", [
    (lambda d: dict(val_path=write(d / "v.txt", "x\n")),
     r"^val_path='.*v\.txt' is invalid: needs data\.train_path .*set data\.train_path="),
    (lambda d: dict(path=write(d / "a.txt", "x\n"), train_path=write(d / "b.txt", "y\n")),
     r"^train_path='.*b\.txt' is invalid: .*set data\.path or data\.train_path .*not both"),
    (lambda d: dict(path=write(d / "a.txt", "x\n"), val_path=write(d / "b.txt", "y\n")),
     r"^val_path='.*b\.txt' is invalid: needs data\.train_path"),
    (lambda d: dict(), r"^path=None is invalid: source 'text' reads local files; set data\.path=.* or "
                       r"data\.train_path="),
    (lambda d: dict(train_path=str(d / "missing"), val_path=write(d / "v.txt", "x\n")),
     r"^train_path='.*missing' is invalid: no such file or directory; set data\.train_path to an existing"),
    (lambda d: dict(train_path=write(d / "t.txt", "x\n"), val_path=write(d / "empty.txt", "")),
     r"^val_path='.*empty\.txt' is invalid: empty \(no text\); point data\.val_path at"),
    (lambda d: dict(train_path=write(d / "t.txt", "x\n"), test_path=str(d / "folder")),
     r"^test_path='.*folder' is invalid: empty \(no text\)"),
    (lambda d: dict(train_path=write(d / "t.txt", "x\n"), val_path=str(d / "t.txt")),
     r"^val_path='.*t\.txt' is invalid: it is data\.train_path too"),
    (lambda d: dict(source="pydoc", train_path=write(d / "t.txt", "x\n")),
     r"^train_path='.*t\.txt' is invalid: source 'pydoc' comes with its own splits; use data=text"),
])
def test_bad_split_settings_fail_at_construction(tmp_path, kwargs, pattern):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.md").write_text("not a corpus file")
    with pytest.raises(ConfigError) as raised:
        TextDataModule(**{"source": "text", "cache_dir": tmp_path / "cache", **kwargs(tmp_path)})
    assert raised.match(pattern), str(raised.value)
    one_line(raised)


def test_blank_validation_file_names_its_key(files):
    (files / "blank.txt").write_text(" \n\n\t\n")
    with pytest.raises(DataError, match=r"^the corpus is empty: data\.val_path=.*blank\.txt has no non-blank text; "
                                        r"add text or point data\.val_path at") as raised:
        module(files, train_path=str(files / "train.txt"), val_path=str(files / "blank.txt"))
    one_line(raised)


def test_short_validation_split_names_the_fix(files):
    (files / "short.txt").write_text("a few words.\n")
    with pytest.raises(DataError, match=r"^the validation split \(data\.val_path=.*short\.txt\) has \d+ tokens, but "
                                        r"block_size=16 needs at least 17; lower data\.block_size or add text$"):
        module(files, train_path=str(files / "train.txt"), val_path=str(files / "short.txt"))


def test_no_test_split_is_one_line(files):
    dm = module(files, path=str(files / "train.txt"))
    assert dm.test_tokens is None and "test" not in dm.split_summary()
    with pytest.raises(DataError, match=r"no test split: set data\.test_path") as raised:
        dm.test_dataloader()
    one_line(raised)


# ---------------------------------------------------------------------------------------------
# exact resume through the memory map

def test_resumed_loader_goes_on_with_the_next_batch(files):
    dm = module(files, path=str(files / "train.txt"))
    whole = [x for x, _ in dm.train_dataloader()]
    resumed = module(files, path=str(files / "train.txt"))
    resumed._resume_at = (0, 3)  # what load_state_dict sets from a checkpoint's train_position
    rest = [x for x, _ in resumed.train_dataloader()]
    assert len(rest) == len(whole) - 3 and all(torch.equal(a, b) for a, b in zip(rest, whole[3:]))


def test_a_rerun_on_an_unchanged_large_file_does_not_read_it_again(files, monkeypatch):
    """Large files' scans (hash, characters) are remembered by path, size, mtime and inode: a cache
    hit then reads nothing of the corpus; a rewritten file (even of the same size) is read again."""
    import os

    from spikellm.data.corpus import TextFile

    monkeypatch.setattr(tokens_module, "MEMO_MIN_BYTES", 0)
    first = module(files, path=str(files / "train.txt"))
    original = TextFile.check
    monkeypatch.setattr(TextFile, "check", lambda self: pytest.fail(f"{self.path} read again"))
    assert module(files, path=str(files / "train.txt")).train_tokens.filename == first.train_tokens.filename
    text = (files / "train.txt").read_text()
    (files / "train.txt").write_text(text.replace("spike", "SPIKE", 1))  # the same size, new content
    stat = (files / "train.txt").stat()
    os.utime(files / "train.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    monkeypatch.setattr(TextFile, "check", original)
    assert module(files, path=str(files / "train.txt")).train_tokens.filename != first.train_tokens.filename


@pytest.mark.parametrize("damage", ["typed-sidecar", "directory"])
def test_a_cache_whose_sidecar_or_file_is_the_wrong_kind_is_rebuilt(files, caplog, damage):
    """A sidecar of valid JSON with the wrong types, or a directory in a token file's place, ended
    in a traceback; each is one warning and a rebuild."""
    import shutil

    first = module(files, path=str(files / "train.txt"))
    path, expected = Path(first.train_tokens.filename), np.array(first.train_tokens)
    del first
    if damage == "typed-sidecar":
        path.with_name(path.name + ".sha256.json").write_text('{"sha256": 5, "stamp": "x"}')
    else:
        path.unlink()
        path.mkdir()
        (path / "inside").write_text("x")
    with caplog.at_level(logging.WARNING, logger="spikellm.data.tokens"):
        again = module(files, path=str(files / "train.txt"))
    assert np.array_equal(np.array(again.train_tokens), expected)
    assert sum("tokenizing it again" in r.getMessage() for r in caplog.records) == 1
    shutil.rmtree(files / "cache", ignore_errors=True)
