"""``task.compile`` and ``task.activation_checkpointing``: every neuron group compiles without a
graph break (statistics' histogram is the one named break), compiled training follows eager
training, recomputed blocks give the same loss and gradients, and a compiled run resumes."""
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo
import yaml
from conftest import ROOT, compose

from spikellm.config import build_model
from spikellm.models.execution import checkpoint_blocks, compile_blocks
from spikellm.neurons.stats import spike_report, track_spikes
from spikellm.training.spike_loss import SpikeObjective

MICRO = {"_target_": "spikellm.models.LlamaConfig", "vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4,
         "n_kv_heads": 2, "ffn_dim": 64, "max_seq_len": 32}
MATMULFREE = {"_target_": "spikellm.models.MatMulFreeConfig", "vocab_size": 64, "dim": 32, "n_layers": 2,
              "ffn_dim": 64, "max_seq_len": 32}
GROUPS = sorted(path.stem for path in (ROOT / "conf" / "neuron").glob("*.yaml"))


def neuron(group: str) -> dict:
    return yaml.safe_load((ROOT / "conf" / "neuron" / f"{group}.yaml").read_text())


def block_breaks(model, *block_args) -> list[str]:
    """The graph breaks of one block's training forward, as ``reason | where``."""
    dynamo.reset()
    explained = dynamo.explain(model.layers[0])(*block_args)
    return [f"{str(r.reason).splitlines()[0]} | {r.user_stack[-1].filename if r.user_stack else ''}"
            for r in explained.break_reasons]


def llama_block_inputs(model, tokens: int = 16):
    x = torch.randn(2, tokens, model.config.dim, requires_grad=True)
    return x, model.rope_cos[:tokens], model.rope_sin[:tokens]


@pytest.mark.parametrize("group", GROUPS)
def test_every_neuron_group_trains_compiled_without_a_graph_break(group):
    """The encoders, the spike objective's terms and spiking attention, as a training step runs them."""
    model = build_model(MICRO, neuron(group))
    SpikeObjective(weight=0.1).attach(model)
    assert block_breaks(model, *llama_block_inputs(model)) == []


def test_the_matmul_free_lm_trains_compiled_without_a_graph_break():
    model = build_model(MATMULFREE, neuron("ternary"))
    SpikeObjective(weight=0.1).attach(model)
    assert block_breaks(model, torch.randn(2, 16, 32, requires_grad=True)) == []


def test_the_one_named_break_is_the_statistics_histogram():
    """Validation statistics (``track_spikes``) count a histogram by ``bincount``, whose output
    size depends on the data: ``SpikeStats.observe`` runs eagerly (``torch.compiler.disable``), the
    only break, where an encoder hands it a forward; and gradients stay on after it."""
    model = build_model(MICRO, neuron("ternary"))
    track_spikes(model)
    breaks = block_breaks(model, *llama_block_inputs(model))
    assert breaks and all("torch.compiler.disable" in b and b.endswith("observers.py") for b in breaks), breaks
    assert torch.is_grad_enabled()


