"""Issue 15: one loader for every model file, and files written before still load.

``tests/fixtures/formats`` holds one small model of each on-disk format as an earlier spikellm
wrote it (``written_by.txt``; ``make.py`` wrote them) with the logits it gave. ``load_model``
recognises each format and rebuilds the very same model.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spikellm.checkpoints import FORMATS, LoadedModel, detect_format, load_model
from spikellm.errors import ConfigError, DataError
from spikellm.models.hf import causal_lm_logits

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
IDS = torch.tensor([[5, 17, 42, 9, 3, 60, 11, 28], [7, 7, 30, 2, 51, 19, 44, 6]])
PATHS = {"lightning": FIXTURES / "lightning" / "last.ckpt", "spiking": FIXTURES / "spiking",
         "converted": FIXTURES / "converted", "hf": FIXTURES / "hf"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(PATHS))
def test_files_written_before_load_to_the_same_logits(name):
    assert detect_format(PATHS[name]) == name
    loaded = load_model(PATHS[name])
    assert isinstance(loaded, LoadedModel) and loaded.format == name and not loaded.model.training
    assert loaded.tokenizer.vocab_size <= 512
    with torch.no_grad():
        logits = causal_lm_logits(loaded.model, IDS).float()
    torch.testing.assert_close(logits, load_file(str(FIXTURES / "expected.safetensors"))[name], rtol=0, atol=1e-6)


def test_every_format_is_named_in_the_registry():
    assert set(FORMATS) == set(PATHS)


def test_what_is_no_model_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such file or directory"):
        load_model(tmp_path / "missing.ckpt")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(DataError, match="not a readable checkpoint"):
        load_model(tmp_path / "notes.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a model directory"):
        load_model(tmp_path / "empty")
