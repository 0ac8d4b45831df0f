"""Training-free activation sparsity (spikellm.sparsity; arXiv 2501.16337)."""
import copy

import pytest
import torch
import transformers

from spikellm.errors import ConfigError, DataError
from spikellm.models.llama import LlamaConfig
from spikellm.models.spikify import spikify, spiking_modules
from spikellm.sparsity import (ActivationThreshold, calibrate_thresholds, calibration_loss, gates,
                               install_thresholds, remove_thresholds, sparsity_report)

TOL = 1.0005


def _pattern_batches(n_batches=2, batch=4, seq=32, vocab=64):
    """A fixed repetitive token pattern (period 8) at random phases: learnable in a few steps."""
    period = torch.tensor([3, 17, 5, 42, 9, 30, 11, 60]) % vocab
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        phase = torch.randint(0, 8, (batch, 1), generator=g)
        out.append(period[(phase + torch.arange(seq)) % 8])
    return out


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=32).build()
    train = _pattern_batches(n_batches=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(40):
        ids = train[step % len(train)]
        logits = model(ids)[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def calibrated(trained):
    model = copy.deepcopy(trained)
    batches = _pattern_batches()
    dense = calibration_loss(model, batches)
    result = calibrate_thresholds(model, batches, tolerance=TOL)
    return model, batches, dense, result


def test_activation_threshold_zeroes_below_threshold_and_reports_fraction():
    x = torch.tensor([[-0.5, 0.1, -0.05, 2.0], [0.3, -0.3, 0.0, 0.29]])
    gate = ActivationThreshold(0.3)
    y = gate(x)
    expected = torch.where(x.abs() < 0.3, torch.zeros_like(x), x)
    assert torch.equal(y, expected)
    assert gate.count == 8 and gate.zeroed == 4 and gate.sparsity == pytest.approx(0.5)
    gate(torch.ones(2, 4))  # nothing below: the fraction is over everything seen
    assert gate.count == 16 and gate.sparsity == pytest.approx(0.25)
    gate.reset_stats()
    assert gate.count == 0 and gate.sparsity == 0.0
    off = ActivationThreshold(0.0)
    assert torch.equal(off(x), x)
    assert off.sparsity == pytest.approx(1 / 8)  # the one exact zero


def test_trained_model_has_a_meaningful_loss(trained):
    loss = calibration_loss(trained, _pattern_batches())
    assert loss < 0.5 * torch.log(torch.tensor(64.0)).item()


def test_calibration_respects_bound_and_sparsifies(calibrated):
    model, batches, dense, result = calibrated
    layers = list(model.spiking_linears())
    assert list(result) == layers  # every layer, in network order
    assert len(layers) == 14
    for info in result.values():
        assert set(info) >= {"threshold", "sparsity", "keep", "loss"}
        assert info["threshold"] >= 0.0 and 0.0 <= info["sparsity"] <= 1.0
    final = calibration_loss(model, batches)
    assert final == pytest.approx(result[layers[-1]]["loss"], rel=1e-6)
    assert final <= TOL ** len(layers) * dense * (1 + 1e-6)
    # the running reference never rises by more than the tolerance per layer
    ref = dense
    for info in result.values():
        assert info["loss"] <= TOL * ref * (1 + 1e-6)
        ref = info["loss"]
    sparse = [n for n, info in result.items() if info["threshold"] > 0]
    assert sparse and max(result[n]["sparsity"] for n in sparse) > 0.05
    report = sparsity_report(model)
    assert set(report["layers"]) == set(layers)
    macs = {n: m.in_features * m.out_features for n, m in model.spiking_linears().items()}
    expected = sum(result[n]["sparsity"] * macs[n] for n in layers) / sum(macs.values())
    assert report["weighted_sparsity"] == pytest.approx(expected)
    assert 0.0 < report["weighted_sparsity"] < 1.0
    # measuring again on the same batches gives the same numbers
    again = sparsity_report(model, batches)
    assert again["weighted_sparsity"] == pytest.approx(report["weighted_sparsity"])


def test_tolerance_one_stays_conservative(trained):
    model = copy.deepcopy(trained)
    batches = _pattern_batches()
    dense = calibration_loss(model, batches)
    result = calibrate_thresholds(model, batches, tolerance=1.0)
    assert calibration_loss(model, batches) <= dense * (1 + 1e-6)
    # a loss that any zeroing worsens (distance to the dense logits): nothing is free, all stay off
    remove_thresholds(model)
    with torch.no_grad():
        reference = [model(b) for b in batches]

    def drift(m, bs):
        with torch.no_grad():
            return sum(float((m(b) - r).pow(2).mean()) for b, r in zip(bs, reference))

    strict = calibrate_thresholds(model, batches, loss_fn=drift, tolerance=1.0)
    assert all(info["threshold"] == 0.0 and info["keep"] == 1.0 for info in strict.values())
    assert drift(model, batches) == 0.0
    assert len(result) == len(strict)


def test_remove_thresholds_restores_dense_logits(trained):
    model = copy.deepcopy(trained)
    ids = _pattern_batches()[0]
    with torch.no_grad():
        dense = model(ids)
    calibrate_thresholds(model, _pattern_batches(), keep=(0.5,), tolerance=2.0)
    with torch.no_grad():
        assert not torch.equal(model(ids), dense)
    assert model.training is False
    remove_thresholds(model)
    assert gates(model) == {}
    with torch.no_grad():
        assert torch.equal(model(ids), dense)


def test_calibration_restores_training_mode(trained):
    model = copy.deepcopy(trained).train()
    calibrate_thresholds(model, _pattern_batches(n_batches=1), keep=(0.5,))
    assert model.training


def test_works_on_spikified_hf_model():
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    model = spikify(hf)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    result = calibrate_thresholds(model, [ids], keep=(0.9, 0.5), tolerance=1.05)
    assert list(result) == list(spiking_modules(model))
    assert "lm_head" not in result
    remove_thresholds(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, dense)


def test_install_thresholds_by_name(trained):
    model = copy.deepcopy(trained)
    name = next(iter(model.spiking_linears()))
    installed = install_thresholds(model, {name: 0.1})
    assert float(installed[name].threshold) == pytest.approx(0.1)
    assert len(installed) == 14
    with pytest.raises(ConfigError):
        install_thresholds(model, {"nope": 0.1})
    remove_thresholds(model)


@pytest.mark.parametrize("kwargs", [dict(tolerance=0.99), dict(keep=(0.0,)), dict(keep=(1.2,)),
                                    dict(keep=()), dict(keep=(0.5, -0.1))])
def test_config_errors(trained, kwargs):
    with pytest.raises(ConfigError):
        calibrate_thresholds(copy.deepcopy(trained), _pattern_batches(n_batches=1), **kwargs)


@pytest.mark.parametrize("batches", [[], [torch.randn(2, 8)], [torch.zeros(2, 1, dtype=torch.long)]])
def test_data_errors(trained, batches):
    with pytest.raises(DataError):
        calibrate_thresholds(copy.deepcopy(trained), batches)


def test_report_without_thresholds_is_an_error(trained):
    with pytest.raises(ConfigError):
        sparsity_report(copy.deepcopy(trained))
    with pytest.raises(ConfigError):
        ActivationThreshold(-1.0)
