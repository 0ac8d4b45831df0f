"""A file read is data, never code: crafted checkpoints run nothing, exports are never pickled.

- every ``_target_`` read from a checkpoint (train.py's Lightning checkpoint, a spiking
  checkpoint's config.json, a converted model's spikellm.json) must be one of spikellm's model and
  neuron classes, checked before anything is built (:func:`spikellm.config.check_trusted`);
- every export directory holds safetensors and JSON, no pickle;
- no source file loads with pickle, ``torch.load`` without ``weights_only=True``, ``eval``/``exec``.
"""
import ast
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from spikellm.checkpoints import load_model
from spikellm.checkpoints.spiking import load_spiking_checkpoint, read_config, save_spiking_checkpoint
from spikellm.config import build, build_neuron, check_trusted
from spikellm.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib"}
NEURON = {"name": "ternary", "encoder": {"_target_": "spikellm.neurons.TernaryEncoder", "_partial_": True, "bits": 4},
          "weight_quantizer": None}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from spikellm.data.corpus import load_documents
    from spikellm.data.tokenizer import build_tokenizer

    return build_tokenizer(load_documents("pydoc")[:20], vocab_size=300, cache_dir=tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def model_config(tokenizer):
    return {"_target_": "spikellm.models.LlamaConfig", "vocab_size": tokenizer.vocab_size, "dim": 32, "n_layers": 1,
            "n_heads": 4, "max_seq_len": 16}


def spiking_model(model_config, neuron=NEURON):
    torch.manual_seed(0)
    encoder, weight_quantizer = build_neuron(neuron)
    return build(model_config, "model").build(encoder, weight_quantizer)


@pytest.fixture(scope="module")
def lightning_checkpoint(tmp_path_factory, tokenizer, model_config):
    """What train.py writes, as far as eval.py reads it: weights, hyperparameters, tokenizer."""
    from spikellm.training.task import CausalLMTask

    task = CausalLMTask(model=model_config, neuron=NEURON)
    state = {"state_dict": {f"model.{k}": v for k, v in task.model.state_dict().items()},
             "hyper_parameters": dict(task.hparams), "TextDataModule": {"tokenizer": tokenizer.state()}}
    path = tmp_path_factory.mktemp("lightning") / "last.ckpt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def spiking_checkpoint(tmp_path_factory, tokenizer, model_config):
    directory = tmp_path_factory.mktemp("spiking") / "ckpt"
    return save_spiking_checkpoint(spiking_model(model_config), directory, model_config=model_config, neuron=NEURON,
                                   tokenizer=tokenizer)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer):
    """A converted Hugging Face model directory (config.json, model.safetensors, spikellm.json)."""
    import transformers

    from spikellm.models.spikify import spikify_from_config
    from spikellm.checkpoints.converted import save_converted

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16))
    spikify_from_config(hf, NEURON)
    directory = tmp_path_factory.mktemp("converted") / "model"
    return save_converted(hf, tokenizer, directory, {"neuron": NEURON, "thresholds": {}, "source": "test"})


# A payload is a node with a _target_ that, were it instantiated, would create `marker`.
def touch(marker, **extra):
    return {"_target_": "pathlib.Path.touch", "_args_": [str(marker)], **extra}


PAYLOADS = {
    # where the payload goes: (model config, neuron config) -> the changed pair
    "model target": lambda m, n, marker: (touch(marker), n),
    "encoder partial": lambda m, n, marker: (m, {**n, "encoder": touch(marker, _partial_=True)}),
    "weight quantizer": lambda m, n, marker: (m, {**n, "weight_quantizer": touch(marker, _partial_=True)}),
    "attention encoder": lambda m, n, marker: (m, {**n, "attention": {"key": touch(marker), "value": touch(marker)}}),
    "nested in _args_": lambda m, n, marker: ({**m, "_args_": [touch(marker)]}, n),
    "under _recursive_ false": lambda m, n, marker: ({**m, "_recursive_": False, "extra": {"x": touch(marker)}}, n),
    "in a list": lambda m, n, marker: (m, {**n, "encoder": {**n["encoder"], "clip": [touch(marker)]}}),
    "through a spikellm module's import": lambda m, n, marker: (
        {"_target_": "spikellm.models.llama.torch.save", "_args_": [{}, str(marker)]}, n),
    "a spikellm function that writes": lambda m, n, marker: (
        {"_target_": "spikellm.io.atomic_write_json", "path": str(marker), "data": {}}, n),
    "a dunder path": lambda m, n, marker: ({"_target_": "spikellm.models.__builtins__", "x": str(marker)}, n),
    "an interpolation": lambda m, n, marker: ({**m, "dim": "${oc.env:HOME}"}, n),
    "a target that is not a string": lambda m, n, marker: ({**m, "_target_": ["pathlib.Path.touch"]}, n),
}


