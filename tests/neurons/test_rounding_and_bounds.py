"""Signed spike codes are symmetric at ties, and a zero γ-quantile keeps a sane step.

1. Signed counts round half away from zero, ``n = sign(v) · floor(|v| + 1/2)``, so
   ``counts(-x) == -counts(x)`` exactly, also at ties ``x / Δ = ±(k + 1/2)``. Every form that must
   agree bit for bit agrees: the collapsed form of each encoder, the temporal ternary neuron (with
   and without membrane clipping, per-channel limits, saturation), its surrogate value, the
   count-driven rate / GIF / bit-plane trains, and the fused Triton encoder with its reference.
2. A token whose γ-quantile of ``|x|`` is zero (ReLU-sparse inputs) takes its absmax as the bound,
   instead of a 1e-8 step that saturates every non-zero at ±Q.
"""
import math

import pytest
import torch

from spikellm.kernels import encode_counts, encode_counts_reference
from spikellm.neurons import BitPlaneEncoder, GIFEncoder, IFEncoder, TernaryEncoder
from spikellm.neurons.functional import quantile_bound, ternary_spike_train, ternary_surrogate_value
from spikellm.nn import SpikingLinear
from spikellm.nn.kernel_linear import use_kernels
from spikellm.nn.packed import PackedWeight
from spikellm.ops.rounding import quantize_counts, round_half_away, round_half_up
from spikellm.quant import RoundToNearest

pytestmark = pytest.mark.usefixtures("one_thread")

C = 24


def exact_half_away(v: torch.Tensor) -> torch.Tensor:
    """The oracle: ``sign(v) · floor(|v| + 1/2)`` in float64, where ``|v| + 1/2`` of an fp32 ``v`` is
    exact below 2^52 (and above 2^23 every fp32 is already an integer)."""
    v64 = v.double()
    return (v64.sign() * torch.floor(v64.abs() + 0.5)).float()


def near_half_values() -> torch.Tensor:
    """fp32 ties ``k + 1/2``, their neighbours one ulp either side, and zeros, tiny and huge values."""
    ties = torch.arange(-9, 9).float() + 0.5
    hairs = [torch.nextafter(ties, torch.full_like(ties, direction)) for direction in (-math.inf, math.inf)]
    others = torch.tensor([0.0, -0.0, 0.3, -0.3, 1e7 + 0.5, -1e7 - 0.5, 2.0 ** 23 + 1, -(2.0 ** 30), 3e38, -3e38,
                           1e-30, -1e-30])
    return torch.cat([others, ties, *hairs])


# ---- 1. rounding half away from zero ---------------------------------------------------------

def test_round_half_away_is_exact_and_symmetric():
    v = torch.cat([near_half_values(), torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 40])
    got = round_half_away(v)
    assert torch.equal(got, exact_half_away(v))
    assert torch.equal(round_half_away(-v), -got)
    # ties leave zero; the hair below a tie does not; no negative zero comes out of a small negative
    assert round_half_away(torch.tensor([0.5, -0.5, -2.5, 2.5])).tolist() == [1.0, -1.0, -3.0, 3.0]
    below_half = torch.nextafter(torch.tensor(0.5), torch.tensor(0.0))
    assert round_half_away(torch.stack([below_half, -below_half])).tolist() == [0.0, 0.0]
    assert not torch.signbit(round_half_away(torch.tensor([-0.3, -0.0]))).any()
    # non-finite values go through as before: ±inf stays, NaN stays
    special = round_half_away(torch.tensor([math.inf, -math.inf, math.nan]))
    assert special[0] == math.inf and special[1] == -math.inf and special[2].isnan()
    # round_half_up (weights, fixed point, GPTQ) keeps its own tie rule
    assert round_half_up(torch.tensor([-2.5, 2.5])).tolist() == [-2.0, 3.0]


