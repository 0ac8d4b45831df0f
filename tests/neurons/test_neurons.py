"""The two forms of every encoder agree exactly (DESIGN.md §2)."""
import pytest
import torch

from spikellm.errors import ConfigError
from spikellm.neurons import TernaryEncoder
from spikellm.ops.rounding import round_half_up
from spikellm.nn import SpikingLinear


def adversarial_inputs(dtype=torch.float32):
    torch.manual_seed(0)
    rows = [
        torch.zeros(16),
        torch.full((16,), -3.0),
        torch.linspace(-1, 1, 16),
        torch.tensor([3e4] + [1e-3] * 15),  # one huge outlier (finite in fp16)
        torch.randn(16) * 1e-30,  # subnormal-scale activations
        torch.randn(16),
    ]
    x = torch.stack(rows).to(dtype)
    # ties: values exactly on k + 1/2 steps of the per-token absmax grid
    ties = torch.tensor([7.0] + [k + 0.5 for k in range(-7, 7)] + [-7.0]) / 7
    return torch.cat([x, ties.unsqueeze(0).to(dtype), torch.randn(4, 16).to(dtype) * 50])


def test_round_half_up_is_exact_near_half():
    below_half = torch.nextafter(torch.tensor(0.5), torch.tensor(0.0))
    v = torch.tensor([below_half.item(), 0.5, -0.5, -1.5, 2.5, -2.5000002, 1e7 + 0.5])
    torch.testing.assert_close(round_half_up(v), torch.tensor([0.0, 1.0, 0.0, -1.0, 3.0, -3.0, 1e7 + 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [dict(bits=2), dict(bits=4), dict(bits=5, gamma=0.9),
                                    dict(bits=8, gamma=0.5, clip=3), dict(bits=16, clip=2)])
def test_ternary_train_decodes_to_counts(dtype, kwargs):
    encoder = TernaryEncoder(**kwargs)
    for x in [adversarial_inputs(dtype), torch.randn(3, 5, 33).to(dtype) * 4]:
        counts, step = encoder.encode(x)
        spikes, step_t = encoder.spike_train(x)
        assert spikes.shape == (encoder.num_steps, *x.shape)
        assert set(spikes.unique().tolist()) <= {-1.0, 0.0, 1.0}
        assert torch.equal(step, step_t)
        assert torch.equal(encoder.decode(spikes), counts)
        assert counts.abs().max() <= encoder.max_count
        assert torch.equal(counts, counts.round())
        # closed-form spike count equals counting the train
        assert torch.equal(encoder.spikes_per_count(counts), spikes.abs().sum(0))


def test_ternary_step_counts_and_clipping():
    assert TernaryEncoder(bits=4).num_steps == 7  # Q = 2^(b-1) - 1: half of the unsigned 15
    assert TernaryEncoder(bits=8, clip=3).num_steps == 3
    x = torch.tensor([[7.0, 3.4, -3.5, 0.2, -7.0]])
    counts, step = TernaryEncoder(bits=4).encode(x)
    assert torch.equal(step, torch.tensor([[1.0]]))
    assert counts.tolist() == [[7, 3, -4, 0, -7]]  # ties round away from zero
    clipped, _ = TernaryEncoder(bits=4, clip=2).encode(x)
    assert clipped.tolist() == [[2, 2, -2, 0, -2]]


def test_gamma_sets_the_step_from_a_quantile():
    x = torch.arange(1.0, 11.0).unsqueeze(0)  # |x| = 1..10
    _, step = TernaryEncoder(bits=3, gamma=0.5).encode(x)  # Q = 3, 5th smallest = 5
    assert step.item() == pytest.approx(5 / 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_spike_driven_matmul_equals_count_matmul(dtype):
    torch.manual_seed(1)
    encoder = TernaryEncoder(bits=5, gamma=0.95, clip=9)
    x = (torch.randn(6, 48) * 3).to(dtype)
    weight = torch.randn(48, 20)
    counts, step = encoder.encode(x)
    spikes, _ = encoder.spike_train(x)
    by_spikes = sum(s_t @ weight for s_t in spikes) * step
    torch.testing.assert_close(by_spikes, (counts @ weight) * step, rtol=1e-5, atol=1e-5)
    layer = SpikingLinear(48, 20, encoder=encoder).to(dtype)
    torch.testing.assert_close(layer.forward_temporal(x).float(), layer(x).float(), rtol=2e-2, atol=2e-2)


def test_forward_is_counts_times_step_with_straight_through_gradient():
    encoder = TernaryEncoder(bits=4, gamma=0.5)
    x = torch.randn(4, 16, requires_grad=True)
    out = encoder(x)
    counts, step = encoder.encode(x)
    assert torch.equal(out, counts * step)
    out.sum().backward()
    # the window of LSQ / PACT-style clipping: x/Δ within [-Q, Q], not the rounding's [-Q-½, Q+½]
    expected = ((x.detach() / step).abs() <= encoder.max_count).float()
    assert torch.equal(x.grad, expected)
    assert 0 < expected.mean() < 1  # gamma < 1 clips some activations


@pytest.mark.parametrize("kwargs,key", [(dict(bits=1), "bits"), (dict(bits=17), "bits"),
                                        (dict(gamma=0.0), "gamma"), (dict(gamma=1.5), "gamma"),
                                        (dict(bits=4, clip=8), "clip"), (dict(clip=-1), "clip"),
                                        (dict(bits="4"), "bits")])
def test_bad_parameters_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"^{key}="):
        TernaryEncoder(**kwargs)