def test_the_payloads_are_live(tmp_path):
    """Instantiated as they stand, the payloads run: what the checks below stop."""
    from hydra.utils import instantiate

    instantiate(touch(tmp_path / "plain"))
    instantiate({"_target_": "spikellm.models.llama.torch.save", "_args_": [{}, str(tmp_path / "via_spikellm")]})
    assert (tmp_path / "plain").exists() and (tmp_path / "via_spikellm").exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_crafted_lightning_checkpoint_runs_nothing(tmp_path, lightning_checkpoint, payload):
    state = torch.load(lightning_checkpoint, weights_only=True)
    marker = tmp_path / "pwned"
    hparams = state["hyper_parameters"]
    hparams["model"], hparams["neuron"] = PAYLOADS[payload](hparams["model"], hparams["neuron"], marker)
    crafted = tmp_path / "crafted.ckpt"
    torch.save(state, crafted)
    with pytest.raises(DataError) as error:
        load_model(crafted)
    message = str(error.value)
    assert str(crafted) in message and "is refused" in message and "\n" not in message
    assert not marker.exists()


def test_a_user_neuron_does_not_launder_the_checkpoint(tmp_path, lightning_checkpoint):
    """eval.py neuron=...: the checkpoint's own neuron config is still checked."""
    state = torch.load(lightning_checkpoint, weights_only=True)
    state["hyper_parameters"]["neuron"] = {**NEURON, "encoder": touch(tmp_path / "pwned", _partial_=True)}
    torch.save(state, tmp_path / "crafted.ckpt")
    with pytest.raises(DataError, match=r"hyper_parameters\.neuron\.encoder\._target_='pathlib\.Path\.touch'"):
        load_model(tmp_path / "crafted.ckpt", neuron=NEURON)
    assert not (tmp_path / "pwned").exists()


def test_hyper_parameters_other_than_the_model_are_never_used(tmp_path, lightning_checkpoint):
    # the loader builds the model and neuron groups alone (checked); nothing else it holds is run
    state = torch.load(lightning_checkpoint, weights_only=True)
    state["hyper_parameters"]["exec"] = "print(1)"
    torch.save(state, tmp_path / "odd.ckpt")
    assert load_model(tmp_path / "odd.ckpt").format == "lightning"
    del state["hyper_parameters"]["model"]
    torch.save(state, tmp_path / "no_model.ckpt")
    with pytest.raises(DataError, match="hyper_parameters do not describe a train.py model"):
        load_model(tmp_path / "no_model.ckpt")


def test_legit_lightning_checkpoint_loads(lightning_checkpoint):
    loaded = load_model(lightning_checkpoint)
    assert loaded.config["neuron"] == NEURON
    assert loaded.model(torch.zeros(1, 4, dtype=torch.long)).shape[-1] == loaded.model.config.vocab_size


def craft(source: Path, destination: Path, edit) -> Path:
    import shutil

    shutil.copytree(source, destination)
    for name in ("config.json", "spikellm.json"):
        if (destination / name).is_file() and (name == "spikellm.json" or not (destination / "spikellm.json").exists()):
            data = json.loads((destination / name).read_text())
            edit(data)
            (destination / name).write_text(json.dumps(data))
    return destination


@pytest.mark.parametrize("payload", PAYLOADS)
def test_crafted_spiking_checkpoint_runs_nothing(tmp_path, spiking_checkpoint, payload):
    marker = tmp_path / "pwned"

    def edit(config):
        config["model"], config["neuron"] = PAYLOADS[payload](config["model"], config["neuron"], marker)

    crafted = craft(spiking_checkpoint, tmp_path / "crafted", edit)
    for load in (read_config, load_spiking_checkpoint, load_model):
        with pytest.raises(DataError) as error:
            load(crafted)
        assert str(crafted / "config.json") in str(error.value) and "is refused" in str(error.value)
    assert not marker.exists()


