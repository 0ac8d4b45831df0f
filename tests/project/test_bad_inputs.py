"""Bad inputs, each one clear line: mistyped overrides, unknown constructor arguments, truncated
weights, outputs that cannot be written. On the command line: exit 2 and one ``error:`` line."""
import errno
import json
import os
from pathlib import Path

import pytest
from conftest import CONF, ROOT, compose, run_script

from spikellm.config import build, build_neuron
from spikellm.config.cli import check_command_line
from spikellm.errors import ConfigError, DataError, OverrideError
from spikellm.io import atomic_directory, atomic_write_json, check_writable


def one_error_line(done) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


# -- 1. the command line: one line before Hydra prints its several -----------------------------------

CLI = [
    ("train.py", ["trainer.max_step=5"], "error: trainer.max_step is not a key of the config (did you mean "
                                         "trainer.max_steps? to add a new key use +trainer.max_step=5)"),
    ("train.py", ["trainr.max_steps=5"], "did you mean trainer.max_steps?"),
    ("eval.py", ["ckpt=x.ckpt", "perplexity.dataset=[pydoc]"], "error: perplexity.dataset is not a key of the config "
                                                                "(did you mean perplexity.datasets?"),
    ("train.py", ["neuron=lif_typo"], "error: neuron=lif_typo is not an option of the neuron group (no "
                                      "neuron/lif_typo.yaml in conf/); one of: bitnet, bitplane, gif"),
    ("eval.py", ["ckpt=x.ckpt", "neuron=ternay"], "error: neuron=ternay is not an option of the neuron group (no "
                                                  "neuron/ternay.yaml in conf/; did you mean neuron=ternary?)"),
    ("train.py", ["experiment=smok"], "did you mean experiment=smoke?"),
    ("eval.py", [], "error: ckpt=??? is not set: add ckpt=<"),
    ("train.py", ["trainer.max_steps=["], "error: cannot parse the override 'trainer.max_steps=['"),
    ("train.py", ["+trainer.max_steps=5"], "drop the + (trainer.max_steps=5), or use ++trainer.max_steps=5"),
    ("train.py", ["neuron=ternary,none"], "error: neuron=ternary,none is ambiguous"),
    ("train.py", ["--cfg", "job", "trainer.max_step=3"], "error: trainer.max_step is not a key of the config"),
    ("train.py", ["-m", "neuron=ternary,lif_typo"], "error: neuron=lif_typo is not an option of the neuron group"),
    # a sweep without -m trained one default run with no word
    ("train.py", ["experiment=spike_sweep"], "error: experiment=spike_sweep is a sweep over budget (11 runs): run "
                                             "it with -m"),
]


@pytest.mark.parametrize("script,args,expected", CLI, ids=[" ".join([s, *a]) for s, a, _ in CLI])
def test_cli_bad_override_is_one_line(tmp_path, script, args, expected):
    run = tmp_path / "run"
    done = run_script(script, *args, f"hydra.run.dir={run}", f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=60)
    line = one_error_line(done)
    assert expected in line, line
    assert not run.exists() and not (tmp_path / "sweep").exists()  # stopped before Hydra made the run


def test_cli_run_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    done = run_script("train.py", f"hydra.run.dir={tmp_path / 'file' / 'run'}", timeout=60)
    line = one_error_line(done)
    assert line.startswith(f"error: hydra.run.dir={tmp_path / 'file' / 'run'} cannot be created: "), line
    assert "is a file, not a directory" in line


def test_read_only_run_dir(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "mkdtemp", raiser(errno.EROFS))
    with pytest.raises(OverrideError, match=r"^hydra\.run\.dir=.*/run cannot be created in .*: read-only file "
                                            r"system; choose a writable directory \[EROFS\]; choose another"):
        check_command_line(CONF, "train", [f"hydra.run.dir={tmp_path / 'run'}"])