def test_quantize_counts_rounds_half_away_and_saturates():
    v = near_half_values()
    step = torch.tensor(1.0)
    assert torch.equal(quantize_counts(v, step, -1e9, 1e9), exact_half_away(v).clamp(-1e9, 1e9))
    assert torch.equal(quantize_counts(-v, step, -7, 7), -quantize_counts(v, step, -7, 7))
    # unsigned codes clamp at 0, so they are what round half up gave
    assert torch.equal(quantize_counts(v, step, 0, 15), round_half_up(v).clamp(0, 15))
    saturated = quantize_counts(torch.tensor([math.inf, -math.inf, math.nan]), step, -7, 7)
    assert saturated[:2].tolist() == [7.0, -7.0] and saturated[2].isnan()


def test_quantize_counts_fast_path_equals_the_oracle_on_every_float_near_a_tie():
    """quantize_counts clamps first and rounds by ``trunc(v + frac(v))`` (fewer, vectorised passes):
    equal to the float64 oracle on every fp32 within 2^12 ulps of each tie up to the bound, on
    random bit patterns of every magnitude, and it gives no negative zero."""
    top = 2 ** 15
    ties = torch.cat([torch.arange(0, 64).float(), torch.tensor([255.0, 4095.0, top - 2.0, top - 1.0])]) + 0.5
    offsets = torch.arange(-2 ** 12, 2 ** 12, dtype=torch.int32)
    near = (ties.view(torch.int32).unsqueeze(1) + offsets).flatten().view(torch.float32)
    random_bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (1 << 20,), generator=torch.Generator().manual_seed(0),
                                dtype=torch.int64).to(torch.int32).view(torch.float32)
    v = torch.cat([near, -near, random_bits[torch.isfinite(random_bits)]])
    got = quantize_counts(v, torch.tensor(1.0), -top, top)
    assert torch.equal(got, exact_half_away(v).clamp(-top, top))
    assert not (torch.signbit(got) & (got == 0)).any()


def test_spikes_per_count_fast_forms_are_exact():
    """GIF's ceil(|n| / (L-1)) in float and the float popcount equal integer arithmetic."""
    from spikellm.neurons.rate_functional import gif_spikes_per_count, popcount

    counts = torch.arange(-2 ** 16, 2 ** 16 + 1)
    for levels in (2, 3, 4, 8, 16, 256):
        expected = (counts.abs() + levels - 2) // (levels - 1)
        assert torch.equal(gif_spikes_per_count(counts.float(), levels), expected.float())
    bits = torch.zeros_like(counts)
    for bit in range(17):
        bits += (counts.abs() >> bit) & 1
    assert torch.equal(popcount(counts.float()), bits.float())
    assert torch.equal(popcount(counts.float(), bits=17), bits.float())
    assert popcount(torch.tensor([math.nan])).isnan().all()


SIGNED_ENCODERS = [
    (TernaryEncoder, dict(bits=4)),
    (TernaryEncoder, dict(bits=6)),
    (TernaryEncoder, dict(bits=6, clip=4)),
    (TernaryEncoder, dict(bits=6, clip=4, residual="outlier")),
    (TernaryEncoder, dict(bits=5, gamma=0.9)),
    (IFEncoder, dict(bits=4, signed=True)),
    (GIFEncoder, dict(bits=5, levels=4, signed=True)),
    (BitPlaneEncoder, dict(bits=5, signed=True)),
]
SIGNED_IDS = [f"{cls.__name__}({','.join(f'{k}={v}' for k, v in kw.items())})" for cls, kw in SIGNED_ENCODERS]


def tie_rows(encoder, scales=(1, 2, 4)) -> torch.Tensor:
    """Rows whose token step is exactly 1 (``step_levels`` on channel 0, the only maximum) holding the
    ties ``±(k + 1/2) / m`` of every count magnitude, ``m`` the steps a channel may be given."""
    top = encoder.step_levels
    ties = torch.arange(-top, top).float() + 0.5  # -(Q - 1/2) .. Q - 1/2
    rows = []
    for m in scales:
        for start in range(0, len(ties), C - 1):
            chunk = ties[start:start + C - 1]
            rows.append(torch.cat([torch.tensor([float(top)]), chunk / m, torch.zeros(C - 1 - len(chunk))]))
    return torch.stack(rows)