def _train(model, steps: int, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    objective = SpikeObjective(weight=0.05)
    objective.attach(model)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 17))
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + objective.collect(model)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_compiled_training_follows_eager_training():
    """20 AdamW steps with a spike objective, compiled by dynamo + AOT autograd (the inductor's
    code generation is the slow-marked run below): the same losses to 1e-5."""
    torch.manual_seed(0)
    eager = build_model(MICRO, neuron("ternary"))
    compiled = build_model(MICRO, neuron("ternary"))
    compiled.load_state_dict(eager.state_dict())
    dynamo.reset()
    assert compile_blocks(compiled, backend="aot_eager") == 2
    torch.testing.assert_close(_train(compiled, 20), _train(eager, 20), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_training_follows_eager_training():
    """The default backend (inductor, C++ on a CPU): fused kernels round differently in the last
    bit, and a count at a rounding tie can flip, so the losses agree to 1e-3 over 20 steps."""
    torch.manual_seed(0)
    eager = build_model(MICRO, neuron("ternary"))
    compiled = build_model(MICRO, neuron("ternary"))
    compiled.load_state_dict(eager.state_dict())
    dynamo.reset()
    compile_blocks(compiled)
    torch.testing.assert_close(_train(compiled, 20), _train(eager, 20), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("group", ["ternary", "gif", "ternary_attention"])
def test_recomputed_blocks_give_the_same_loss_gradients_and_statistics(group):
    torch.manual_seed(0)
    kept = build_model(MICRO, neuron(group))
    recomputed = build_model(MICRO, neuron(group))
    recomputed.load_state_dict(kept.state_dict())
    assert checkpoint_blocks(recomputed) == 2
    ids = torch.randint(0, 64, (4, 16))
    results = []
    for model in (kept, recomputed):
        objective = SpikeObjective(weight=0.1)
        objective.attach(model)
        track_spikes(model)
        loss = model(ids).logsumexp(-1).mean() + objective.collect(model)[0]
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}, spike_report(model)))
    (loss_a, grads_a, stats_a), (loss_b, grads_b, stats_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(grads_b, grads_a, rtol=1e-5, atol=1e-6)
    assert stats_b == stats_a  # each forward observed once, not again when recomputed
    assert list(recomputed.state_dict()) == list(kept.state_dict())  # the checkpoint keys stay


def test_activation_checkpointing_and_accumulation_run_in_train_py(tmp_path):
    from spikellm.training.pipeline import run_training

    cfg = compose(["experiment=smoke", "trainer.max_steps=3", "task.activation_checkpointing=true",
                   "trainer.accumulate_grad_batches=2", "+trainer.enable_progress_bar=false"], tmp_path)
    result = run_training(cfg)
    assert result.steps == 3 and result.val_ppl > 0 and result.step_seconds is not None
    assert result.tokens_seen == 3 * 2 * 4 * 64  # optimizer steps x accumulated batches x batch x block


@pytest.mark.slow
def test_a_compiled_run_resumes_and_reports_its_compile_time(tmp_path):
    """A compiled run's checkpoint has the eager names (blocks compile in place), so it resumes,
    compiled or not; the summary gives the first step's time, which includes compiling."""
    import json

    from spikellm.training.pipeline import run_training

    common = ["experiment=smoke", "callbacks=default", "~callbacks.rich_progress_bar", "~callbacks.energy_report",
              "~callbacks.spike_statistics", "callbacks.last_checkpoint.every_n_train_steps=2",
              "+trainer.enable_progress_bar=false", "task.compile=true"]
    first = run_training(compose([*common, "trainer.max_steps=4"], tmp_path / "a"))
    assert first.compiled and first.first_step_seconds > first.step_seconds
    summary = json.loads((Path(first.output_dir) / "summary.json").read_text())
    assert summary["compiled"] and summary["first_step_seconds"] > 0
    dynamo.reset()
    resumed = run_training(compose([*common, "trainer.max_steps=6", f"ckpt_path={first.checkpoint}"], tmp_path / "b"))
    assert resumed.steps == 6 and resumed.compiled


def _evaluate(tmp_path, name: str, *overrides: str) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from spikellm.evaluation.pipeline import run_evaluation

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("eval", overrides=[f"ckpt={ROOT / 'tests' / 'fixtures' / 'formats' / 'spiking'}",
                                               f"perplexity.datasets=[{corpus}]", "perplexity.seqlen=32",
                                               f"paths.output_dir={tmp_path / name}", *overrides])
    return run_evaluation(cfg)[0]


def test_compiled_evaluation_gives_the_same_perplexity_and_energy(tmp_path, monkeypatch):
    """eval.py compile=true: the same perplexity (to 1e-5) and the same operation counts (the
    energy counter's hooks and tallies work on compiled blocks). Dynamo + AOT autograd here."""
    import functools

    from spikellm.models import execution

    eager = _evaluate(tmp_path, "eager")
    dynamo.reset()
    monkeypatch.setattr(execution, "compile_blocks", functools.partial(execution.compile_blocks, backend="aot_eager"))
    compiled = _evaluate(tmp_path, "compiled", "compile=true")
    (corpus,) = eager["perplexity"]
    assert compiled["perplexity"][corpus]["ppl"] == pytest.approx(eager["perplexity"][corpus]["ppl"],
                                                                 rel=1e-5)
    assert compiled["energy"]["layers"] == eager["energy"]["layers"]