@pytest.mark.parametrize("argv,message", [
    (["~trainer.fo"], "~trainer.fo deletes a key, and trainer.fo is not a key of the config"),
    (["hydra.run.dirr=/x"], "hydra.run.dirr is not a key of the config (did you mean hydra.run.dir?"),
    (["neuronn=ternary"], "neuronn is not a key of the config (did you mean neuron? to add a new key use "
                          "+neuronn=ternary)"),
    (["model=hf"], "model.hf_path=??? is not set: add model.hf_path=<a local Hugging Face model directory"),
    (["trainer.max_steps=${model.dimm}"], "trainer.max_steps=${model.dimm} cannot be resolved: Interpolation key "
                                          "'model.dimm' not found"),
    (["hydra/launcher=nope"], "hydra/launcher=nope is not an option of the hydra/launcher group"),
    (["-m", "trainer.max_steps=1,2", "neuron=ternary,gif,nope"], "neuron=nope is not an option"),
])
def test_bad_command_lines_in_process(argv, message):
    with pytest.raises(OverrideError) as error:
        check_command_line(CONF, "train", argv)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("argv", [
    [], ["experiment=smoke", "trainer.max_steps=3"], ["++trainer.max_step=5"], ["+trainer.foo=1"],
    ["-m", "neuron=ternary,none", "trainer.max_steps=range(1,3)"], ["--help"], ["--cfg", "job"],
    ["neuron=ternary", "neuron=none"], ["hydra.job.chdir=true"], ["--config-dir", "/nonexistent", "x=1"],
])
def test_good_command_lines_pass(argv):
    check_command_line(CONF, "train", argv)