def test_legit_spiking_checkpoint_loads(spiking_checkpoint):
    model, _, config = load_spiking_checkpoint(spiking_checkpoint)
    assert config["neuron"] == NEURON and model.config.dim == 32
    assert load_model(spiking_checkpoint).config["neuron"] == NEURON


@pytest.mark.parametrize("payload", ["encoder partial", "weight quantizer", "in a list", "an interpolation"])
def test_crafted_converted_model_runs_nothing(tmp_path, converted, payload):
    marker = tmp_path / "pwned"

    def edit(record):
        if payload == "an interpolation":
            record["neuron"] = {**record["neuron"], "name": "${oc.env:HOME}"}
        else:
            record["neuron"] = PAYLOADS[payload]({}, record["neuron"], marker)[1]

    crafted = craft(converted, tmp_path / "crafted", edit)
    with pytest.raises(DataError) as error:
        load_model(crafted)
    assert str(crafted / "spikellm.json") in str(error.value) and "is refused" in str(error.value)
    assert not marker.exists()


def test_legit_converted_model_loads(converted):
    loaded = load_model(converted)
    assert loaded.config["neuron"] == NEURON


def test_check_trusted_accepts_the_shipped_model_and_neuron_groups(tmp_path):
    """Every model and neuron option a checkpoint can record passes (the HF ones are never recorded)."""
    from conftest import compose
    from omegaconf import OmegaConf

    for group in ("model", "neuron"):
        for option in sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")):
            if (group, option) in {("model", "hf"), ("model", "native")}:
                continue
            cfg = compose([f"{group}={option}"], tmp_path / "run")
            check_trusted(OmegaConf.to_container(cfg[group], resolve=True), f"{group}={option}")


def test_exports_hold_no_pickle(tmp_path, tokenizer, model_config, spiking_checkpoint, converted):
    """The spiking checkpoint, the Hugging Face export and the converted model: safetensors and text."""
    from safetensors.torch import load_file

    from spikellm.checkpoints.hf import save_hf_llama

    dense = spiking_model(model_config, neuron=None)
    exported = save_hf_llama(dense, tokenizer, tmp_path / "hf")
    for directory in (spiking_checkpoint, exported, converted):
        files = [p for p in Path(directory).rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files), directory
        for path in files:
            assert path.suffix not in PICKLE_SUFFIXES, path
            head = path.read_bytes()[:4]
            assert not head.startswith(b"\x80") and head != b"PK\x03\x04", f"{path} looks pickled or zipped"
            if path.suffix == ".safetensors":
                assert load_file(str(path))


# -- the sources: nothing loads with pickle or runs strings -------------------------------------------

SOURCES = sorted(p for base in ("spikellm", "kernels", "bench") for p in (ROOT / base).rglob("*.py")) + [
    ROOT / "train.py", ROOT / "eval.py"]
LOADERS = {"load", "load_from_checkpoint", "fit", "validate", "test", "predict", "load_checkpoint"}


def unsafe_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}

        def is_true(key):
            return isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True

        where = f"{path.relative_to(ROOT)}:{node.lineno}"
        if owner == "torch" and name == "load" and not is_true("weights_only"):
            found.append(f"{where} torch.load without weights_only=True")
        elif owner in {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}:
            found.append(f"{where} {owner}.{name}")
        elif owner in {"np", "numpy"} and name == "load" and is_true("allow_pickle"):
            found.append(f"{where} np.load with allow_pickle=True")
        elif owner == "yaml" and name in {"load", "unsafe_load", "full_load"} and "Loader" not in keywords:
            found.append(f"{where} yaml.{name}")
        elif isinstance(func, ast.Name) and name in {"eval", "exec", "__import__"}:
            found.append(f"{where} {name}()")
        elif name in LOADERS and isinstance(keywords.get("weights_only"), ast.Constant) \
                and keywords["weights_only"].value is False:
            found.append(f"{where} {name}(weights_only=False)")
        elif is_true("trust_remote_code") or is_true("allow_pickle"):
            found.append(f"{where} {name}(trust_remote_code/allow_pickle=True)")
    return found


