"""Corpora, tokenizers and the data module: shapes, determinism, caching, and every user-facing error."""
import inspect
import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, one_line
import torch
from omegaconf import OmegaConf

from spikellm.data import TextDataModule, Tokenizer, build_tokenizer, load_documents
from spikellm.data import corpus as corpus_module
from spikellm.data import tokenizer as tokenizer_module
from spikellm.data.datamodule import split_documents
from spikellm.errors import ConfigError, DataError

CONF_DATA = ROOT / "conf" / "data"
TEXTS = ["plain ASCII: def f(x):\n\treturn x  # two  spaces\n",
         "non-ASCII: héllo wörld, 日本語, emoji 🚀, ÿ\u00a0\u200b",
         "a literal <|endoftext|> inside a document", ""]


@pytest.fixture(scope="module")
def pydoc_docs():
    return load_documents("pydoc")


@pytest.fixture(scope="module")
def pydoc_dm(tmp_path_factory):
    dm = TextDataModule(block_size=32, batch_size=4, vocab_size=512, cache_dir=tmp_path_factory.mktemp("cache"))
    dm.setup("fit")
    return dm


def test_pydoc_corpus_is_embedded(pydoc_docs):
    from pydoc_data.topics import topics

    assert len(pydoc_docs) == 79
    assert pydoc_docs == [topics[name] for name in sorted(topics)]
    assert sum(map(len, pydoc_docs)) > 400_000


def test_split_is_deterministic_disjoint_and_sized(pydoc_docs):
    train, val = split_documents(pydoc_docs, 0.05, seed=0)
    assert (train, val) == split_documents(pydoc_docs, 0.05, seed=0)
    assert val != split_documents(pydoc_docs, 0.05, seed=1)[1]
    assert sorted(train + val) == sorted(pydoc_docs) and not set(train) & set(val)
    assert 0.03 < sum(map(len, val)) / sum(map(len, pydoc_docs)) <= 0.05


def test_single_document_is_split_at_a_newline():
    text = "".join(f"line {i:03d}\n" for i in range(100))
    (train,), (val,) = split_documents([text], 0.1, seed=0)
    assert train + val == text and train.endswith("\n") and val.startswith("line 09")
    (train,), (val,) = split_documents(["x" * 1000], 0.1, seed=0)  # no newline at all: cut by characters
    assert (len(train), len(val)) == (900, 100)


def test_blocks_are_shifted_by_one_and_reproducible(pydoc_dm):
    x, y = next(iter(pydoc_dm.train_dataloader()))
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, next(iter(pydoc_dm.train_dataloader()))[0])  # same seed, same order
    assert len(pydoc_dm.train_dataloader()) == (len(pydoc_dm.train_tokens) - 1) // 32 // 4
    val = list(pydoc_dm.val_dataloader())
    assert val[0][0][0].tolist() == pydoc_dm.val_tokens[:32].tolist()  # token ids: a memory-mapped uint16 array
    assert val[0][1][0].tolist() == pydoc_dm.val_tokens[1:33].tolist()
    assert sum(len(inputs) for inputs, _ in val) == (len(pydoc_dm.val_tokens) - 1) // 32  # drop_last=False
    assert pydoc_dm.vocab_size == pydoc_dm.tokenizer.vocab_size <= 512
    assert (pydoc_dm.train_tokens == pydoc_dm.tokenizer.eos_id).sum() > 60  # documents joined with eos


