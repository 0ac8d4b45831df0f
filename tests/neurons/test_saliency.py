"""Optimal Brain Spiking (SpikeLLM, arXiv 2407.04752; DESIGN.md §3.5): saliency and step allocation."""
import math

import pytest
import torch
import torch.nn.functional as F

from spikellm.errors import ConfigError, DataError
from spikellm.models.llama import LlamaConfig
from spikellm.neurons import TernaryEncoder
from spikellm.neurons.saliency import (SaliencyAccumulator, allocate_steps, average_steps, channel_saliency,
                                       salient_count)
from spikellm.nn import SpikingLinear

CONFIG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=32)


def tiny_model():
    torch.manual_seed(0)
    return CONFIG.build(encoder=lambda: TernaryEncoder(bits=4))


def token_batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CONFIG.vocab_size, (2, 16), generator=g) for _ in range(n)]


def test_saliency_equals_a_per_channel_loop():
    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    tokens = x.reshape(-1, 6)
    expected = torch.tensor([
        sum(tokens[t, j] * sum(tokens[t, k] * (w[:, k] * w[:, j]).sum() for k in range(6)) for t in range(10)) / 10
        for j in range(6)], dtype=torch.float64)
    torch.testing.assert_close(channel_saliency(x, w), expected)
    # the channels share the output energy: Σ_j s_j = mean ‖x Wᵀ‖²
    torch.testing.assert_close(channel_saliency(x, w).sum(), (tokens @ w.T).pow(2).sum(-1).mean())
    assert channel_saliency(x.half(), w.half()).dtype == torch.float32  # low precision is upcast


def test_accumulator_is_invariant_to_batching():
    torch.manual_seed(0)
    layer = SpikingLinear(8, 5, encoder=TernaryEncoder(bits=4))
    batches = [torch.randn(2, 3, 8), torch.randn(7, 8), torch.randn(1, 4, 2, 8)]
    with SaliencyAccumulator(layer) as accumulator:
        layer(x=batches[0])  # by keyword too
        for x in batches[1:]:
            layer(x)
    assert accumulator.tokens[""] == 6 + 7 + 8
    everything = torch.cat([x.reshape(-1, 8) for x in batches])
    torch.testing.assert_close(accumulator.saliency()[""], channel_saliency(everything, layer.weight).double())
    layer(torch.randn(3, 8))  # hooks are gone: nothing accumulates any more
    assert accumulator.tokens[""] == 21 and not layer._forward_pre_hooks


@pytest.mark.parametrize("low_p", [0.9, 0.95, 0.5, 0.0, 1.0])
def test_allocate_marks_the_top_fraction_of_every_layer(low_p):
    model = tiny_model()
    masks = allocate_steps(model, token_batches(), low_p=low_p, addbit=1)
    layers = model.spiking_linears()
    assert masks.keys() == layers.keys() and len(masks) == 14
    for name, mask in masks.items():
        channels = layers[name].in_features
        # rounding: ceil((1 - low_p) · C), e.g. 0.9 of 32 → 4 channels, of 128 → 13
        assert int(mask.sum()) == (math.ceil(round((1 - low_p) * channels, 9)) if low_p < 1 else 0)
        assert torch.equal(layers[name].encoder.channel_scale, torch.where(mask, 2.0, 1.0))
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_salient_count_rounding():
    assert [salient_count(32, p) for p in (0.9, 0.95, 0.875, 0.0, 1.0, 0.999)] == [4, 2, 4, 32, 0, 1]
    assert salient_count(100, 0.29) == 71  # 0.29 · 100 = 28.999… in floating point


def test_allocation_picks_salient_channels_deterministically():
    model = tiny_model()
    first = allocate_steps(model, token_batches(), low_p=0.9)
    again = allocate_steps(tiny_model(), token_batches(), low_p=0.9)
    assert all(torch.equal(first[name], again[name]) for name in first)
    # ties go to the lower index: a zero weight makes every saliency 0
    layer = SpikingLinear(8, 4, encoder=TernaryEncoder())
    torch.nn.init.zeros_(layer.weight)
    assert allocate_steps(layer, [torch.randn(3, 8)], low_p=0.75)[""].tolist() == [True, True] + [False] * 6


def test_mode_restored_and_batches_may_be_pairs():
    model = tiny_model()
    model.train()
    model.layers[1].eval()  # a mixed state comes back as it was
    seen_training = []

    def forward(m, batch):
        seen_training.append(m.training)
        return m(batch[0])

    allocate_steps(model, [(ids, ids) for ids in token_batches(2)], forward=forward)
    assert seen_training == [False, False]
    assert model.training and model.layers[0].training and not model.layers[1].training
    allocate_steps(model.eval(), [(ids, ids) for ids in token_batches(2)])  # default forward takes inputs
    assert not any(m.training for m in model.modules())


