"""trainer=ddp and trainer=fsdp: two processes train as one process does on the same global batch."""
import csv
import random

import pytest
import torch
from conftest import compose, run_script

from spikellm.config import build

# train.py's overrides shared by every run below: the smoke model, the non-finite guard on (its
# per-step all-gather runs under DDP too), validation after every step
COMMON = ["experiment=smoke", "trainer.max_steps=3", "trainer.val_check_interval=1",
          "++callbacks.non_finite._target_=spikellm.training.nonfinite.StopOnNonFinite"]
TWO_PROCESSES = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"]


def test_ddp_and_fsdp_configs_build_their_strategies(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from spikellm.models import llama, matmulfree

    ddp = compose(["trainer=ddp"], tmp_path).trainer
    assert (ddp.accelerator, ddp.precision, ddp.devices, ddp.num_nodes) == ("gpu", "bf16-mixed", "auto", 1)
    assert isinstance(build(ddp.strategy, "trainer.strategy"), DDPStrategy)

    fsdp = compose(["trainer=fsdp"], tmp_path).trainer
    strategy = build(fsdp.strategy, "trainer.strategy")
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {llama.Block, matmulfree.Block}
    assert strategy.kwargs["use_orig_params"]  # the optimizer and the non-finite guard see the model's parameters
    precision = strategy.mixed_precision
    assert (precision.param_dtype, precision.reduce_dtype, precision.buffer_dtype) == \
           (torch.bfloat16, torch.float32, torch.float32)


def _losses(run) -> dict[int, float]:
    with open(run / "csv" / "metrics.csv") as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


def _weights(run) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    return {k: v for k, v in state["state_dict"].items() if v.is_floating_point()}


def _compare(one, two):
    """Per-step losses to rtol 1e-5 and final weights to atol 1e-4 (see the test's docstring)."""
    losses_one, losses_two = _losses(one), _losses(two)
    assert sorted(losses_one) == sorted(losses_two) == [0, 1, 2]
    for step in losses_one:
        assert losses_two[step] == pytest.approx(losses_one[step], rel=1e-5, abs=0), step
    weights_one, weights_two = _weights(one), _weights(two)
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=0, atol=1e-4, msg=name)


def test_two_processes_train_as_one_on_the_same_global_batch(tmp_path, monkeypatch):
    """2 processes x batch B/2 (gloo, Lightning DDP) follow 1 process x batch B step by step.

    The corpus packs into exactly B training blocks, so each epoch is one global batch holding
    every block whatever order a sampler draws them in: the test isolates what DDP itself does
    (each rank's loss over its half, gradient averaging, clipping after the all-reduce, the
    logged loss being the mean over both ranks) from how the data is partitioned. The two runs
    differ only in float summation order: the losses agree to ~1e-7 relative (float32 epsilon;
    rtol 1e-5 leaves a 10x margin), the weights after 3 AdamW steps to ~3e-6. The weights' atol
    is 1e-4, a tenth of one step's largest change (lr 1e-3): any real difference (another batch,
    a missed or doubled step) moves most weights by ~lr. AdamW normalises each gradient element
    by its running RMS, so a near-zero element whose sign flips with summation order could move
    by up to 2 lr; with gradients far above AdamW's eps=1e-8, none does here.
    """
    words = "the spiking neuron fires when its membrane crosses a threshold and counts spikes over time".split()
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(40)))
    data = ["data=text", f"data.path={corpus}", "data.val_fraction=0.2"]
    datamodule = build(compose(["experiment=smoke", *data], tmp_path / "probe").data, "data")
    datamodule.setup("fit")  # tokenizes into the shared cache, which the runs below reuse
    block_size = next(b for b in range(64, 16, -1) if ((len(datamodule.train_tokens) - 1) // b) % 2 == 0)
    blocks = (len(datamodule.train_tokens) - 1) // block_size
    assert 2 <= blocks <= 16, blocks

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on two cores
    one, two = tmp_path / "one", tmp_path / "two"
    done = run_script("train.py", *COMMON, *data, f"data.block_size={block_size}", f"data.batch_size={blocks}",
                      f"hydra.run.dir={one}")
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_script("train.py", *COMMON, *data, f"data.block_size={block_size}",
                      f"data.batch_size={blocks // 2}", *TWO_PROCESSES, f"hydra.run.dir={two}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (two / "train_ddp_process_1.log").is_file()  # there were two processes
    _compare(one, two)


def test_ranks_split_each_global_batch_of_a_corpus(tmp_path, monkeypatch):
    """On a corpus of many batches, the ranks' batches at each step together are the global
    batch one process draws at that step (so 2 x B/2 trains as 1 x B, and a run resumes alike)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one, two = tmp_path / "one", tmp_path / "two"
    done = run_script("train.py", *COMMON, "data.batch_size=4", f"hydra.run.dir={one}")
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_script("train.py", *COMMON, "data.batch_size=2", *TWO_PROCESSES, f"hydra.run.dir={two}")
    assert done.returncode == 0, done.stderr[-3000:]
    _compare(one, two)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gpu_strategies_train(tmp_path, strategy):
    """trainer=ddp and trainer=fsdp as shipped (bf16, FSDP's own norm clipping, the non-finite
    guard's all-gather) on every visible GPU."""
    run = tmp_path / strategy
    done = run_script("train.py", *COMMON, f"trainer={strategy}", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    losses = _losses(run)
    assert sorted(losses) == [0, 1, 2] and all(loss == loss and loss < 10 for loss in losses.values())
    _weights(run)  # global step 3, loadable
