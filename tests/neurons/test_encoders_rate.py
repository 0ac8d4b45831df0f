"""IF rate, GIF and bit-plane encoders: both forms agree exactly (DESIGN.md §2, §3.1, §3.3, §3.4)."""
import numpy as np
import pytest
import torch

from spikellm.errors import ConfigError
from spikellm.neurons import BitPlaneEncoder, GIFEncoder, IFEncoder
from spikellm.neurons.rate_functional import if_neuron_soft_reset
from spikellm.nn import SpikingLinear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ENCODERS = [
    IFEncoder(bits=1), IFEncoder(bits=4), IFEncoder(bits=5, gamma=0.9, signed=True),
    IFEncoder(bits=8, gamma=0.5), IFEncoder(bits=2, signed=True),
    GIFEncoder(bits=4, levels=2), GIFEncoder(bits=5, levels=16), GIFEncoder(bits=8, levels=4, gamma=0.8),
    GIFEncoder(bits=5, levels=4, signed=True), GIFEncoder(bits=16, levels=256, signed=True),
    GIFEncoder(bits=3, levels=256),
    BitPlaneEncoder(bits=1), BitPlaneEncoder(bits=4), BitPlaneEncoder(bits=16, gamma=0.7),
    BitPlaneEncoder(bits=2, signed=True), BitPlaneEncoder(bits=8, signed=True, gamma=0.95),
]
IDS = [repr(e) for e in ENCODERS]


def alphabet(encoder) -> set[float]:
    """The spike values an encoder may emit."""
    top = encoder.levels - 1 if isinstance(encoder, GIFEncoder) else 1
    return set(map(float, range(-top if encoder.signed else 0, top + 1)))