def check_symmetric(encoder, x):
    counts, step = encoder.encode(x)
    negative, negative_step = encoder.encode(-x)
    assert torch.equal(step, negative_step)
    assert torch.equal(negative, -counts)
    outliers = encoder.outlier_counts(x, step, counts)
    if outliers is not None:  # the full value, train plus outlier stream, is symmetric too
        assert torch.equal(encoder.outlier_counts(-x, step, negative), -outliers)
    assert torch.equal(encoder(-x), -encoder(x))
    for sign, expected in ((1, counts), (-1, negative)):
        spikes, train_step = encoder.spike_train(sign * x)
        assert torch.equal(train_step, step)
        assert torch.equal(encoder.decode(spikes), expected)
        assert torch.equal(encoder.spikes_per_count(expected), (spikes != 0).float().sum(0))
    return counts, step


@pytest.mark.parametrize("cls,kwargs", SIGNED_ENCODERS, ids=SIGNED_IDS)
def test_signed_counts_are_symmetric_at_ties(cls, kwargs):
    encoder = cls(**kwargs)
    x = tie_rows(encoder, scales=(1,))
    counts, step = check_symmetric(encoder, x)
    if encoder.gamma == 1.0:
        assert torch.equal(step, torch.ones_like(step))
        # every tie ±(k + 1/2) goes to ±(k + 1), clamped at the encoder's bound
        assert torch.equal(counts, exact_half_away(x).clamp(encoder.min_count, encoder.max_count))
    check_symmetric(encoder, torch.randn(3, 5, C, generator=torch.Generator().manual_seed(1)) * 4)


@pytest.mark.parametrize("cls,kwargs", SIGNED_ENCODERS, ids=SIGNED_IDS)
def test_signed_counts_are_symmetric_at_ties_of_allocated_channels(cls, kwargs):
    encoder = cls(**kwargs)
    mask = torch.arange(C) % 3 == 0  # channel 0, where the bound sits, is one
    encoder.allocate_channels(mask, addbit=2)
    x = tie_rows(encoder)
    counts, step = check_symmetric(encoder, x)
    if encoder.gamma == 1.0:
        low, high = encoder.count_bounds()
        assert torch.equal(counts, torch.minimum(torch.maximum(exact_half_away(x / step), low), high))


@pytest.mark.parametrize("cls", [IFEncoder, GIFEncoder, BitPlaneEncoder])
def test_unsigned_counts_still_round_ties_up(cls):
    encoder = cls(bits=4)
    x = torch.tensor([[15.0, 0.5, 2.5, 14.5, -0.5, -2.5, 3.49999976]])  # step 1
    counts, _ = encoder.encode(x)
    assert counts.tolist() == [[15, 1, 3, 15, 0, 0, 3]]
    spikes, _ = encoder.spike_train(x)
    assert torch.equal(encoder.decode(spikes), counts)


# ---- the temporal ternary neuron ------------------------------------------------------------

def adversarial_membranes(top: int) -> torch.Tensor:
    """Membranes ``x / Δ`` (with Δ = 1) to fire: every tie up to and past ``top``, the hairs around
    them, the clip limits, huge and infinite values, zero, and a NaN."""
    integers = torch.arange(0, top + 2).float()
    ties = integers + 0.5
    hairs = [torch.nextafter(ties, torch.full_like(ties, direction)) for direction in (-math.inf, math.inf)]
    values = torch.cat([ties, *hairs, integers, torch.tensor([2.0 ** 23 + 1, 3e38, math.inf, 1e-30])])
    return torch.cat([values, -values, torch.tensor([-0.0, math.nan])])


