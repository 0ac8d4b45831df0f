"""One loader for every model file, and files written before still load.

``tests/fixtures/formats`` holds one small model of each on-disk format as an earlier spikellm
wrote it (``written_by.txt``; ``make.py`` wrote them) with the logits it gave. ``load_model``
recognises each format and rebuilds the very same model.
"""

import pytest
from conftest import ROOT
import torch
from safetensors.torch import load_file

from spikellm.checkpoints import FORMATS, LoadedModel, detect_format, load_model
from spikellm.errors import ConfigError, DataError
from spikellm.models.hf import causal_lm_logits

FIXTURES = ROOT / "tests" / "fixtures" / "formats"
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


def test_a_spiking_checkpoint_whose_config_was_edited_is_refused(tmp_path):
    """Config.json is bound to the weights by a digest in their metadata, so another
    n_heads with the same tensor shapes (8 heads of 8 and 4 KV heads for 4 of 16 and 2) is one line,
    not a different model evaluated silently. Checkpoints written before the digest still load."""
    import json

    from spikellm.checkpoints.spiking import load_spiking_checkpoint, save_spiking_checkpoint

    model, tokenizer, config = load_spiking_checkpoint(PATHS["spiking"], backend="torch")
    directory = save_spiking_checkpoint(model, tmp_path / "spiking", model_config=config["model"],
                                        neuron=config["neuron"], tokenizer=tokenizer)
    assert load_model(directory).format == "spiking"
    edited = json.loads((directory / "config.json").read_text())
    assert (edited["model"]["n_heads"], edited["model"]["n_kv_heads"]) == (4, 2)
    edited["model"].update(n_heads=8, n_kv_heads=4)
    (directory / "config.json").write_text(json.dumps(edited))
    with pytest.raises(DataError, match="config.json is not the one its weights were written with"):
        load_model(directory)