def inputs(encoder, dtype):
    """Random and adversarial rows, including exact ties at k + 1/2 steps of the token's grid."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    # a token whose bound is m has step m / max_count, so with gamma = 1 and m = max_count the
    # step is 1 and the grid entries are exact ties k + 1/2 (in fp16/bf16 too while they are exact)
    m = min(encoder.max_count, 2047)  # 65535 would be inf in fp16
    grid = torch.arange(max(encoder.min_count, -m), m, dtype=torch.float32)[:15] + 0.5
    ties = torch.cat([torch.tensor([float(m)]), grid, torch.full((16 - 1 - len(grid),), -0.5)])
    rows = torch.stack([
        torch.zeros(16),
        torch.full((16,), -3.0),  # all negative
        torch.linspace(-1, 1, 16),
        torch.tensor([3e4] + [1e-3] * 15),  # one huge outlier (finite in fp16)
        torch.tensor([-3e4] + [1e-3] * 15),  # one huge negative outlier
        randn(16) * 1e-30,  # tiny: zero in fp16, a tiny step in fp32/bf16
        ties,
        ties / 7,
    ])
    return [rows.to(dtype), (randn(3, 5, 24) * 4).to(dtype), (randn(4, 16) * 50).relu().to(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoder", ENCODERS, ids=IDS)
def test_train_decodes_to_counts(encoder, dtype):
    for x in inputs(encoder, dtype):
        counts, step = encoder.encode(x)
        spikes, step_t = encoder.spike_train(x)
        assert spikes.shape == (encoder.num_steps, *x.shape) and spikes.dtype == torch.float32
        assert set(spikes.unique().tolist()) <= alphabet(encoder)
        assert torch.equal(step, step_t) and step.shape == (*x.shape[:-1], 1)
        assert torch.equal(encoder.decode(spikes), counts)
        assert torch.equal(counts, counts.round())
        assert counts.min() >= encoder.min_count and counts.max() <= encoder.max_count
        # closed-form spikes per activation equals counting the non-zero spikes of the train
        assert torch.equal(encoder.spikes_per_count(counts), (spikes != 0).float().sum(0))


@pytest.mark.parametrize("encoder", ENCODERS, ids=IDS)
def test_spike_driven_matmul_equals_count_matmul(encoder):
    x = inputs(encoder, torch.float32)[1]
    weight = torch.randn(24, 7, generator=torch.Generator().manual_seed(1))
    counts, _ = encoder.encode(x)
    spikes, _ = encoder.spike_train(x)
    # Σ_t w_t (s_t @ W), batched over t: one op per step is slow on a busy 2-core machine
    time_weights = encoder.time_weights().view(-1, *[1] * x.dim())
    by_spikes = (time_weights * (spikes @ weight)).sum(0)
    # equal up to fp32 summation order: allow a few ulps of the largest partial sum
    scale = (counts.abs() @ weight.abs()).max().item()
    torch.testing.assert_close(by_spikes, counts @ weight, rtol=1e-5, atol=1e-6 * scale)


def test_counts_round_half_away_from_zero_and_saturate():
    x = torch.tensor([[15.0, 2.5, 3.49999976, -0.5, -4.0, 0.4999999, 7.5]])  # absmax 15: step 1
    for encoder in (IFEncoder(bits=4), GIFEncoder(bits=4, levels=4), BitPlaneEncoder(bits=4)):
        counts, step = encoder.encode(x)
        assert torch.equal(step, torch.tensor([[1.0]]))
        assert counts.tolist() == [[15, 3, 3, 0, 0, 0, 8]]  # ties up; negatives fire nothing when unsigned
    for encoder in (IFEncoder(bits=5, signed=True), GIFEncoder(bits=5, signed=True),
                    BitPlaneEncoder(bits=5, signed=True)):
        counts, _ = encoder.encode(x)
        assert counts.tolist() == [[15, 3, 3, -1, -4, 0, 8]]  # ties away from zero on both sides
    # a huge outlier under gamma < 1 saturates at the top count instead of overflowing
    outlier = torch.tensor([[3e38] + [1.0] * 9])
    assert IFEncoder(bits=4, gamma=0.5).encode(outlier)[0][0, 0] == 15
    assert IFEncoder(bits=4, gamma=0.5, signed=True).encode(-outlier)[0][0, 0] == -7


def test_unsigned_step_uses_the_positive_part():
    x = torch.tensor([[-100.0, 3.0, 6.0, -1.0]])
    assert IFEncoder(bits=2).step_size(x).item() == pytest.approx(6 / 3)
    assert IFEncoder(bits=3, signed=True).step_size(x).item() == pytest.approx(100 / 3)
    # gamma = 0.75: 3rd smallest of relu(x) = (0, 0, 3, 6)
    assert IFEncoder(bits=2, gamma=0.75).step_size(x).item() == pytest.approx(3 / 3)


def test_num_steps():
    assert [IFEncoder(bits=b).num_steps for b in (1, 4, 16)] == [1, 15, 65535]
    assert IFEncoder(bits=5, signed=True).num_steps == 15
    assert GIFEncoder(bits=4, levels=4).num_steps == 5
    assert GIFEncoder(bits=5, levels=4, signed=True).num_steps == 5
    assert GIFEncoder(bits=3, levels=256).num_steps == 1
    assert BitPlaneEncoder(bits=8).num_steps == 8 and BitPlaneEncoder(bits=8, signed=True).num_steps == 7
    assert BitPlaneEncoder(bits=3).time_weights().tolist() == [4.0, 2.0, 1.0]


def test_gif_top_count_is_exact_where_the_paper_is_off_by_one():
    encoder = GIFEncoder(bits=5, levels=16)
    assert encoder.num_steps == 3  # ceil(31 / 15); two steps carry at most 30
    counts = torch.arange(32.0)
    spikes, _ = encoder.spike_train(counts.unsqueeze(0) / 31)  # absmax 1 -> step 1/31
    assert torch.equal(encoder.decode(spikes)[0], counts)
    assert spikes[:, 0, 31].tolist() == [15.0, 15.0, 1.0]
    assert encoder.spikes_per_count(counts)[[0, 1, 15, 16, 30, 31]].tolist() == [0, 1, 1, 2, 2, 3]


def test_if_train_spreads_spikes_evenly_and_bitplanes_are_binary_digits():
    counts = torch.tensor([0.0, 1.0, 5.0, 7.0])
    encoder = IFEncoder(bits=3)
    spikes = encoder.train_from(counts, torch.tensor(1.0), *encoder.count_bounds())  # step 1: x is the count
    t = torch.arange(1, 8).unsqueeze(1)
    assert torch.equal(spikes, torch.floor(t * counts / 7) - torch.floor((t - 1) * counts / 7))
    planes_encoder = BitPlaneEncoder(bits=4, signed=True)
    planes = planes_encoder.train_from(torch.tensor([5.0, -3.0]), torch.tensor(1.0), *planes_encoder.count_bounds())
    assert planes.T.tolist() == [[1, 0, 1], [0, -1, -1]]
    popcounts = BitPlaneEncoder(bits=4).spikes_per_count(torch.tensor([0.0, 7.0, 8.0, 15.0]))
    assert popcounts.tolist() == [0, 3, 1, 4]


def spikingjelly_if_reference(currents: np.ndarray, v_th: np.float32) -> np.ndarray:
    """SpikingJelly ``IFNode(v_reset=None)`` from its documented equations, one scalar at a time:
    H[t] = V[t-1] + X[t]; S[t] = Heaviside(H[t] - V_th); V[t] = H[t] - S[t] · V_th; V[-1] = 0."""
    spikes = np.zeros_like(currents)
    for index in np.ndindex(currents.shape[1:]):
        v = np.float32(0.0)
        for t in range(currents.shape[0]):
            h = np.float32(v + currents[(t, *index)])
            s = np.float32(1.0) if h - v_th >= 0 else np.float32(0.0)
            v = np.float32(h - s * v_th)
            spikes[(t, *index)] = s
    return spikes


@pytest.mark.parametrize("threshold", [1.0, 0.7, 3.0])
def test_if_neuron_matches_spikingjelly_step_for_step(threshold):
    generator = torch.Generator().manual_seed(2)
    currents = torch.randn(20, 3, 8, generator=generator) * threshold * 0.8 + 0.3 * threshold
    spikes = if_neuron_soft_reset(currents, threshold)
    reference = spikingjelly_if_reference(currents.numpy(), np.float32(threshold))
    assert torch.equal(spikes, torch.from_numpy(reference))
    assert 0.1 < spikes.mean() < 0.9  # the currents exercise both firing and silence
    assert if_neuron_soft_reset(currents[:0], threshold).shape == (0, 3, 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoder", [
    IFEncoder(bits=5, gamma=0.9, signed=True), GIFEncoder(bits=6, levels=8),
    BitPlaneEncoder(bits=6, gamma=0.9, signed=True)], ids=["if", "gif", "bitplane"])
def test_forward_is_counts_times_step_with_straight_through_gradient(encoder, dtype):
    x = (torch.randn(4, 16, generator=torch.Generator().manual_seed(3)) * 3).to(dtype).requires_grad_()
    out = encoder(x)
    counts, step = encoder.encode(x)
    assert out.dtype == dtype and torch.equal(out, (counts * step).to(dtype))
    out.float().sum().backward()
    x32 = x.detach().float()
    scaled = x32 / step  # the clipping window of LSQ / PACT: x/Δ within [low, high] counts
    inside = (scaled >= encoder.min_count) & (scaled <= encoder.max_count)
    assert torch.equal(x.grad, inside.to(dtype))
    assert 0 < inside.float().mean() < 1  # negatives (unsigned) or the clipped tail (gamma < 1)


@pytest.mark.parametrize("encoder", [
    IFEncoder(bits=5, signed=True), GIFEncoder(bits=5, levels=4, signed=True),
    BitPlaneEncoder(bits=5, signed=True)], ids=["if", "gif", "bitplane"])
def test_spiking_linear_temporal_matches_collapsed(encoder):
    generator = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    layer = SpikingLinear(32, 12, bias=True, encoder=encoder)
    x = torch.randn(2, 6, 32, generator=generator) * 2
    torch.testing.assert_close(layer.forward_temporal(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,kwargs,key", [
    (IFEncoder, dict(bits=0), "bits"), (IFEncoder, dict(bits=17), "bits"),
    (IFEncoder, dict(bits=1, signed=True), "bits"), (IFEncoder, dict(bits=4.0), "bits"),
    (IFEncoder, dict(gamma=0.0), "gamma"), (IFEncoder, dict(gamma=1.01), "gamma"),
    (IFEncoder, dict(signed="false"), "signed"),
    (GIFEncoder, dict(levels=1), "levels"), (GIFEncoder, dict(levels=512), "levels"),
    (GIFEncoder, dict(levels=6), "levels"), (GIFEncoder, dict(bits=17), "bits"),
    (GIFEncoder, dict(gamma=-0.5), "gamma"), (GIFEncoder, dict(signed=1), "signed"),
    (BitPlaneEncoder, dict(bits="4"), "bits"), (BitPlaneEncoder, dict(bits=1, signed=True), "bits"),
    (BitPlaneEncoder, dict(gamma=2), "gamma"), (BitPlaneEncoder, dict(signed=None), "signed"),
])
def test_bad_parameters_name_the_key(cls, kwargs, key):
    with pytest.raises(ConfigError, match=f"^{key}="):
        cls(**kwargs)