@pytest.mark.parametrize("num_steps,limit", [(7, None), (7, 7), (7, 3), (15, 15), (15, "channel")])
def test_ternary_train_decodes_exactly_with_symmetric_ties(num_steps, limit):
    x = adversarial_membranes(num_steps)
    if limit == "channel":  # per-channel limits, as channels given fewer steps than T have
        limit = torch.tensor([15.0, 8.0, 4.0, 1.0]).repeat(len(x) // 4 + 1)[:len(x)]
    bound = num_steps if limit is None else limit
    step = torch.tensor(1.0)
    spikes = ternary_spike_train(x, step, num_steps, limit=limit)
    counts = quantize_counts(x, step, -bound, bound)
    finite = ~x.isnan()
    assert torch.equal(spikes.sum(0)[finite], counts[finite])
    assert (spikes[:, ~finite] == 0).all() and counts[~finite].isnan().all()  # NaN: no spike, a NaN count
    # a neuron fires one sign only: its count never changes sign on the way
    assert not ((spikes > 0).any(0) & (spikes < 0).any(0)).any()
    # symmetric: the mirrored membrane fires the mirrored train
    assert torch.equal(ternary_spike_train(-x, step, num_steps, limit=limit)[:, finite], -spikes[:, finite])
    # the surrogate form is the same neuron, step for step
    xs = x[finite].clone().requires_grad_()
    limit_s = limit[finite] if isinstance(limit, torch.Tensor) else limit
    value = ternary_surrogate_value(xs, step, num_steps, limit=limit_s)
    assert torch.equal(value.detach(), counts[finite])


def test_ternary_tie_trains_fire_towards_the_tie_sign():
    x = torch.tensor([0.5, -0.5, 2.5, -2.5, 0.49999997, -0.49999997])
    spikes = ternary_spike_train(x, torch.tensor(1.0), 4)
    assert spikes.T.tolist() == [[1, 0, 0, 0], [-1, 0, 0, 0], [1, 1, 1, 0], [-1, -1, -1, 0], [0] * 4, [0] * 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [dict(bits=4), dict(bits=6, clip=4), dict(bits=6, clip=4, residual="outlier")])
def test_ternary_surrogate_value_is_symmetric_at_ties(kwargs, dtype):
    encoder = TernaryEncoder(**kwargs)
    x = tie_rows(encoder, scales=(1,)).to(dtype)
    values = []
    for sign in (1, -1):
        xs = (sign * x).clone().requires_grad_()
        value = encoder.surrogate_value(xs)
        counts, step = encoder.encode(sign * x)
        assert torch.equal(value, counts * step)
        value.sum().backward()
        assert torch.isfinite(xs.grad).all()
        values.append(value.detach())
    assert torch.equal(values[1], -values[0])


# ---- the fused Triton encoder ---------------------------------------------------------------

# (levels, low, high, signed): ternary b4, clipped ternary, signed b5, unsigned b4
KERNEL_ENCODINGS = [(7, -7, 7, True), (15, -6, 6, True), (15, -15, 15, True), (15, 0, 15, False)]


@pytest.mark.parametrize("levels,low,high,signed", KERNEL_ENCODINGS,
                         ids=[f"L{e[0]}[{e[1]},{e[2]}]" for e in KERNEL_ENCODINGS])
def test_kernel_encoder_rounds_ties_as_the_library(levels, low, high, signed):
    ties = torch.arange(-levels, levels).float() + 0.5
    header = torch.tensor([float(levels)])  # the bound: step 1 (signed and unsigned)
    x = torch.stack([torch.cat([header, ties]), torch.cat([header, -ties])])  # the ties, then mirrored
    k = x.shape[1]
    scale = torch.where(torch.arange(k) % 3 == 1, 4.0, 1.0)
    for channel_scale in (None, scale):
        rows = x if channel_scale is None else x / scale  # channel 0 keeps scale 1 and the bound
        ref = encode_counts_reference(rows, levels, low, high, signed, channel_scale=channel_scale)
        got = encode_counts(rows, levels, low, high, signed, channel_scale=channel_scale)
        assert torch.equal(got[1], ref[1]) and torch.equal(got[1], torch.ones(2, 1))
        assert torch.equal(got[0].float(), ref[0])
        assert torch.equal(got[2], ref[2]) and torch.equal(got[3], ref[3])
        lo, hi = (low, high) if channel_scale is None else (low * channel_scale, high * channel_scale)
        element_step = 1.0 if channel_scale is None else 1.0 / channel_scale
        expected = torch.minimum(torch.maximum(exact_half_away(rows / element_step), torch.as_tensor(lo)),
                                 torch.as_tensor(hi))
        assert torch.equal(ref[0], expected)
        if signed:
            assert torch.equal(got[0][1, 1:], -got[0][0, 1:])


# ---- 2. a zero γ-quantile -------------------------------------------------------------------

def sparse_tokens(tokens=6, channels=64, zero_fraction=0.7, seed=0) -> torch.Tensor:
    """ReLU-sparse activations: ``zero_fraction`` of each token exactly 0, the rest Gaussian."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g) * 3
    zeros = int(channels * zero_fraction)
    for row in x:
        row[torch.randperm(channels, generator=g)[:zeros]] = 0.0
    return x


def test_zero_quantile_falls_back_to_the_absmax():
    x = sparse_tokens()
    magnitude = x.abs()
    assert (magnitude.kthvalue(32, dim=-1).values == 0).all()  # the 0.5 quantile of each token is 0
    assert torch.equal(quantile_bound(magnitude, 0.5), magnitude.amax(-1, keepdim=True))
    # a token whose quantile is not zero keeps it; an all-zero token keeps a zero bound
    dense = torch.arange(1.0, 11.0)
    assert quantile_bound(torch.stack([dense, torch.zeros(10)]), 0.5).tolist() == [[5.0], [0.0]]


@pytest.mark.parametrize("encoder", [TernaryEncoder(bits=5, gamma=0.5), IFEncoder(bits=5, gamma=0.5, signed=True),
                                     TernaryEncoder(bits=5, gamma=0.5, clip=8, residual="outlier")],
                         ids=["ternary", "if-signed", "ternary-outlier"])
def test_sparse_tokens_keep_their_values(encoder):
    x = sparse_tokens()
    value = encoder(x)
    relative = ((value - x).norm(dim=-1) / x.norm(dim=-1)).max().item()
    assert relative < 0.1, relative
    assert (value[x == 0] == 0).all()
    # an all-zero token stays silent, with a finite step
    counts, step = encoder.encode(torch.zeros(2, 64))
    assert (counts == 0).all() and torch.isfinite(step).all() and (step > 0).all()


def test_unsigned_sparse_tokens_keep_their_values():
    x = sparse_tokens().abs()  # post-ReLU: non-negative, 70 % zeros
    value = IFEncoder(bits=4, gamma=0.5)(x)
    assert ((value - x).norm(dim=-1) / x.norm(dim=-1)).max().item() < 0.1


def test_sparse_spiking_linear_output_is_close_to_dense():
    torch.manual_seed(0)
    x = sparse_tokens(tokens=8)
    layer = SpikingLinear(64, 32, encoder=TernaryEncoder(bits=5, gamma=0.5))
    dense = torch.nn.functional.linear(x, layer.weight)
    with torch.no_grad():
        out = layer(x)
        temporal = layer.forward_temporal(x)
    assert ((out - dense).norm() / dense.norm()).item() < 0.1
    torch.testing.assert_close(temporal, out, rtol=1e-5, atol=1e-4)


def test_sparse_kernel_path_equals_the_float_path():
    torch.manual_seed(0)
    x = sparse_tokens(tokens=8)
    layer = SpikingLinear(64, 32, bias=True, encoder=TernaryEncoder(bits=5, gamma=0.5),
                          weight_quantizer=RoundToNearest(bits=8)).eval()
    scales, integers = layer.weight_quantizer.scales_and_integers(layer.weight)
    layer.packed = PackedWeight.from_integers(integers.reshape(32, 64), scales.reshape(32, 1), fmt="int8")
    dense = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        expected = layer(x)
        assert use_kernels(layer) == {"": True}
        got = layer(x)
    assert layer.kernel_forward is not None
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    assert ((got - dense).norm() / dense.norm()).item() < 0.1