def test_no_source_loads_pickles_or_runs_strings():
    assert len(SOURCES) > 20
    found = [call for path in SOURCES for call in unsafe_calls(path)]
    assert not found, found


class _Payload:
    """Unpickling this would call os.system: the safe loader must refuse it, and say so in one line."""

    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/spikellm-pickle-ran",))


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_a_pickled_hf_checkpoint_with_code_is_one_line(tmp_path, tokenizer, kind):
    """A Hugging Face directory whose pytorch_model.bin the safe loader refuses ended in
    PyTorch's UnpicklingError traceback; it is one line naming the file and the fix (and runs nothing)."""
    import pickle

    import transformers

    directory = tmp_path / "hf"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16)).save_pretrained(directory)
    (directory / "model.safetensors").unlink()
    tokenizer.save(directory)
    payload = {"model.embed_tokens.weight": _Payload()}
    if kind == "zip":
        torch.save(payload, directory / "pytorch_model.bin")
    else:
        (directory / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
    marker = Path("/tmp/spikellm-pickle-ran")
    marker.unlink(missing_ok=True)
    with pytest.raises(DataError, match=r"pytorch_model.bin are a pickle that holds code or objects other than "
                                        r"tensors, which spikellm refuses to run; convert them to safetensors") as raised:
        load_model(directory, neuron=NEURON)
    assert "\n" not in str(raised.value) and not marker.exists()


def test_edited_hyper_parameters_of_a_training_checkpoint_are_refused(tmp_path, tokenizer, model_config):
    """An edit that changes no shape (max_seq_len) loaded and evaluated past the trained
    context; the checkpoint's digest of its model and neuron groups refuses it (other edits too)."""
    from spikellm.training.task import CausalLMTask

    task = CausalLMTask(model=model_config, neuron=NEURON)
    state = {"state_dict": {f"model.{k}": v for k, v in task.model.state_dict().items()},
             "hyper_parameters": dict(task.hparams), "TextDataModule": {"tokenizer": tokenizer.state()}}
    task.on_save_checkpoint(state)
    torch.save(state, tmp_path / "intact.ckpt")
    assert load_model(tmp_path / "intact.ckpt").model.config.max_seq_len == model_config["max_seq_len"]
    state["hyper_parameters"]["model"] = {**model_config, "max_seq_len": 4 * model_config["max_seq_len"]}
    torch.save(state, tmp_path / "edited.ckpt")
    with pytest.raises(DataError, match=r"edited.ckpt: its hyper_parameters \(model or neuron\) are not those its "
                                        r"weights were trained with"):
        load_model(tmp_path / "edited.ckpt")


def test_a_training_checkpoint_with_a_nan_weight_is_one_line(tmp_path, tokenizer, model_config):
    """It evaluated to ppl NaN with exit 0, and generate.py sampled from NaN probabilities."""
    from spikellm.training.task import CausalLMTask

    task = CausalLMTask(model=model_config, neuron=NEURON)
    state = {"state_dict": {f"model.{k}": v.clone() for k, v in task.model.state_dict().items()},
             "hyper_parameters": dict(task.hparams), "TextDataModule": {"tokenizer": tokenizer.state()}}
    task.on_save_checkpoint(state)
    state["state_dict"]["model.norm.weight"][2] = float("nan")
    torch.save(state, tmp_path / "nan.ckpt")
    with pytest.raises(DataError, match=r"nan.ckpt: tensor norm.weight holds non-finite values"):
        load_model(tmp_path / "nan.ckpt")


def test_model_files_get_the_mode_a_plain_open_gives(tmp_path, tokenizer, model_config):
    """model.safetensors (written by safetensors) was 0600 in every model directory."""
    import os

    old = os.umask(0o022)
    try:
        directory = save_spiking_checkpoint(spiking_model(model_config), tmp_path / "ckpt", model_config=model_config,
                                            neuron=NEURON, tokenizer=tokenizer)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}
    assert set(modes.values()) == {0o644} and directory.stat().st_mode & 0o777 == 0o755, modes
