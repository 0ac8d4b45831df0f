"""Resuming a killed run: SIGKILL mid-epoch, then `ckpt_path=last` in the same run
directory continues it bit for bit (losses, validation, weights, data order); checkpoint saves are
atomic; every unusable checkpoint is one line."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, compose, run_script

from spikellm.errors import ConfigError, DataError

# A micro model, 12 steps of a ~800-batch epoch (so every kill is mid-epoch): last.ckpt every 2
# steps (on steps 4 and 8, after their validation), every step logged.
STEPS = 12
TRAIN = ["experiment=smoke", "callbacks=default", "~callbacks.rich_progress_bar", "~callbacks.energy_report",
         "~callbacks.spike_statistics", "callbacks.last_checkpoint.every_n_train_steps=2",
         f"trainer.max_steps={STEPS}", "trainer.val_check_interval=4", "+trainer.enable_progress_bar=false"]


def _logs(run):
    """Per attempt (csv/metrics.csv, then csv/attempt-2/metrics.csv ...): {metric: {step: value as written}}."""
    files = sorted((run / "csv").rglob("metrics.csv"), key=lambda p: (len(p.parts), p.parent.name))
    attempts = []
    for path in files:
        series = {}
        with open(path) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if value and key not in ("step", "epoch", "train/tok_s"):  # tok/s: wall time
                        series.setdefault(key, {})[int(row["step"])] = value
        attempts.append(series)
    return attempts


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _train_until_killed(run, *extra, after_step: int) -> int:
    """Start train.py in ``run``, SIGKILL it once its last.ckpt is past ``after_step``; the checkpoint's step."""
    last, log = run / "checkpoints" / "last.ckpt", run.with_name(f"{run.name}-{after_step}.log")
    with open(log, "w") as stderr:  # a file, not a pipe: a full pipe would stall the run
        process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TRAIN, f"hydra.run.dir={run}", *extra],
                                   cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline, seen = time.monotonic() + 120, None
            while time.monotonic() < deadline and process.poll() is None:
                stat = last.stat() if last.is_file() else None  # each save renames a new file in
                if stat is not None and (stat.st_ino, stat.st_mtime_ns) != seen:
                    seen = stat.st_ino, stat.st_mtime_ns
                    if _load(last)["global_step"] > after_step:  # atomic saves: a file that exists is whole
                        os.kill(process.pid, signal.SIGKILL)
                        break
                time.sleep(0.02)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == -signal.SIGKILL, f"not killed mid-run: {log.read_text()[-3000:]}"
    state = _load(last)
    position = state["TextDataModule"]["train_position"]
    assert after_step < state["global_step"] < STEPS and position["batches_done"] < position["epoch_batches"] // 10
    return state["global_step"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run; the same run killed mid-epoch twice, resumed each time with ckpt_path=last."""
    base = tmp_path_factory.mktemp("resume")
    whole, killed = base / "whole", base / "killed"
    done = run_script("train.py", *TRAIN, f"hydra.run.dir={whole}")
    assert done.returncode == 0, done.stderr[-3000:]
    # killed right after the step-4 checkpoint (written after step 4's validation) or a later one
    first = _train_until_killed(killed, after_step=2)
    # resumed, and killed again after its first checkpoint (one from a train batch's end if first=4)
    second = _train_until_killed(killed, "ckpt_path=last", after_step=first)
    done = run_script("train.py", *TRAIN, f"hydra.run.dir={killed}", "ckpt_path=last")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from a checkpoint that ended before the epoch" not in done.stderr  # Lightning's false alarm
    return whole, killed, (0, first, second)


def test_killed_run_resumes_bit_for_bit(runs):
    whole, killed, starts = runs
    (reference,) = _logs(whole)
    attempts = _logs(killed)  # csv/metrics.csv is kept; the resumed attempts log to csv/attempt-2/, attempt-3/
    assert len(attempts) == 3 and {"train/loss", "val/loss", "val/ppl", "lr-AdamW/pg1"} <= set(reference)
    # every row any attempt wrote equals the uninterrupted run's (the CSV holds every digit of a float32):
    # losses, learning rates, validation; rows past the checkpoint are written again, equal
    for attempt in attempts:
        for key, series in attempt.items():
            assert series == {s: v for s, v in reference[key].items() if s in series}, key
    # each resumed attempt starts at its checkpoint's step, the last one runs to the end
    for attempt, start in zip(attempts[1:], starts[1:]):
        assert min(attempt["train/loss"]) == start
    assert set(attempts[-1]["train/loss"]) == set(range(starts[-1], STEPS))
    # together they log everything, but the train row of a checkpoint's own step when the kill came
    # between the checkpoint's save and that row (Lightning logs a step after its callbacks)
    for key, series in reference.items():
        logged = set().union(*(a.get(key, {}) for a in attempts))
        missing = set(series) - logged
        assert not missing or (key == "train/loss" and missing <= {s - 1 for s in starts[1:]}), (key, missing)
    assert len(reference["val/loss"]) == 4  # steps 4, 8, 12 and the final validation

    a, b = (_load(run / "checkpoints" / "last.ckpt") for run in (whole, killed))
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    for x, y in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a["TextDataModule"]["train_position"] == b["TextDataModule"]["train_position"]
    assert not list((killed / "checkpoints").glob(".*"))  # no temporary file left behind


def test_resumes_keep_the_interrupted_runs_config(runs):
    """Hydra's record of the first attempt stays as it was; each resume writes its own beside it."""
    _, killed, _ = runs
    first = (killed / ".hydra" / "overrides.yaml").read_text()
    assert "ckpt_path" not in first
    resumed = sorted((killed / ".hydra").glob("resumed-*/overrides.yaml"))
    assert resumed and all("ckpt_path=last" in path.read_text() for path in resumed)


def test_data_order_is_a_function_of_seed_and_epoch():
    from spikellm.data.datamodule import EpochShuffle

    sampler = EpochShuffle(40, batch_size=4, seed=3)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    assert all(sorted(e) == list(range(40)) for e in epochs) and epochs[0] != epochs[1] != epochs[2]
    again = EpochShuffle(40, batch_size=4, seed=3)
    again.set_epoch(2)
    assert list(again) == epochs[2]  # no history: epoch 2 alone gives epoch 2's order
    # epoch 0 is the order the loader always had: randperm under the seed
    assert epochs[0] == torch.randperm(40, generator=torch.Generator().manual_seed(3)).tolist()
    # resumed at batch 3 of epoch 1, numbered 2 by Lightning (an epoch cut short by max_steps)
    resumed = EpochShuffle(40, batch_size=4, seed=3)
    resumed.resume(1, 3)
    resumed.set_epoch(2)
    assert len(resumed) == 40 and list(resumed) == epochs[1][12:]
    resumed.set_epoch(3)
    assert list(resumed) == epochs[2]


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from spikellm import io as atomic
    from spikellm.checkpoints.lightning import AtomicCheckpointIO

    io_plugin, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io_plugin.save_checkpoint({"step": 1, "w": torch.arange(1000)}, path)
    before = path.read_bytes()

    def half_then_die(obj, f):
        f.write(before[: len(before) // 2])  # half a checkpoint on disk, then the "kill"
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.torch, "save", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        io_plugin.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    assert path.read_bytes() == before and os.listdir(path.parent) == ["last.ckpt"]

    # a SIGKILL leaves its temporary file behind: the next save removes it
    stale = path.parent / ".last.ckpt.abc123.999999999.tmp"  # no such pid
    stale.write_bytes(b"half")
    monkeypatch.undo()
    io_plugin.save_checkpoint({"step": 3, "w": torch.ones(1000)}, path)
    assert os.listdir(path.parent) == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["step"] == 3


def test_ckpt_path_last_without_a_checkpoint_is_one_line(tmp_path):
    done = run_script("train.py", "experiment=smoke", f"hydra.run.dir={tmp_path}", "ckpt_path=last")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: ckpt_path='last' is invalid") and "hydra.run.dir=" in line, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def _check(runs, tmp_path, *overrides, ckpt=None):
    """run_training resuming the uninterrupted run's checkpoint (or ``ckpt``) with overrides, in a new
    directory; the one-line error it raises."""
    from spikellm.training.pipeline import run_training

    whole = runs[0]
    cfg = compose([*TRAIN, f"ckpt_path={ckpt or whole / 'checkpoints' / 'last.ckpt'}", *overrides],
                  tmp_path / "run")
    with pytest.raises((ConfigError, DataError)) as raised:
        run_training(cfg)
    message = str(raised.value)
    assert "\n" not in message and not (tmp_path / "run" / "checkpoints").exists()
    return message


def test_truncated_checkpoint_is_one_line(runs, tmp_path):
    truncated = tmp_path / "last.ckpt"
    data = (runs[0] / "checkpoints" / "last.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    message = _check(runs, tmp_path, ckpt=truncated)
    assert "not a readable checkpoint" in message and "truncated" in message


def test_checkpoint_of_another_architecture_names_the_keys(runs, tmp_path):
    message = _check(runs, tmp_path, "model.n_layers=3", "model.dim=96")
    assert "model.n_layers is 2 there, 3 here" in message and "model.dim is 64 there, 96 here" in message


def test_checkpoint_of_another_tokenizer_is_one_line(runs, tmp_path):
    message = _check(runs, tmp_path / "a", "data.val_fraction=0.1")  # other training documents: another BPE
    assert "trained with another tokenizer" in message and "data.vocab_size" in message
    message = _check(runs, tmp_path / "b", "data.vocab_size=600")  # the model's embedding follows it
    assert "model.vocab_size is 512 there, 600 here" in message and "another tokenizer" in message


def test_a_fresh_run_never_overwrites_a_run(runs, tmp_path):
    from spikellm.training.pipeline import run_training

    cfg = compose(TRAIN, runs[1])
    before = (runs[1] / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ConfigError, match="ckpt_path=last"):
        run_training(cfg)
    assert (runs[1] / "checkpoints" / "last.ckpt").read_bytes() == before


def test_spike_statistics_sample_whole_steps_so_a_resume_carries_nothing():
    """Training statistics are sampled over one step every ``every_n_steps`` steps: tracking starts
    at the sampled step's batch start and ends at its batch end, so no window is ever open across
    a checkpoint, and after a resume the first sampled row counts what an uninterrupted run's would."""
    from types import SimpleNamespace

    from spikellm.config import build_neuron
    from spikellm.models import LlamaConfig
    from spikellm.neurons.stats import spike_report, track_spikes
    from spikellm.training.callbacks import SpikeStatistics

    encoder, _ = build_neuron({"encoder": {"_target_": "spikellm.neurons.TernaryEncoder", "_partial_": True}})
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    def model():
        torch.manual_seed(0)
        return LlamaConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=8).build(encoder)

    callback, logged = SpikeStatistics(every_n_steps=2), []
    callback._log = lambda module, prefix: logged.append(spike_report(module))
    first = model()
    track_spikes(first)  # whatever was on before (a validation), training starts with tracking off
    callback.on_train_start(None, first)
    assert not spike_report(first)
    for step in range(4):  # global_step before the update is `step`
        callback.on_train_batch_start(SimpleNamespace(global_step=step), first, None, step)
        with torch.no_grad():
            first(ids)
        tracked = bool(spike_report(first))
        callback.on_train_batch_end(SimpleNamespace(global_step=step + 1), first, None, None, step)
        assert tracked == ((step + 1) % 2 == 0) and not spike_report(first)
    assert len(logged) == 2 and logged[0] == logged[1]  # one step each, the same batch
    # one forward of 2 × 8 tokens: 16 activations per input channel of each projection
    assert all(r["activations"] == ids.numel() * (32 if "down_proj" in name else 16)
               for name, r in logged[0].items())


def test_a_start_removes_the_halves_of_killed_saves(tmp_path):
    """A ``.last.ckpt.*.tmp`` left by a kill during a save (its writer gone) is removed when
    a run starts in that directory, not left there forever; a live writer's is kept."""
    from spikellm.training.pipeline import run_training

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = checkpoints / f".last.ckpt.abc123.{dead.pid}.tmp"
    live = checkpoints / f".last.ckpt.def456.{os.getpid()}.tmp"
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    cfg = compose(["experiment=smoke", "trainer.max_steps=1", "trainer.val_check_interval=1"], tmp_path / "run")
    with pytest.raises(Exception):  # noqa: B017 - whatever the run does next, the start already cleaned up
        _fail_after_start(cfg, run_training)
    assert not stale.exists() and live.exists()


def _fail_after_start(cfg, run_training):
    from unittest import mock

    with mock.patch("spikellm.training.pipeline._refuse_spawn", side_effect=RuntimeError("stop here")):
        run_training(cfg)


def test_a_second_run_into_the_same_directory_is_one_line(tmp_path):
    """A run holds an exclusive lock on its directory; a second process started into it
    (while the first runs) is refused in one line before it writes anything."""
    from spikellm.training.pipeline import run_training

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"lock = FileLock({str(run / '.run.lock')!r}); lock.acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = compose(["experiment=smoke", "trainer.max_steps=1"], run)
        with pytest.raises(ConfigError, match="another run is writing into this directory now"):
            run_training(cfg)
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
