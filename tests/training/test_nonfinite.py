"""A diverging run stops at the step that diverged, names the layer, and keeps the last good checkpoint."""
import hashlib
import json
import math
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_script
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from spikellm.errors import SpikeLLMError
from spikellm.neurons import TernaryEncoder
from spikellm.neurons.stats import spike_report, track_spikes
from spikellm.training.nonfinite import StopOnNonFinite, TrainingDiverged


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _BadBackward(nn.Module):
    """The identity whose backward returns NaN once armed: a finite forward with non-finite gradients."""

    armed = False

    def forward(self, x):
        return _NanGradient.apply(x) if self.armed else x


class Tiny(pl.LightningModule):
    """A small MLP regression; ``poison(module, batch_idx)`` runs before each step's forward."""

    def __init__(self, poison=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), _BadBackward(), nn.ReLU(),
                                 nn.Linear(16, 1))
        self.poison = poison
        self.extra_loss = 0.0

    def training_step(self, batch, batch_idx):
        if self.poison is not None:
            self.poison(self, batch_idx)
        x, y = batch
        return F.mse_loss(self.net(x), y) + self.extra_loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        inputs, targets = torch.randn(64, 8, generator=generator), torch.randn(64, 1, generator=generator)
        return DataLoader(TensorDataset(inputs, targets), batch_size=8)


def _fit(module, callbacks=(), **trainer_args):
    torch.manual_seed(0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                         **trainer_args)
    trainer.fit(module)
    return trainer


def _diverge(poison, **trainer_args) -> TrainingDiverged:
    with pytest.raises(TrainingDiverged) as raised:
        _fit(Tiny(poison), [StopOnNonFinite()], **trainer_args)
    error = raised.value
    assert isinstance(error, SpikeLLMError) and "\n" not in str(error)
    return error


def test_an_infinite_weight_is_named_with_its_step():
    def poison(module, batch_idx):
        if module.trainer.global_step == 2:
            with torch.no_grad():
                module.net[2].weight[0, 0] = math.inf

    error = _diverge(poison)
    assert error.step == 2 and error.layer == "net.2"
    assert str(error).startswith("training diverged at step 2: ")
    # inf · 0 (a ReLU-silenced input) is NaN: the output has both
    assert "non-finite loss (nan); first non-finite output (nan) in net.2 (its weight has inf)" in str(error)
    assert "the last good checkpoint is none written yet" in str(error)


def test_a_non_finite_gradient_is_traced_to_the_module_whose_backward_made_it():
    def poison(module, batch_idx):
        module.net[3].armed = module.trainer.global_step == 3

    error = _diverge(poison)
    assert error.step == 3 and error.layer == "net.3"
    assert "non-finite gradients; backward first went non-finite (nan) in net.3 (from a finite output gradient" \
        in str(error)


def test_a_non_finite_loss_with_finite_outputs_blames_the_loss():
    def poison(module, batch_idx):
        module.extra_loss = math.inf if module.trainer.global_step == 1 else 0.0

    error = _diverge(poison)
    assert error.step == 1 and error.layer is None
    assert "non-finite loss (inf); every module output was finite; the loss computation itself" in str(error)


def test_a_non_finite_loss_is_caught_while_accumulating_gradients():
    def poison(module, batch_idx):
        module.extra_loss = math.nan if batch_idx == 2 else 0.0  # the first half of the second step

    error = _diverge(poison, accumulate_grad_batches=2)
    assert error.step == 1 and "non-finite loss (nan)" in str(error)


def test_a_healthy_run_is_unchanged_and_left_without_hooks():
    plain, guarded = Tiny(), Tiny()
    guarded.load_state_dict(plain.state_dict())
    _fit(plain)
    _fit(guarded, [StopOnNonFinite()])
    for a, b in zip(plain.parameters(), guarded.parameters()):
        assert torch.equal(a, b)
    assert not any(m._forward_hooks or m._backward_hooks for m in guarded.modules())


def test_spike_statistics_count_non_finite_inputs_instead_of_crashing():
    encoder = TernaryEncoder(bits=3)
    track_spikes(encoder)
    x = torch.randn(2, 5, 16)
    x[0, 1, 3] = math.inf  # that token's step is inf: its other counts are 0, the inf one NaN
    x[1, 2] = math.nan  # a NaN token: every count NaN
    encoder(x)
    stats = spike_report(encoder)[""]
    assert stats["nonfinite"] == 1 + 16
    assert sum(stats["histogram"].values()) + stats["nonfinite"] == stats["activations"] == x.numel()
    assert math.isfinite(stats["spikes"]) and math.isfinite(stats["silent_fraction"])


class SnapshotCheckpoints(pl.Callback):
    """Run inside train.py by the end-to-end test: at the start of every training batch, the
    sha256 of each file under ``directory``, written to ``output``."""

    def __init__(self, directory: str, output: str):
        self.directory, self.output = Path(directory), Path(output)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        files = sorted(p for p in self.directory.glob("*") if p.is_file()) if self.directory.is_dir() else []
        self.output.write_text(json.dumps({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}))


def test_train_py_stops_on_divergence_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    checkpoints, snapshot = run / "checkpoints", tmp_path / "snapshot.json"
    # this test module (and the conftest it imports) on the path, so train.py can build its callback
    paths = [str(Path(__file__).parent), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, paths)))
    done = run_script(
        "train.py", "experiment=smoke", "task.lr=1e30", "callbacks=default", "trainer.max_steps=6",
        "trainer.val_check_interval=1", "trainer.limit_val_batches=1",  # a checkpoint after the first step
        "++callbacks.model_checkpoint.save_on_exception=true",  # even so, nothing is saved after the error
        "++callbacks.non_finite._target_=spikellm.training.nonfinite.StopOnNonFinite",
        "+callbacks.snapshot._target_=test_nonfinite.SnapshotCheckpoints",
        f"+callbacks.snapshot.directory={checkpoints}", f"+callbacks.snapshot.output={snapshot}",
        f"hydra.run.dir={run}")
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and done.stderr.rstrip().endswith(errors[0]), done.stderr[-3000:]
    # lr 1e30: the first update leaves huge but finite weights, whose backward overflows in the final norm
    assert errors[0].startswith("error: training diverged at step 1: non-finite gradients; backward first went "
                                "non-finite (nan) in norm (from a finite output gradient"), errors[0]
    assert f"the last good checkpoint is {checkpoints / 'last.ckpt'} (step 1)" in errors[0]
    assert "lower task.lr (it is 1e+30)" in errors[0]
    # the checkpoints are byte for byte those there were when the diverging step began
    before = json.loads(snapshot.read_text())
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in checkpoints.iterdir()}
    assert after == before and set(before) == {"step000001.ckpt", "last.ckpt"}
    state = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 1
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())
    assert not (run / "spiking_checkpoint").exists()  # the pipeline's final saves did not run