def test_mistakes_in_a_config_file_the_user_wrote(tmp_path):
    import shutil

    conf = Path(shutil.copytree(CONF, tmp_path / "conf"))
    (conf / "experiment" / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - override /neuron: ternery\n")
    (conf / "experiment" / "broken.yaml").write_text("trainer:\n  max_steps: [\n")
    with pytest.raises(OverrideError, match=r"^In 'train': neuron=ternery is not an option of the neuron group .*"
                                            r"did you mean neuron=ternary\?"):
        check_command_line(conf, "train", ["experiment=mine"])
    with pytest.raises(OverrideError, match=r"experiment/broken\.yaml:3:1 is not valid YAML: "):
        check_command_line(conf, "train", ["experiment=broken"])


def test_eval_command_lines():
    check_command_line(CONF, "eval", ["ckpt=x", "neuron=ternary", "tasks=[tiny_mc]"])
    with pytest.raises(OverrideError, match=r"results=\$\{paths.nope\}/r.json cannot be resolved"):
        check_command_line(CONF, "eval", ["ckpt=x", "results=${paths.nope}/r.json"])


# -- 2. an argument the target does not take ------------------------------------------------------------

def test_unknown_encoder_argument_names_the_key(tmp_path):
    cfg = compose(["+neuron.encoder.bitz=3"], tmp_path)
    with pytest.raises(ConfigError) as error:
        build_neuron(cfg.neuron)
    assert error.value.key == "neuron.encoder.bitz"
    assert str(error.value).startswith("neuron.encoder.bitz=3 is invalid: TernaryEncoder has no argument 'bitz' "
                                       "(did you mean bits?)")


@pytest.mark.parametrize("override,key", [("+model.dimm=64", "model.dimm"), ("+trainer.max_step=5", "trainer.max_step"),
                                          ("+data.blocksize=32", "data.blocksize")])
def test_unknown_argument_of_any_group(tmp_path, override, key):
    cfg = compose([override], tmp_path)
    group = key.split(".")[0]
    with pytest.raises(ConfigError) as error:
        build(cfg[group], group)
    assert error.value.key == key and "has no argument" in str(error.value)


class Forwarding:
    """A target whose signature hides its arguments: the mistake surfaces when it is called."""

    def __init__(self, **kwargs):
        from spikellm.neurons import TernaryEncoder

        self.encoder = TernaryEncoder(**kwargs)


def test_unknown_argument_behind_kwargs_names_the_key():
    node = {"_target_": f"{__name__}.Forwarding", "_partial_": True, "bits": 4, "bitz": 3}
    with pytest.raises(ConfigError) as error:
        build(node, "neuron.encoder")
    assert error.value.key == "neuron.encoder.bitz" and "takes no argument 'bitz'" in str(error.value)


def test_unknown_argument_nested_in_a_node():
    inner = {"_target_": "spikellm.models.LlamaConfig", "vocab_sise": 64, "dim": 32, "n_layers": 1, "n_heads": 4}
    with pytest.raises(ConfigError, match=r"^stage\.inner\.vocab_sise=64 is invalid: LlamaConfig has no argument "
                                          r"'vocab_sise' \(did you mean vocab_size\?\)"):
        build({"_target_": "builtins.dict", "inner": inner}, "stage")


def test_cli_unknown_argument_is_one_line_before_any_data_work(tmp_path):
    done = run_script("train.py", "experiment=smoke", "+neuron.encoder.bitz=3", f"hydra.run.dir={tmp_path}")
    line = one_error_line(done)
    assert line.startswith("error: neuron.encoder.bitz=3 is invalid: TernaryEncoder has no argument 'bitz'"), line
    assert not (tmp_path / "checkpoints").exists()


# -- 3. truncated weights in a Hugging Face model directory ------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny LLaMA in Hugging Face format with a tokenizer, its weights cut in half."""
    import torch
    import transformers

    from spikellm.data.corpus import load_documents
    from spikellm.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(load_documents("pydoc")[:20], vocab_size=300, cache_dir=tmp_path_factory.mktemp("bpe"))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    directory = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(directory)
    tokenizer.save(directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return directory


@pytest.mark.parametrize("keep", [None, 5])
def test_truncated_safetensors_is_a_data_error(hf_dir, tmp_path, keep):
    import shutil

    from spikellm.checkpoints.hf import load_hf_causal_lm

    directory = Path(shutil.copytree(hf_dir, tmp_path / "llama"))
    if keep is not None:  # not even a header
        (directory / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes()[:keep])
    with pytest.raises(DataError) as error:
        load_hf_causal_lm(directory)
    assert str(directory / "model.safetensors") in str(error.value) and "truncated" in str(error.value)
    assert "\n" not in str(error.value)


def test_cli_truncated_safetensors_is_one_line(hf_dir, tmp_path):
    done = run_script("eval.py", f"ckpt={hf_dir}", f"hydra.run.dir={tmp_path}")
    line = one_error_line(done)
    assert f"{hf_dir / 'model.safetensors'}" in line and "truncated" in line, line
    assert not (tmp_path / "results.json").exists()


def test_unreadable_config_json_is_a_data_error(hf_dir, tmp_path):
    import shutil

    from spikellm.checkpoints.loader import load_model

    directory = Path(shutil.copytree(hf_dir, tmp_path / "llama"))
    (directory / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(DataError, match=r"config\.json cannot be read"):
        load_model(directory)


# -- 4. outputs that cannot be written --------------------------------------------------------------------

def raiser(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


def test_check_writable_creates_and_probes(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_writable(target) == target and target.is_dir()
    assert list(target.iterdir()) == []  # the probe is gone


def test_check_writable_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"^paths\.output_dir='.*/f' is invalid: is a file, not a directory"):
        check_writable(tmp_path / "f")
    with pytest.raises(ConfigError, match=r"cannot be created: a part of the path is a file.*\[ENOTDIR\]"):
        check_writable(tmp_path / "f" / "sub")


@pytest.mark.parametrize("code,reason", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied")])
def test_check_writable_names_the_os_reason(tmp_path, monkeypatch, code, reason):
    import spikellm.io as atomic

    monkeypatch.setattr(atomic.os, "write", raiser(code))
    with pytest.raises(ConfigError) as error:
        check_writable(tmp_path / "out", key="results")
    message = str(error.value)
    assert message.startswith(f"results='{tmp_path / 'out'}' is invalid: is not writable: {reason}"), message
    assert f"[{errno.errorcode[code]}]" in message
    assert list((tmp_path / "out").iterdir()) == []  # the probe was removed
    monkeypatch.setattr(Path, "mkdir", raiser(errno.EROFS))
    with pytest.raises(ConfigError, match="cannot be created: read-only file system"):
        check_writable(tmp_path / "new")


def test_full_disk_in_an_atomic_directory_keeps_the_previous_one(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(DataError) as error:
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "weights").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(error.value) == (f"cannot write {target}: no space left on the device; free some space or choose "
                                "another directory [ENOSPC]; the previous export is intact")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no partial directory left


def test_read_only_at_the_rename_puts_the_previous_one_back(tmp_path, monkeypatch):
    import spikellm.io as atomic

    target = tmp_path / "export"
    target.mkdir()
    (target / "weights").write_text("old")
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".partial"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(DataError, match=r"cannot write .*export: read-only file system.*the previous export is intact"):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_rust_library_reporting_a_full_disk(tmp_path):
    from safetensors import SafetensorError

    with pytest.raises(DataError, match=r"cannot write .*new: no space left on the device.*nothing was written"):
        with atomic_directory(tmp_path / "new"):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(ValueError, match="a bug"):
        with atomic_directory(tmp_path / "new"):
            raise ValueError("a bug")
    with pytest.raises(FileNotFoundError):  # reading an input is not a write failure
        with atomic_directory(tmp_path / "new"):
            raise FileNotFoundError(errno.ENOENT, "No such file", "input.txt")
    assert list(tmp_path.iterdir()) == []


def test_atomic_json_on_a_full_disk(tmp_path, monkeypatch):
    path = atomic_write_json(tmp_path / "results.json", {"ppl": 1.0})
    monkeypatch.setattr(json, "dump", raiser(errno.ENOSPC))
    with pytest.raises(DataError, match=r"cannot write .*results\.json: no space left.*the previous results\.json "
                                        r"is intact"):
        atomic_write_json(path, {"ppl": 2.0})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"ppl": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left
    with pytest.raises(DataError, match=r"cannot write .*results\.json: a file of that name is in the way \[EEXIST\]"):
        atomic_write_json(path / "results.json", {})


def test_full_disk_while_saving_a_spiking_checkpoint(tmp_path, monkeypatch, hf_dir):
    """End to end: the weights writer fails half-way; the checkpoint already there is intact."""
    import safetensors.torch
    from safetensors import SafetensorError

    from spikellm.checkpoints.spiking import load_spiking_checkpoint, save_spiking_checkpoint
    from spikellm.data.tokenizer import build_tokenizer
    from spikellm.models import LlamaConfig

    tokenizer = build_tokenizer([], vocab_size=0, tokenizer_path=str(hf_dir))
    config = {"_target_": "spikellm.models.LlamaConfig", "vocab_size": tokenizer.vocab_size, "dim": 16,
              "n_layers": 1, "n_heads": 2, "max_seq_len": 16}
    model = LlamaConfig(**{k: v for k, v in config.items() if k != "_target_"}).build()
    directory = save_spiking_checkpoint(model, tmp_path / "ckpt", model_config=config, neuron=None, tokenizer=tokenizer)
    before = (directory / "model.safetensors").read_bytes()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DataError, match=r"cannot write .*ckpt: no space left on the device"):
        save_spiking_checkpoint(model, directory, model_config=config, neuron=None, tokenizer=tokenizer, overwrite=True)
    monkeypatch.undo()
    assert (directory / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_spiking_checkpoint(directory)[2]["model"] == config


# ---- values that used to end in a traceback (or a silent wrong run) are one line ----

@pytest.mark.parametrize("override,match", [
    ("task.lr=-1", r"task.lr=-1 is invalid: must be a finite number > 0"),
    ("task.lr=nan", r"task.lr=nan is invalid"),
    ("task.lr=abc", r"task.lr='abc' is invalid: must be a finite number"),
    ("task.betas=[1.5,0.9]", r"task.betas=\[1.5, 0.9\] is invalid: must be two numbers in \[0, 1\)"),
    ("trainer.val_check_interval=0", r"trainer.val_check_interval=0 is invalid: must be a number of steps"),
])
def test_bad_optimizer_and_trainer_values_are_one_line(tmp_path, override, match):
    from spikellm.training.pipeline import prepare

    cfg = compose(["experiment=smoke", override], tmp_path)
    with pytest.raises(ConfigError, match=match):
        prepare(cfg)


def test_a_zero_perplexity_window_is_refused(tmp_path):
    done = run_script("eval.py", f"ckpt={ROOT / 'tests/fixtures/formats/lightning/last.ckpt'}", "perplexity.seqlen=0",
                      f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2 and "perplexity.seqlen=0 is invalid" in done.stderr
    assert done.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("argv,message", [
    (["+precision=bf16-true"], "+precision=bf16-true adds a top-level key that nothing reads; did you mean "
                               "trainer.precision=bf16-true?"),
    (["precision=bf16-true"], "precision is not a key of the config (did you mean trainer.precision=bf16-true?)"),
    (["lr=0.1"], "lr is not a key of the config (did you mean task.lr=0.1?)"),
    (["max_steps=5"], "max_steps is not a key of the config (did you mean trainer.max_steps=5?)"),
])
def test_keys_of_a_group_given_at_the_top_level_name_the_group(tmp_path, argv, message):
    """``+precision=...`` (what an earlier hint suggested) trained in fp32 without a word."""
    with pytest.raises(OverrideError) as error:
        check_command_line(CONF, "train", [*argv, f"hydra.run.dir={tmp_path / 'run'}"])
    assert str(error.value) == message


def test_a_new_key_of_ones_own_is_still_allowed(tmp_path):
    check_command_line(CONF, "train", ["+my_note=hello", f"hydra.run.dir={tmp_path / 'run'}"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the hint is for machines without a GPU")
def test_a_gpu_trainer_without_a_gpu_names_the_cpu_setting(tmp_path):
    from spikellm.training.pipeline import prepare

    cfg = compose(["experiment=smoke", "trainer=ddp", "trainer.devices=4"], tmp_path)
    with pytest.raises(ConfigError, match="add trainer.accelerator=cpu"):
        prepare(cfg)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_keep_the_mode_a_plain_open_gives(tmp_path, umask):
    """Files written atomically were 0600 whatever the umask (mkstemp's mode), so a group
    sharing a run directory could not read them; they get what open() / mkdir would give."""
    from spikellm.io import atomic_torch_save

    old = os.umask(umask)
    try:
        json_path = atomic_write_json(tmp_path / "results.json", {"a": 1})
        atomic_torch_save({"a": 1}, tmp_path / "last.ckpt")
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert json_path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask


def test_spike_objective_errors_name_their_key_once(tmp_path):
    """They named task.task.spike_loss.* (the task group's prefix applied twice)."""
    done = run_script("train.py", "task.spike_loss.weight=-1", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]  # after the data's log lines
    assert line.startswith("error: task.spike_loss.weight=-1 is invalid"), line


def test_the_qat_stage_spike_objective_names_its_key_once():
    with pytest.raises(ConfigError, match=r"^convert\.stages\.qat\.spike_loss\.weight=-1 is invalid"):
        build({"_target_": "spikellm.posttrain.stages.DistillationQAT", "spike_loss": {"weight": -1}},
              "convert.stages.qat")


@pytest.mark.parametrize("script,output", [("eval.py", "results.json"), ("generate.py", "generations.jsonl")])
def test_a_run_directory_holding_an_earlier_run_is_refused_before_hydra_writes_in_it(tmp_path, script, output):
    """A refused eval.py still rewrote the earlier run's .hydra/config.yaml (Hydra writes it before
    the job starts): the command line check refuses such a directory first."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / output).write_text("{}")
    (run / ".hydra" / "config.yaml").write_text("earlier: true\n")
    extra = ["prompt=x"] if script == "generate.py" else []
    done = run_script(script, "ckpt=x.ckpt", *extra, f"hydra.run.dir={run}", timeout=60)
    line = one_error_line(done)
    assert f"hydra.run.dir={run} already holds an earlier run ({output})" in line, line
    assert (run / ".hydra" / "config.yaml").read_text() == "earlier: true\n"