def test_setup_is_idempotent_and_tokens_are_cached(pydoc_dm, monkeypatch):
    tokens = pydoc_dm.train_tokens
    pydoc_dm.setup("validate")
    assert pydoc_dm.train_tokens is tokens
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda *_: pytest.fail("tokenized again despite the cache"))
    again = TextDataModule(**pydoc_dm.hparams)
    again.setup("fit")
    assert np.array_equal(again.train_tokens, tokens) and np.array_equal(again.val_tokens, pydoc_dm.val_tokens)
    assert not list(Path(pydoc_dm.cache_dir).rglob("*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips(pydoc_dm, text):
    tokenizer = pydoc_dm.tokenizer
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_id not in ids  # only the pipeline inserts document boundaries
    assert tokenizer.encode_batch([text, text]) == [ids, ids]


def test_bpe_is_trained_once_then_loaded_from_cache(pydoc_docs, tmp_path, monkeypatch):
    first = build_tokenizer(pydoc_docs[:20], 300, cache_dir=tmp_path)
    monkeypatch.setattr(tokenizer_module, "_train_bpe", lambda *_: pytest.fail("retrained despite the cache"))
    second = build_tokenizer(pydoc_docs[:20], 300, cache_dir=tmp_path)
    assert second.fingerprint == first.fingerprint and second.encode(TEXTS[1]) == first.encode(TEXTS[1])
    assert first.vocab_size <= 300 and first.eos_id == 0


def test_local_text_json_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nwith a blank line\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text(json.dumps(["second", {"text": "third", "id": 3}]))
    (tmp_path / "c.jsonl").write_text('{"text": "fourth"}\n\n{"text": "  "}\n{"text": "fifth"}\n')
    (tmp_path / "notes.md").write_text("not a corpus file")
    assert load_documents("text", tmp_path) == ["first document\n\nwith a blank line\n", "fourth", "fifth",
                                                "second", "third"]
    (tmp_path / "d.jsonl").write_text('{"body": "sixth"}\n')
    assert load_documents("text", tmp_path / "d.jsonl", text_field="body") == ["sixth"]
    assert load_documents("text", str(tmp_path / "notes.md")) == ["not a corpus file"]  # a file named directly


def test_single_text_file_trains_end_to_end(tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"Sentence number {i} is about spikes.\n" for i in range(400)))
    dm = TextDataModule(source="text", path=str(tmp_path / "train.txt"), block_size=16, batch_size=2,
                        vocab_size=300, cache_dir=tmp_path / "cache")
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert dm.tokenizer.decode(dm.val_tokens).startswith("Sentence number 3")


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("make,error,pattern", [
    (lambda d: str(d / "missing.txt"), ConfigError, r"^path='.*missing\.txt' is invalid: no such file .*data\.path"),
    (lambda d: None, ConfigError, r"^path=None is invalid: .*data\.path"),
    (lambda d: write(d / "latin1.txt", "naïve café".encode("latin-1")), DataError,
     r"latin1\.txt is not valid UTF-8 \(byte offset 2: b'\\xef'\); re-encode"),
    (lambda d: write(d / "model.bin", b"PK\x03\x04\x00\x00text"), DataError,
     r"model\.bin is a binary file \(NUL byte at offset 4\)"),
    (lambda d: write(d / "rows.jsonl", b'{"text": "ok"}\n{"content": "x"}\n'), DataError,
     r"rows\.jsonl: line 2: object has no field 'text' \(fields: content\); set data\.text_field"),
    (lambda d: write(d / "bad.json", b'{"text": 1}'), DataError, r"bad\.json: expected a JSON list"),
    (lambda d: write(d / "blank.txt", b" \n\n\t\n"), DataError,
     r"corpus is empty: data\.path=.*blank\.txt has no non-blank"),
    (lambda d: str(d), DataError, r"corpus is empty"),  # a directory without corpus files
])
def test_bad_local_corpus(tmp_path, make, error, pattern):
    with pytest.raises(error) as raised:
        load_documents("text", make(tmp_path))
    assert raised.match(pattern) and one_line(raised)


def test_corpus_shorter_than_a_block(tmp_path):
    path = write(tmp_path / "tiny.txt", b"Only a few words here.\nAnd a second line.\n")
    dm = TextDataModule(source="text", path=path, block_size=64, vocab_size=300, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match=r"the train split \(data\.path=.*tiny\.txt\) has \d+ tokens, but block_size=64 "
                                        r"needs at least 65; lower data\.block_size or add text") as raised:
        dm.setup("fit")
    one_line(raised)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(source="books"), r"^source='books' is invalid: one of: pydoc, text, wikitext2, c4$"),
    (dict(block_size=1), r"^block_size=1 is invalid"),
    (dict(block_size=32.0), r"^block_size=32.0 is invalid"),
    (dict(batch_size=0), r"^batch_size=0 is invalid"),
    (dict(val_fraction=1.0), r"^val_fraction=1.0 is invalid: must be a number strictly between 0 and 1"),
    (dict(vocab_size=256), r"^vocab_size=256 is invalid: must be an integer >= 257"),
    (dict(tokenizer_path="/no/such/tokenizer"), r"^tokenizer_path='/no/such/tokenizer' is invalid: no such directory"),
    (dict(source="text", path="/no/such/corpus.txt"), r"^path='/no/such/corpus\.txt' is invalid"),
])
def test_bad_arguments_fail_at_construction(tmp_path, kwargs, pattern):
    with pytest.raises(ConfigError) as raised:
        TextDataModule(cache_dir=tmp_path, **kwargs)
    assert raised.match(pattern) and one_line(raised)


def test_unknown_source_in_load_documents():
    with pytest.raises(ConfigError, match="^source='books' is invalid: one of: pydoc, text, wikitext2, c4$"):
        load_documents("books")