def test_allocation_is_saved_and_loads_into_a_freshly_built_model():
    model = tiny_model()
    masks = allocate_steps(model, token_batches(), low_p=0.9, addbit=2)
    state = model.state_dict()
    for name, mask in masks.items():
        assert torch.equal(state[f"{name}.encoder.channel_scale"], torch.where(mask, 4.0, 1.0))
    fresh = CONFIG.build(encoder=lambda: TernaryEncoder(bits=4))  # channel_scale None until loaded
    fresh.load_state_dict(state)
    ids = token_batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    assert average_steps(fresh) == average_steps(model)


def test_average_steps():
    model = tiny_model()
    assert average_steps(model) == 7.0  # ternary 4-bit: T = Q = 7 everywhere
    allocate_steps(model, token_batches(), low_p=0.9, addbit=1)
    layers = model.spiking_linears().values()
    salient = sum(salient_count(layer.in_features, 0.9) for layer in layers)
    channels = sum(layer.in_features for layer in layers)
    assert average_steps(model) == pytest.approx(7 + 7 * salient / channels)  # salient channels: 14 steps


def test_obs_beats_random_allocation_and_none():
    torch.manual_seed(0)
    layer = SpikingLinear(64, 32, encoder=TernaryEncoder(bits=3))
    salient = torch.randperm(64)[:8]
    scale = torch.ones(64)
    scale[salient] = 10.0  # a few high-magnitude channels, which dominate x Wᵀ

    def data(n):
        return torch.randn(n, 64) * scale

    calibration, test = [data(256) for _ in range(4)], data(2048)

    def mse():
        with torch.no_grad():
            return F.mse_loss(layer(test), F.linear(test, layer.weight)).item()

    none = mse()
    masks = allocate_steps(layer, calibration, low_p=0.875, addbit=1)
    assert set(masks[""].nonzero().flatten().tolist()) == set(salient.tolist())
    obs, obs_steps = mse(), average_steps(layer)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # the same number of extra steps, on random channels
        random = torch.zeros(64, dtype=torch.bool).index_fill(0, torch.randperm(64, generator=g)[:8], True)
        layer.encoder.allocate_channels(random, 1)
        assert average_steps(layer) == obs_steps == 3 * 7 / 8 + 6 / 8
        assert obs < mse() <= none * 1.01
    assert obs < 0.9 * none  # here 0.31 vs 0.40; random channels: 0.38


@pytest.mark.parametrize("kwargs, match", [
    (dict(low_p=1.5), r"low_p=1\.5 is invalid: must be a number in \[0\.0, 1\.0\]"),
    (dict(low_p=-0.1), r"low_p=-0\.1 is invalid"),
    (dict(low_p="0.9"), r"low_p='0\.9' is invalid"),
    (dict(addbit=9), r"addbit=9 is invalid: must be an integer in \[0, 8\]"),
    (dict(addbit=1.0), r"addbit=1\.0 is invalid"),
    (dict(addbit=True), r"addbit=True is invalid"),
])
def test_bad_arguments_name_the_key(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        allocate_steps(tiny_model(), token_batches(1), **kwargs)


def test_empty_calibration_data_is_a_data_error():
    with pytest.raises(DataError, match="allocate_steps got no calibration batches"):
        allocate_steps(tiny_model(), [])
    with pytest.raises(DataError, match="exhausted iterator"):
        allocate_steps(tiny_model(), iter(()))


def test_model_without_encoders_is_a_config_error():
    for model in (CONFIG.build(), torch.nn.Linear(4, 4)):
        with pytest.raises(ConfigError, match="has no SpikingLinear with an encoder"):
            allocate_steps(model, token_batches(1))
        with pytest.raises(ConfigError, match="has no SpikingLinear with an encoder"):
            average_steps(model)


def test_layers_the_forward_never_reaches_are_a_data_error():
    model = tiny_model()
    with pytest.raises(DataError, match="no calibration tokens reached 7 encoded layer"):
        allocate_steps(model, token_batches(1),  # runs the first block only
                       forward=lambda m, ids: m.layers[0](m.embed_tokens(ids), m.rope_cos[:16], m.rope_sin[:16]))


def test_shape_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match=r"last dim must be the C_in=6"):
        channel_saliency(torch.randn(3, 5), torch.randn(4, 6))
