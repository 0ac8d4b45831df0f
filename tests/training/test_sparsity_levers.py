"""Zeros as a training target: the dead zone on the threshold rule, and a target on the fraction
of non-zero inputs in the spike objective, whose gradient lowers that fraction."""
import math

import pytest
import torch

from spikellm.errors import ConfigError
from spikellm.neurons import TernaryEncoder
from spikellm.neurons.dispatch import fused_reason
from spikellm.nn.spiking_linear import SpikingLinear
from spikellm.training.spike_loss import SpikeObjective


def nonzero_fraction(encoder, x) -> float:
    with torch.no_grad():
        counts, _ = encoder.encode(x)
    return float((counts != 0).float().mean())


@pytest.mark.parametrize("dead_zone", [1.0, 1.5, 2.5])
def test_a_dead_zone_zeroes_small_inputs_in_both_forms(dead_zone):
    torch.manual_seed(0)
    x = torch.randn(6, 48) * torch.rand(6, 1) * 3
    plain = TernaryEncoder(bits=5, threshold="mean")
    zoned = TernaryEncoder(bits=5, threshold="mean", dead_zone=dead_zone)
    counts, step = zoned.encode(x)
    plain_counts, plain_step = plain.encode(x)
    assert torch.equal(step, plain_step)  # the step is the rule's, the zone only clears inputs
    inside = x.abs() < dead_zone * step
    assert torch.all(counts[inside] == 0) and torch.equal(counts[~inside], plain_counts[~inside])
    train, train_step = zoned.spike_train(x)
    assert torch.equal(zoned.decode(train), counts) and torch.equal(train_step, step)  # collapsed = temporal
    assert nonzero_fraction(zoned, x) < nonzero_fraction(plain, x)
    assert f"dead_zone={dead_zone}" in zoned.extra_repr() and "dead_zone" not in plain.extra_repr()
    assert fused_reason(zoned) == "a dead zone" and fused_reason(plain) is None


def test_a_per_token_top_k_keeps_the_largest_inputs_in_both_forms():
    torch.manual_seed(0)
    x = torch.randn(5, 40)
    encoder = TernaryEncoder(bits=5, threshold="mean", keep_top=0.25)
    counts, step = encoder.encode(x)
    kept = x.abs() >= x.abs().topk(10, dim=-1).values[..., -1:]
    assert torch.all(counts[~kept] == 0) and torch.equal(counts[kept], TernaryEncoder(bits=5, threshold="mean").encode(x)[0][kept])
    assert ((counts != 0).sum(-1) <= 10).all()
    train, _ = encoder.spike_train(x)
    assert torch.equal(encoder.decode(train), counts)
    assert "keep_top=0.25" in encoder.extra_repr() and fused_reason(encoder) == "a per-token top-k"


def test_a_dead_zone_of_a_half_is_plain_rounding():
    x = torch.randn(4, 32)
    assert torch.equal(TernaryEncoder(dead_zone=0.5).encode(x)[0], TernaryEncoder().encode(x)[0])
    with pytest.raises(ConfigError, match="dead_zone=-1 is invalid"):
        TernaryEncoder(dead_zone=-1)


def test_the_nonzero_target_lowers_the_nonzero_fraction_on_a_toy_problem():
    """A spiking layer fitted to a linear target: with the non-zero term (its target below what the
    layer fires) the learnable threshold and the input gain move so that fewer inputs are non-zero,
    while the fit stays usable."""
    torch.manual_seed(0)
    x = torch.randn(128, 32)
    target = x @ torch.randn(32, 8) / 6

    def train(objective):
        torch.manual_seed(1)
        layer = SpikingLinear(32, 8, encoder=TernaryEncoder(bits=5, learnable_step=True))
        scale = torch.nn.Parameter(torch.ones(32))
        objective.attach(layer)
        optimizer = torch.optim.Adam([*layer.parameters(), scale], lr=2e-2)
        fractions = []
        for _ in range(100):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(layer(x * scale), target)
            collected = objective.collect(layer)
            if collected is not None:
                loss = loss + collected[0]
                if collected[2] is not None:
                    fractions.append(float(collected[2]))
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            return nonzero_fraction(layer.encoder, x * scale), float(torch.nn.functional.mse_loss(layer(x * scale), target)), fractions

    plain, plain_fit, _ = train(SpikeObjective())
    sparse, fit, fractions = train(SpikeObjective(nonzero_weight=1.0, nonzero_target=0.2))
    assert sparse < 0.7 * plain, (plain, sparse)
    assert fractions and fractions[-1] < fractions[0]  # what training logs as train/nonzero_fraction
    assert math.isfinite(fit) and fit < 0.25 * float(target.var()), (plain_fit, fit)  # still fits the target


def test_the_nonzero_term_is_the_exact_count():
    encoder = TernaryEncoder(bits=5, threshold="mean", dead_zone=1.0)
    objective = SpikeObjective(nonzero_weight=1.0)
    objective.attach(encoder)
    x = torch.randn(8, 64, requires_grad=True)
    encoder(x)
    penalty, _, fraction = objective.collect(encoder)
    assert float(fraction) == pytest.approx(nonzero_fraction(encoder, x.detach()))
    assert float(penalty.detach()) == pytest.approx(float(fraction))
    penalty.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_spike_loss_options_are_checked():
    with pytest.raises(ConfigError, match=r"spike_loss.nonzero_target=1.5 is invalid"):
        SpikeObjective.from_config({"nonzero_weight": 1.0, "nonzero_target": 1.5})
    with pytest.raises(ConfigError, match="unknown option; the spike loss takes weight, target, per_layer, "
                                          "nonzero_weight, nonzero_target"):
        SpikeObjective.from_config({"nonzero": 1})


def test_train_py_distils_from_a_dense_teacher(tmp_path):
    """``task.distill.teacher``: a dense run's checkpoint teaches a spiking run from scratch; the KL
    term is logged and the loss stays finite; a teacher of another vocabulary is one line."""
    from conftest import compose

    from spikellm.training.pipeline import run_training

    common = ["experiment=smoke", "trainer.max_steps=3", "+trainer.enable_progress_bar=false"]
    teacher = run_training(compose([*common, "neuron=none"], tmp_path / "teacher")).checkpoint
    student = run_training(compose([*common, f"task.distill.teacher={teacher}", "task.distill.temperature=2.0"],
                                   tmp_path / "student"))
    assert math.isfinite(student.val_ppl)
    metrics = (student.log_dirs[0] / "metrics.csv").read_text()
    assert "train/kl" in metrics.splitlines()[0]
    with pytest.raises(ConfigError, match=r"task.distill.teacher=.* has a 512-token vocabulary and the model 640"):
        run_training(compose([*common, f"task.distill.teacher={teacher}", "data.vocab_size=640"], tmp_path / "other"))
