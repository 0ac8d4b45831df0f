"""The main job end to end: loss falls, a checkpoint is written, and resuming continues it."""
import csv

import torch
import pytest
from conftest import CONF, run_script

from spikellm.training import CausalLMTask
from spikellm.training.pipeline import run_training


def test_short_run_learns(config_factory):
    cfg = config_factory("experiment=smoke", "trainer.max_steps=30", "trainer.val_check_interval=30",
                         "validate_at_start=true", "logger=none", "callbacks=default")
    result = run_training(cfg)
    assert result.steps == 30
    assert result.val_ppl < 0.6 * result.initial_val_ppl
    assert result.checkpoint.is_file()
    # the statistics callback saw every activation of the final validation, from counts alone
    assert 0 < result.firing_rate < 1 and result.spikes_per_activation > 0
    # and the energy report of the final validation, written beside the checkpoints
    assert result.energy.tokens > 0 and 0 < result.energy.ratio_to_dense < 1.5
    assert {"json", "figure"} <= set(result.energy_files)


@pytest.mark.parametrize("neuron", sorted(p.stem for p in (CONF / "neuron").glob("*.yaml")))
def test_every_neuron_learns(config_factory, neuron):
    cfg = config_factory("experiment=smoke", f"neuron={neuron}", "trainer.max_steps=20",
                         "trainer.val_check_interval=20", "validate_at_start=true", "logger=none")
    result = run_training(cfg)
    assert result.val_ppl < 0.7 * result.initial_val_ppl, neuron


def test_train_py_writes_a_checkpoint_that_resumes(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    done = run_script("train.py", "experiment=smoke", "trainer.max_steps=3", f"hydra.run.dir={first}")
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = first / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    printed = "".join(done.stdout.replace("│", "").split())  # the summary table wraps long paths
    assert "valppl" in printed and "".join(str(checkpoint).split()) in printed

    done = run_script("train.py", "experiment=smoke", "trainer.max_steps=6", f"ckpt_path={checkpoint}",
                      f"hydra.run.dir={second}")
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    with open(second / "csv" / "metrics.csv") as f:
        logged_steps = {int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")}
    assert logged_steps and min(logged_steps) >= 3  # continued, did not start over

    task = CausalLMTask.load_from_checkpoint(second / "checkpoints" / "last.ckpt", map_location="cpu")
    assert task.hparams.neuron["name"] == "ternary"
    assert len(task.model.spiking_linears()) == 2 * 7