@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_hub_source_fails_fast_when_offline(source, tmp_path, monkeypatch):
    import datasets

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(corpus_module, "_probe_hub", lambda: "huggingface.co:443 unreachable: no route")
    monkeypatch.setattr(datasets, "load_dataset", lambda **_: pytest.fail("load_dataset would retry for ~25 s"))
    with pytest.raises(DataError) as raised:
        TextDataModule(source=source, cache_dir=tmp_path).setup("fit")
    assert raised.match(rf"^cannot load '{source}' from the Hugging Face hub \(offline: huggingface\.co:443 "
                        r"unreachable: no route\); .*data=text data\.path=") and one_line(raised)


def test_hub_source_fails_fast_on_this_machine():
    if corpus_module._probe_hub() is None:
        pytest.skip("the hub is reachable from here, so this would download wikitext")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"\(offline: .*data=text data\.path="):
        load_documents("wikitext2")
    assert time.monotonic() - start < 10


def test_hub_load_errors_are_reported_in_one_line(monkeypatch):
    import datasets

    def load_dataset(**kwargs):
        assert kwargs == dict(path="allenai/c4", split="validation",
                              data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"})
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (OfflineModeIsEnabled)\nmore detail")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline mode: datasets answers from its cache, no probe needed
    monkeypatch.setattr(corpus_module, "_probe_hub", lambda: pytest.fail("probed despite offline mode"))
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match=r"^cannot load 'c4' from the Hugging Face hub \(ConnectionError: Couldn't "
                                        r"reach 'allenai/c4' on the Hub \(OfflineModeIsEnabled\)\); ") as raised:
        load_documents("c4", split="validation")
    one_line(raised)


def test_wikitext_rows_become_articles(monkeypatch):
    import datasets

    rows = [" = Alpha = \n", "", " intro\n", " = = Section = = \n", " body\n", " = Beta = \n", " text\n"]
    monkeypatch.setattr(corpus_module, "_probe_hub", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda **_: datasets.Dataset.from_dict({"text": rows}))
    assert load_documents("wikitext2") == [" = Alpha = \n intro\n = = Section = = \n body\n", " = Beta = \n text\n"]


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory, pydoc_docs):
    import transformers

    directory = tmp_path_factory.mktemp("hf-tokenizer")
    backend = tokenizer_module._train_bpe(pydoc_docs[:30], 400)
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(directory)
    return directory


def test_local_hugging_face_tokenizer(hf_tokenizer_dir, tmp_path):
    dm = TextDataModule(tokenizer_path=str(hf_tokenizer_dir), block_size=32, batch_size=4, cache_dir=tmp_path)
    dm.setup("fit")
    tokenizer = dm.tokenizer
    assert tokenizer.eos_id == 0 and tokenizer.vocab_size <= 400 and dm.train_tokens.max() < tokenizer.vocab_size
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text and tokenizer.eos_id not in tokenizer.encode(text)
    assert build_tokenizer([], 0, tokenizer_path=hf_tokenizer_dir).fingerprint == tokenizer.fingerprint


def test_saved_tokenizer_loads_as_a_hugging_face_tokenizer(pydoc_dm, tmp_path):
    pydoc_dm.tokenizer.save(tmp_path / "tok")
    loaded = build_tokenizer([], 0, tokenizer_path=tmp_path / "tok")
    assert (loaded.vocab_size, loaded.eos_id) == (pydoc_dm.tokenizer.vocab_size, pydoc_dm.tokenizer.eos_id)
    assert loaded.encode_batch(TEXTS) == pydoc_dm.tokenizer.encode_batch(TEXTS)


def test_directory_without_a_tokenizer(tmp_path):
    with pytest.raises(DataError, match=r"^data\.tokenizer_path=.* holds no tokenizer that can be loaded .*Hugging "
                                        r"Face tokenizer directory") as raised:
        build_tokenizer([], 0, tokenizer_path=tmp_path)
    one_line(raised)


@pytest.mark.parametrize("name", ["pydoc", "text", "wikitext2", "c4"])
def test_hydra_configs_spell_out_every_argument(name, tmp_path, monkeypatch):
    from hydra.utils import instantiate

    monkeypatch.setenv("SPIKELLM_CACHE", str(tmp_path))
    cfg = OmegaConf.merge({"seed": 7}, {"data": OmegaConf.load(CONF_DATA / f"{name}.yaml")})
    assert set(cfg.data) - {"_target_"} == set(inspect.signature(TextDataModule).parameters)
    assert cfg.data.source == name and cfg.data.path is None  # data=text: data.path or data.train_path
    if name == "text":
        cfg.data.path = str(CONF_DATA / "text.yaml")
    dm = instantiate(cfg.data)
    assert (dm.hparams.seed, dm.hparams.block_size, dm.hparams.batch_size, dm.cache_dir) == (7, 128, 16, tmp_path)
