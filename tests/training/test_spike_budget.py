"""The spike-count objective, the threshold rules and the defects found beside them."""
import csv
import math

import pytest
import torch

from spikellm.errors import ConfigError
from spikellm.neurons import BitPlaneEncoder, GIFEncoder, IFEncoder, TernaryEncoder, dispatch
from spikellm.neurons.functional import lsq_gradient_scale
from spikellm.neurons.observers import spike_term
from spikellm.nn.spiking_linear import SpikingLinear
from spikellm.training.spike_loss import SpikeObjective
from spikellm.training.pipeline import run_training

ENCODERS = {
    "ternary": lambda **kw: TernaryEncoder(bits=5, **kw),
    "ternary_clip": lambda **kw: TernaryEncoder(bits=5, clip=3, residual="outlier", **kw),
    "if": lambda **kw: IFEncoder(bits=5, signed=True, **kw),
    "gif": lambda **kw: GIFEncoder(bits=5, levels=4, signed=True, **kw),
    "bitplane": lambda **kw: BitPlaneEncoder(bits=5, signed=True, **kw),
}


def spikes_per_activation(encoder, x):
    counts, _ = encoder.encode(x)
    return float(encoder.spikes_per_count(counts).sum() / counts.numel())


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_spike_term_is_the_exact_count_with_a_finite_gradient(name):
    encoder = ENCODERS[name](learnable_step=True)
    x = (torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_()
    objective = SpikeObjective(weight=1.0)
    objective.attach(encoder)
    encoder(x)
    penalty, rate, _ = objective.collect(encoder)
    assert rate.item() == pytest.approx(spikes_per_activation(encoder, x), rel=1e-6)
    assert penalty.item() == pytest.approx(rate.item(), rel=1e-6)  # weight 1, no target
    penalty.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.isfinite(encoder.step_scale.grad) and encoder.step_scale.grad < 0  # a larger Δ fires less
    assert objective.collect(encoder) is None  # the terms were cleared


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_spike_objective_lowers_the_spike_count_on_a_toy_problem(name):
    """A spiking layer fitted to a linear target: with the spike term its learnable threshold and its
    inputs move so that it fires markedly less, while the fit stays usable."""
    torch.manual_seed(0)
    x = torch.randn(128, 32)
    target = x @ torch.randn(32, 8) / 6

    def train(weight):
        torch.manual_seed(1)
        layer = SpikingLinear(32, 8, encoder=ENCODERS[name](learnable_step=True))
        scale = torch.nn.Parameter(torch.ones(32))  # a learnable input gain the objective can reshape
        objective = SpikeObjective(weight=weight)
        objective.attach(layer)
        optimizer = torch.optim.Adam([*layer.parameters(), scale], lr=2e-2)
        for _ in range(100):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(layer(x * scale), target)
            spike = objective.collect(layer)
            (loss if spike is None else loss + spike[0]).backward()
            optimizer.step()
        with torch.no_grad():
            return spikes_per_activation(layer.encoder, x * scale), float(loss)

    plain, plain_loss = train(0.0)
    budget, budget_loss = train(0.05)
    assert budget < 0.7 * plain, (plain, budget)
    assert math.isfinite(budget_loss) and budget_loss < 0.1 * float(target.var())  # still fits the target


def test_target_penalises_only_the_excess_and_per_layer_each_layer():
    a, b = TernaryEncoder(bits=5), TernaryEncoder(bits=5)
    x = torch.randn(4, 64, requires_grad=True)
    y = torch.randn(4, 64, requires_grad=True)
    model = torch.nn.ModuleList([a, b])
    rate_a, rate_b = spikes_per_activation(a, x), spikes_per_activation(b, y * 0.01 + torch.sign(y))
    high = SpikeObjective(weight=2.0, target=100.0)
    high.attach(model)
    a(x), b(y)
    penalty, _, _ = high.collect(model)
    assert penalty.item() == 0.0
    per_layer = SpikeObjective(weight=1.0, target=1.5, per_layer=True)
    per_layer.attach(model)
    a(x), b(y * 0.01 + torch.sign(y))
    penalty, rate, _ = per_layer.collect(model)
    expected = (max(0, rate_a - 1.5) + max(0, rate_b - 1.5)) / 2
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
    assert rate.item() == pytest.approx((rate_a + rate_b) / 2, rel=1e-5)  # equal activations


def test_spike_objective_is_not_recorded_without_gradients():
    encoder = TernaryEncoder(bits=5)
    objective = SpikeObjective(weight=1.0)
    objective.attach(encoder)
    with torch.no_grad():
        encoder(torch.randn(2, 16))
    assert objective.collect(encoder) is None


@pytest.mark.parametrize("options,key", [
    ({"weight": -1}, "task.spike_loss.weight"), ({"weight": 1, "target": -0.5}, "task.spike_loss.target"),
    ({"weigth": 1}, "task.spike_loss.weigth"), ({"per_layer": "yes"}, "task.spike_loss.per_layer")])
def test_bad_spike_loss_options_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        SpikeObjective.from_config(options, "task.spike_loss")  # as train.py checks it


# ---- threshold rules -------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0.5, 1.0, 2.0])
def test_mean_threshold_fires_about_k_spikes_per_activation(k):
    """SpikingBrain's adaptive threshold Δ = mean(|x|)/k: the spike count follows k, not the tails."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    heavy = x * (1 + 20 * (torch.rand(64, 256, generator=torch.Generator().manual_seed(1)) > 0.99))
    encoder = TernaryEncoder(bits=5, threshold="mean", threshold_k=k)
    counts, step = encoder.encode(heavy)
    torch.testing.assert_close(step, heavy.abs().mean(-1, keepdim=True) / k)
    assert 0.6 * k < spikes_per_activation(encoder, heavy) < 1.2 * k
    assert dispatch.can_clip(encoder) and not dispatch.absmax_step(encoder)  # the mean rule can saturate: gradients masked


def test_mean_threshold_trains_and_decodes_exactly():
    encoder = TernaryEncoder(bits=5, threshold="mean", threshold_k=1.0)
    x = torch.randn(3, 7, 32) * 3
    counts, step = encoder.encode(x)
    spikes, _ = encoder.spike_train(x)
    assert torch.equal(encoder.decode(spikes), counts)


@pytest.mark.parametrize("make,key", [
    (lambda: TernaryEncoder(bits=5, gamma=0.9, granularity="channel"), "gamma"),
    (lambda: IFEncoder(bits=5, signed=True, gamma=0.5, granularity="channel"), "gamma"),
    (lambda: TernaryEncoder(bits=5, threshold="mean", granularity="channel"), "threshold"),
    (lambda: TernaryEncoder(bits=5, threshold="mean", gamma=0.9), "gamma"),
    (lambda: TernaryEncoder(bits=5, threshold="median"), "threshold"),
    (lambda: GIFEncoder(bits=5, threshold_k=0), "threshold_k")])
def test_combinations_that_would_be_ignored_are_refused(make, key):
    """granularity=channel used to ignore γ silently (the running max per channel has no quantile)."""
    with pytest.raises(ConfigError, match=key):
        make()


# ---- LSQ as in Esser et al. 2020 -------------------------------------------------------------
def test_lsq_gradient_scale_counts_the_features_of_one_example():
    """g = 1/sqrt(N_F · Q_P) with N_F the features of one sequence: the batch does not shrink it."""
    encoder = TernaryEncoder(bits=5, learnable_step=True)
    one = torch.randn(1, 8, 32)
    assert lsq_gradient_scale(one, encoder.max_count) == lsq_gradient_scale(one.expand(16, 8, 32), encoder.max_count)
    assert lsq_gradient_scale(one, encoder.max_count) == pytest.approx(1 / math.sqrt(8 * 32 * 15))


def test_lsq_step_gradient_outside_the_window_is_the_bound():
    encoder = TernaryEncoder(bits=3, learnable_step=True)  # Q = 3
    x = torch.tensor([[3.3, 3.0, 0.0, 0.0]])  # the absmax step Δ₀ = 1.1
    with torch.no_grad():
        encoder.step_scale.fill_(1 / 1.1 * 3.3 / 3.2)  # Δ = 3.3/3.2, so v[0] = 3.2: in (Q, Q + 1/2]
    x.requires_grad_()
    out = encoder(x)
    counts, step = encoder.encode(x)
    assert counts[0, 0] == 3 and 3 < float(x.detach()[0, 0] / step[0, 0]) <= 3.5
    out.backward(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert x.grad[0, 0] == 0  # clipped: before the fix the ±1/2 rounding window passed it
    # d(value)/dΔ of a clipped element is its bound Q; through Δ = s·Δ₀: Q · Δ / s · g
    g = lsq_gradient_scale(x, encoder.max_count)
    expected = 3 * step[0, 0] / encoder.step_scale.detach() * g
    torch.testing.assert_close(encoder.step_scale.grad, expected.reshape(()))


# ---- through train.py ------------------------------------------------------------------------
def test_train_py_logs_the_spike_loss_beside_the_task_loss(config_factory, tmp_path):
    cfg = config_factory("experiment=smoke", "trainer.max_steps=4", "trainer.val_check_interval=4",
                         "validate_at_start=false", "neuron.encoder.learnable_step=true",
                         "task.spike_loss.weight=0.5", "task.spike_loss.target=0.5")
    result = run_training(cfg)
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/spike_loss")]
    assert rows and all(float(row["train/spike_loss"]) >= 0 and float(row["train/loss"]) > 0 for row in rows)
    assert all(float(row["train/spikes_per_activation"]) > 0 for row in rows)
    assert result.steps == 4


# ---- the sweep and its Pareto picture ---------------------------------------------------------
def test_every_budget_point_composes():
    from conftest import CONF, compose

    for option in sorted(p.stem for p in (CONF / "budget").glob("*.yaml")):
        cfg = compose([f"budget={option}"], CONF.parent / "unused")
        assert (cfg.neuron.get("encoder") is None) == (option == "dense"), option


def test_multirun_sweep_then_pareto_table_and_figure(tmp_path):
    """``train.py -m`` over two budget points writes a run each with summary.json and energy.json;
    ``spikellm-pareto`` reads the sweep, prices it on two cost models and draws the front."""
    from conftest import run_script

    from spikellm.energy import pareto

    sweep = tmp_path / "sweep"
    done = run_script("train.py", "-m", "experiment=smoke", "budget=dense,mean_k1", "callbacks=default", "trainer.max_steps=2",
                      "trainer.val_check_interval=2", "logger=none", f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = pareto.find_runs([sweep])
    assert len(runs) == 2
    assert pareto.main([str(sweep), "--cost", "horowitz45_fp32", "seneca", "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "pareto.md").read_text()
    assert "budget=dense" in table and "budget=mean_k1" in table and "(dense)" in table
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 10_000
    from spikellm.energy import load_cost_model

    points = [pareto.read_run(run) for run in runs]
    cost = load_cost_model("horowitz45_fp32")
    pareto.price(points, [cost])
    front = pareto.pareto_front(points, cost.name)
    assert front and all(p in points for p in front)
    assert [p.dense for p in points].count(True) == 1


def test_pareto_front_keeps_only_undominated_points():
    from spikellm.energy.pareto import RunPoint, pareto_front

    def point(energy, ppl):
        p = RunPoint(label=f"{energy}/{ppl}", directory=None, val_ppl=ppl, spikes_per_activation=None, report=None)
        p.priced["c"] = {"uj_per_token": energy}
        return p

    points = [point(1, 10), point(2, 8), point(3, 9), point(4, 5), point(2, 12)]
    assert [p.label for p in pareto_front(points, "c")] == ["1/10", "2/8", "4/5"]


def test_pareto_refuses_a_directory_without_runs(tmp_path):
    from spikellm.energy.pareto import main

    assert main([str(tmp_path)]) == 2


def test_linear_proxy_shortcut_has_the_element_wise_gradient():
    """Σ_i |x_i| / Δ_t per token (the shortcut of a linear proxy) equals the element-wise proxy
    where nothing clips (absmax step), gradient included."""
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(4))
    grads = []
    for slope in (1.0, None):
        encoder = TernaryEncoder(bits=5, learnable_step=True)
        type(encoder).spike_proxy_slope = property(lambda self, s=slope: s)
        try:
            leaf = x.clone().requires_grad_()
            counts, _ = encoder.encode(leaf)
            spike_term(encoder, leaf, counts, counts.abs().sum()).backward()
            grads.append((leaf.grad, encoder.step_scale.grad))
        finally:
            del type(encoder).spike_proxy_slope
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
