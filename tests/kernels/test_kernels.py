"""The Triton kernels of spikellm.kernels, each against its pure-PyTorch reference (kernels/).

- packing: int4 / ternary / int8 packing round trips, Triton unpacking equal to the reference;
- spike_encode: the fused encoder equal (not close) to its reference and to the library's own
  encoders (the collapsed form of every uniform-count encoder);
- spike_linear: exact int32 sums, equal bit for bit to the reference, for counts and trains.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), which is slow,
so the shapes are small and odd. The ``gpu`` tests run the same checks on CUDA tensors; to exercise
the compiled kernels rather than the interpreter, run them as ``TRITON_INTERPRET=0 pytest -m gpu``.
"""
import pytest
import torch

from spikellm.kernels import (encode_counts, encode_counts_reference, kernels_usable, pack_weights, packed_width,
                              spike_linear, spike_linear_reference, unpack_weights, unpack_weights_reference)
from spikellm.neurons import BitPlaneEncoder, GIFEncoder, IFEncoder, TernaryEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

RANGES = {"int4": (-8, 7), "ternary": (-1, 1), "int8": (-128, 127)}
PACK_SHAPES = [(1, 1), (3, 5), (7, 33), (5, 1029)]
ENCODE_SHAPES = [(1, 1), (3, 7), (5, 130)]
LINEAR_SHAPES = [(1, 1, 1), (3, 17, 65), (17, 65, 129)]  # (M, N, K): around the 16 × 64 × 64 tiles


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- packing ---------------------------------------------------------------------------------

def check_pack_round_trip(fmt, n, k, device):
    low, high = RANGES[fmt]
    q = torch.randint(low, high + 1, (n, k), generator=gen(n * 1000 + k))
    q[0, 0], q[-1, -1] = low, high  # both ends of the range always present
    q = q.to(device)
    packed = pack_weights(q, fmt)
    assert packed.shape == (n, packed_width(k, fmt))
    assert packed.dtype == (torch.int8 if fmt == "int8" else torch.uint8)
    assert packed.device.type == torch.device(device).type
    reference = unpack_weights_reference(packed, k, fmt)
    kernel = unpack_weights(packed, k, fmt)
    assert reference.dtype == kernel.dtype == torch.int8
    assert torch.equal(reference.long(), q.long())
    assert torch.equal(kernel, reference)


@pytest.mark.parametrize("n,k", PACK_SHAPES, ids=[f"{n}x{k}" for n, k in PACK_SHAPES])
@pytest.mark.parametrize("fmt", list(RANGES))
def test_pack_round_trip(fmt, n, k):
    check_pack_round_trip(fmt, n, k, "cpu")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.float32])
def test_pack_takes_any_integer_valued_dtype(dtype):
    q = torch.randint(-8, 8, (3, 5), generator=gen(1))
    for fmt in RANGES:
        clipped = q.clamp(*RANGES[fmt])
        assert torch.equal(pack_weights(clipped.to(dtype), fmt), pack_weights(clipped, fmt))


def test_packed_layout_is_the_documented_one():
    # int4: two's complement nibbles, low nibble first, last byte zero-padded
    assert pack_weights(torch.tensor([[1, -1, 7]]), "int4").tolist() == [[0xF1, 0x07]]
    assert pack_weights(torch.tensor([[-8, 0]]), "int4").tolist() == [[0x08]]
    # ternary: q + 1 in 2-bit fields, lowest bits first; the padding holds the value 0 (code 1)
    assert pack_weights(torch.tensor([[-1, 0, 1, 1, 1]]), "ternary").tolist() == [
        [0 | 1 << 2 | 2 << 4 | 2 << 6, 2 | 1 << 2 | 1 << 4 | 1 << 6]]
    # int8: as is
    assert pack_weights(torch.tensor([[-128, 5, 127]]), "int8").tolist() == [[-128, 5, 127]]


@pytest.mark.parametrize("k,widths", [(1, (1, 1, 1)), (2, (1, 1, 2)), (4, (2, 1, 4)), (5, (3, 2, 5)),
                                      (33, (17, 9, 33)), (1029, (515, 258, 1029))])
def test_packed_width(k, widths):
    assert tuple(packed_width(k, fmt) for fmt in ("int4", "ternary", "int8")) == widths


@pytest.mark.parametrize("fmt,bad", [("int4", 8), ("int4", -9), ("ternary", 2), ("ternary", -2), ("int8", 128),
                                     ("int8", -129), ("int8", 1000)])
def test_out_of_range_weights_raise(fmt, bad):
    q = torch.zeros(3, 5, dtype=torch.int64)
    q[1, 2] = bad
    with pytest.raises(ValueError, match=fmt):
        pack_weights(q, fmt)


@pytest.mark.parametrize("fmt,bad", [("int4", 2 ** 16 + 1), ("int8", 2 ** 16 - 1), ("ternary", -(2 ** 16) + 1)])
def test_out_of_range_weights_beyond_int16_raise(fmt, bad):
    """Values that wrap into range when narrowed to 16 bits (65537 -> 1) are out of range all the same."""
    q = torch.zeros(3, 5, dtype=torch.int64)
    q[1, 2] = bad
    with pytest.raises(ValueError, match=fmt):
        pack_weights(q, fmt)


def test_pack_takes_a_matrix():
    with pytest.raises(ValueError, match="2-D"):
        pack_weights(torch.zeros(5, dtype=torch.int8), "int4")


@pytest.mark.parametrize("call", [
    lambda: pack_weights(torch.zeros(2, 3), "int2"),
    lambda: unpack_weights(torch.zeros(2, 3, dtype=torch.uint8), 5, "int2"),
    lambda: unpack_weights_reference(torch.zeros(2, 3, dtype=torch.uint8), 5, "int2"),
    lambda: packed_width(5, "int2"),
], ids=["pack", "unpack", "unpack_reference", "packed_width"])
def test_unknown_format_raises(call):
    with pytest.raises(ValueError, match="unknown weight format 'int2'"):
        call()


def test_kernels_usable():
    assert kernels_usable("cpu")  # under the interpreter (conftest)
    assert kernels_usable("cuda")


# ---- fused encoder ---------------------------------------------------------------------------

def assert_encoded_equal(got, ref, bound):
    counts, step, mass, nonzero = got
    assert counts.dtype == (torch.int8 if bound <= 127 else torch.int32)
    assert torch.equal(counts.float(), ref[0])
    assert torch.equal(step, ref[1])
    assert torch.equal(mass, ref[2])
    assert torch.equal(nonzero, ref[3])


def tie_rows(k: int, levels: int) -> torch.Tensor:
    """Rows whose step is exactly 1 (``levels`` on channel 0) and every other value a tie ``j + 1/2``."""
    ties = (torch.arange(k) % (2 * levels)).float() - levels + 0.5  # in (-levels, levels)
    rows = torch.stack([ties, -ties])
    rows[:, 0] = levels
    return rows


# (levels, low, high, signed): ternary bits 4, clipped ternary, signed GIF/IF b5, unsigned IF b4, >127 bound
ENCODINGS = [(7, -7, 7, True), (15, -6, 6, True), (15, -15, 15, True), (15, 0, 15, False), (255, -255, 255, True),
             (511, 0, 511, False)]


@pytest.mark.parametrize("m,k", ENCODE_SHAPES, ids=[f"{m}x{k}" for m, k in ENCODE_SHAPES])
@pytest.mark.parametrize("levels,low,high,signed", ENCODINGS,
                         ids=[f"L{e[0]}[{e[1]},{e[2]}]" for e in ENCODINGS])
def test_encode_equals_reference(m, k, levels, low, high, signed):
    g = gen(m * 100 + k + levels)
    x = torch.randn(m, k, generator=g) * 3
    if k > 1:
        x = torch.cat([x, tie_rows(k, levels)])
    scale = torch.where(torch.rand(k, generator=g) < 0.3, 4.0, 1.0)
    given = torch.rand(x.shape[0], generator=g) * 0.5 + 0.01
    for channel_scale in (None, scale):
        bound = max(abs(low), abs(high)) * (1 if channel_scale is None else 4)
        for step in (None, given):
            ref = encode_counts_reference(x, levels, low, high, signed, step=step, channel_scale=channel_scale)
            got = encode_counts(x, levels, low, high, signed, step=step, channel_scale=channel_scale)
            assert_encoded_equal(got, ref, bound)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_encode_half_inputs(dtype):
    x = (torch.randn(6, 67, generator=gen(3)) * 5).to(dtype)
    for levels, low, high, signed in [(7, -7, 7, True), (15, 0, 15, False)]:
        ref = encode_counts_reference(x, levels, low, high, signed)
        got = encode_counts(x, levels, low, high, signed)
        assert_encoded_equal(got, ref, max(abs(low), abs(high)))
        # the kernel reads the half-precision input directly, as the reference reads its fp32 copy
        assert_encoded_equal(encode_counts(x.float(), levels, low, high, signed), ref, max(abs(low), abs(high)))


def test_encode_edge_rows():
    """An all-zero row (step floored at 1e-8), an all-negative row (unsigned: no spikes), huge values."""
    x = torch.tensor([[0.0, 0.0, 0.0], [-1.0, -2.0, -3.0], [1e30, -1e30, 1.0]])
    for levels, low, high, signed in [(7, -7, 7, True), (15, 0, 15, False)]:
        ref = encode_counts_reference(x, levels, low, high, signed)
        got = encode_counts(x, levels, low, high, signed)
        assert_encoded_equal(got, ref, max(abs(low), abs(high)))
        assert got[2][0] == 0 and got[3][0] == 0
    assert torch.equal(encode_counts(x, 15, 0, 15, False)[0][1], torch.zeros(3, dtype=torch.int8))


def test_encode_takes_a_matrix():
    with pytest.raises(ValueError, match="x \\[M, K\\]"):
        encode_counts(torch.randn(2, 3, 4), 7, -7, 7)


ENCODERS = [
    (TernaryEncoder, dict(bits=4)),
    (TernaryEncoder, dict(bits=5, clip=6)),
    (TernaryEncoder, dict(bits=4, gamma=0.9)),
    (GIFEncoder, dict(bits=5, levels=4, signed=True)),
    (IFEncoder, dict(bits=4)),  # unsigned
    (IFEncoder, dict(bits=3, signed=True, gamma=0.75)),
    (BitPlaneEncoder, dict(bits=5, signed=True)),
]
ENCODER_IDS = [f"{cls.__name__}({','.join(f'{k}={v}' for k, v in kw.items())})" for cls, kw in ENCODERS]


def kernel_encode(encoder, x, channel_scale=None):
    """What the kernel path of a SpikingLinear calls (spikellm/nn/kernel_linear.py)."""
    step = encoder.token_step(x).reshape(-1) if encoder.gamma < 1.0 or encoder.step_scale is not None else None
    return encode_counts(x, encoder.step_levels, encoder.min_count, encoder.max_count,
                         signed=encoder.min_count < 0, step=step, channel_scale=channel_scale)


@pytest.mark.parametrize("cls,kwargs", ENCODERS, ids=ENCODER_IDS)
def test_encode_equals_library_encoders(cls, kwargs):
    encoder = cls(**kwargs)
    g = gen(11)
    x = torch.cat([torch.randn(5, 37, generator=g) * 2, tie_rows(37, encoder.step_levels)])
    counts, step = encoder.encode(x)
    got, got_step, mass, nonzero = kernel_encode(encoder, x)
    assert torch.equal(got.float(), counts)
    assert torch.equal(got_step, step)
    assert torch.equal(mass, counts.abs().sum(-1))
    assert torch.equal(nonzero, (counts != 0).sum(-1).float())

    # Optimal Brain Spiking: allocated channels get 4 times the steps (Δ/4, bounds ×4)
    mask = torch.rand(37, generator=g) < 0.3
    mask[0] = True
    encoder.allocate_channels(mask, addbit=2)
    counts, element_step = encoder.encode(x)
    got, got_step, _, _ = kernel_encode(encoder, x, encoder.channel_scale)
    assert torch.equal(got.float(), counts)
    assert torch.equal(got_step, encoder.token_step(x))
    assert torch.equal(element_step, got_step / encoder.channel_scale)


# ---- spike-driven linear ---------------------------------------------------------------------

def linear_case(m, n, k, rate, seed, device="cpu", low=-7, high=7):
    g = gen(seed)
    spikes = (torch.randint(low, high + 1, (m, k), generator=g) * (torch.rand(m, k, generator=g) < rate)).to(torch.int8)
    weight = torch.randint(-8, 8, (n, k), generator=g).to(torch.int8)
    step, weight_scale, bias = torch.rand(m, generator=g), torch.rand(n, generator=g), torch.randn(n, generator=g)
    return [t.to(device) for t in (spikes, weight, step, weight_scale, bias)]


def check_linear(m, n, k, rate, with_bias, device):
    spikes, weight, step, weight_scale, bias = linear_case(m, n, k, rate, m * n * k + int(rate * 100), device)
    bias = bias if with_bias else None
    got = spike_linear(spikes, weight, step, weight_scale, bias)
    ref = spike_linear_reference(spikes.cpu(), weight.cpu(), step.cpu(), weight_scale.cpu(),
                                 None if bias is None else bias.cpu())
    assert got.shape == (m, n) and got.dtype == torch.float32 and got.device.type == torch.device(device).type
    assert torch.equal(got.cpu(), ref)
    if rate == 0.0:  # nothing fires: every tile is skipped, the output is the bias alone
        expected = torch.zeros(m, n) if bias is None else bias.cpu().expand(m, n)
        assert torch.equal(got.cpu(), expected)


RATES = [0.0, 0.05, 0.5, 1.0]


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("m,n,k", LINEAR_SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in LINEAR_SHAPES])
def test_spike_linear_equals_reference(m, n, k, rate, with_bias):
    check_linear(m, n, k, rate, with_bias, "cpu")


def check_train(m, n, k, rate, device):
    g = gen(m + n + k)
    steps = 4
    train = (torch.randint(-1, 2, (steps, m, k), generator=g)
             * (torch.rand(steps, m, k, generator=g) < rate)).to(torch.int8).to(device)
    _, weight, step, weight_scale, bias = linear_case(m, n, k, 1.0, m + n + k, device)
    for time_weights in (None, torch.tensor([8, 4, 2, 1]), torch.tensor([1, 3, 0, 2])):
        got = spike_linear(train, weight, step, weight_scale, bias, time_weights)
        ref = spike_linear_reference(train.cpu(), weight.cpu(), step.cpu(), weight_scale.cpu(), bias.cpu(),
                                     time_weights)
        assert torch.equal(got.cpu(), ref)
        # the decoded counts Σ_t w_t s_t give the very same sums
        tw = torch.ones(steps, dtype=torch.int64) if time_weights is None else time_weights
        counts = (train.cpu().long() * tw.view(-1, 1, 1)).sum(0).to(torch.int8)
        assert torch.equal(got, spike_linear(counts.to(device), weight, step, weight_scale, bias))


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("m,n,k", LINEAR_SHAPES[1:], ids=[f"{m}x{n}x{k}" for m, n, k in LINEAR_SHAPES[1:]])
def test_spike_linear_trains(m, n, k, rate):
    check_train(m, n, k, rate, "cpu")


PACKED_SHAPES = [(1, 1, 1), (3, 17, 65), (17, 65, 130), (5, 3, 7)]  # K odd, K ≡ 2 mod 4, K < a byte's fields


def check_packed_linear(m, n, k, fmt, rate, device):
    """Packed int4 / ternary / int8 weights, unpacked tile by tile in the kernel, sum as the integers do."""
    spikes, _, step, weight_scale, bias = linear_case(m, n, k, rate, m * n + k, device)
    low, high = RANGES[fmt]
    integers = torch.randint(low, high + 1, (n, k), generator=gen(n + k)).to(torch.int8)
    packed = pack_weights(integers, fmt).to(device)
    ref = spike_linear_reference(spikes.cpu(), integers, step.cpu(), weight_scale.cpu(), bias.cpu())
    got = spike_linear(spikes, packed, step, weight_scale, bias, weight_format=fmt)
    assert torch.equal(got.cpu(), ref)
    assert torch.equal(got, spike_linear(spikes, integers.to(device), step, weight_scale, bias))  # int8 path
    train = torch.stack([spikes.clamp(-1, 1), -spikes.clamp(-1, 1), spikes.clamp(0, 1)])  # a [3, M, K] train
    tw = torch.tensor([4, 2, 1])
    ref = spike_linear_reference(train.cpu(), integers, step.cpu(), weight_scale.cpu(), None, tw)
    assert torch.equal(spike_linear(train, packed, step, weight_scale, None, tw, weight_format=fmt).cpu(), ref)


@pytest.mark.parametrize("rate", [0.05, 1.0])
@pytest.mark.parametrize("fmt", list(RANGES))
@pytest.mark.parametrize("m,n,k", PACKED_SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in PACKED_SHAPES])
def test_spike_linear_reads_packed_weights(m, n, k, fmt, rate):
    check_packed_linear(m, n, k, fmt, rate, "cpu")


def test_spike_linear_packed_weight_errors():
    spikes, integers = torch.ones(3, 5, dtype=torch.int8), torch.ones(4, 5, dtype=torch.int8)
    ones3, ones4 = torch.ones(3), torch.ones(4)
    with pytest.raises(ValueError, match="unknown weight format 'int2'"):
        spike_linear(spikes, integers, ones3, ones4, weight_format="int2")
    with pytest.raises(TypeError, match="uint8"):  # int8 integers are not packed int4
        spike_linear(spikes, integers, ones3, ones4, weight_format="int4")
    with pytest.raises(TypeError, match="int8"):  # packed bytes are not int8 integers
        spike_linear(spikes, pack_weights(integers, "int4"), ones3, ones4)
    with pytest.raises(ValueError, match="5 channels"):  # int4 rows of 5 weights are 3 bytes
        spike_linear(spikes, pack_weights(torch.ones(4, 7), "int4"), ones3, ones4, weight_format="int4")
    with pytest.raises(ValueError, match="5 channels"):
        spike_linear(spikes, pack_weights(torch.ones(4, 5), "ternary")[:, :1].contiguous(), ones3, ones4,
                     weight_format="ternary")


def test_spike_linear_on_encoder_trains():
    """A bit-plane encoder's train with weights 2^(T-1-t) sums exactly as its counts do."""
    encoder = BitPlaneEncoder(bits=5, signed=True)
    x = torch.randn(7, 45, generator=gen(5))
    counts, step = encoder.encode(x)
    train, _ = encoder.spike_train(x)
    assert train.shape[0] == encoder.num_steps == 4
    _, weight, _, weight_scale, bias = linear_case(7, 19, 45, 1.0, 5)
    tw = encoder.time_weights().to(torch.int32)
    from_train = spike_linear(train.to(torch.int8), weight, step.reshape(-1), weight_scale, bias, tw)
    from_counts = spike_linear(counts.to(torch.int8), weight, step.reshape(-1), weight_scale, bias)
    assert torch.equal(from_train, from_counts)
    assert torch.equal(from_train, spike_linear_reference(counts, weight, step.reshape(-1), weight_scale, bias))


def test_spike_linear_skips_silent_tiles_exactly():
    """Silent 16-row blocks and 64-column chunks (whole tiles of zeros) next to firing ones."""
    spikes, weight, step, weight_scale, bias = linear_case(40, 70, 200, 0.5, 9)
    spikes[16:32] = 0  # a whole row block silent
    spikes[:, 64:128] = 0  # a whole K chunk silent
    ref = spike_linear_reference(spikes, weight, step, weight_scale, bias)
    assert torch.equal(spike_linear(spikes, weight, step, weight_scale, bias), ref)
    assert torch.equal(ref[16:32], bias.expand(16, 70))
    # smaller tiles change nothing
    assert torch.equal(spike_linear(spikes, weight, step, weight_scale, bias, block_m=16, block_n=16, block_k=16), ref)


def test_spike_linear_extreme_values_are_exact():
    """±127 counts × -128 weights over K = 1029: sums near 1.7e7 stay exact integers."""
    k = 1029
    spikes = torch.full((2, k), 127, dtype=torch.int8)
    spikes[1] = -127
    weight = torch.full((3, k), -128, dtype=torch.int8)
    weight[1] = 127
    ones = torch.ones(3)
    got = spike_linear(spikes, weight, torch.ones(2), ones)
    assert torch.equal(got, spike_linear_reference(spikes, weight, torch.ones(2), ones))
    assert got[0, 0].item() == 127 * -128 * k


@pytest.mark.parametrize("spikes_dtype,weight_dtype", [(torch.int16, torch.int8), (torch.float32, torch.int8),
                                                       (torch.int8, torch.int32), (torch.int8, torch.float32),
                                                       (torch.uint8, torch.int8)])
def test_spike_linear_type_errors(spikes_dtype, weight_dtype):
    spikes = torch.ones(3, 5, dtype=spikes_dtype)
    weight = torch.ones(4, 5, dtype=weight_dtype)
    with pytest.raises(TypeError, match="int8"):
        spike_linear(spikes, weight, torch.ones(3), torch.ones(4))
    with pytest.raises(TypeError, match="int8"):  # a train too
        spike_linear(spikes.unsqueeze(0), weight, torch.ones(3), torch.ones(4))


def test_spike_linear_shape_mismatch():
    with pytest.raises(ValueError, match="5 channels"):
        spike_linear(torch.ones(3, 5, dtype=torch.int8), torch.ones(4, 6, dtype=torch.int8), torch.ones(3),
                     torch.ones(4))
    with pytest.raises(ValueError, match="5 channels"):
        spike_linear(torch.ones(2, 3, 5, dtype=torch.int8), torch.ones(4, 6, dtype=torch.int8), torch.ones(3),
                     torch.ones(4))


# ---- the same comparisons on CUDA tensors ----------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestOnCuda:
    @pytest.mark.parametrize("fmt", list(RANGES))
    def test_pack_round_trip(self, fmt):
        for n, k in [*PACK_SHAPES, (257, 4099)]:
            check_pack_round_trip(fmt, n, k, "cuda")

    @pytest.mark.parametrize("levels,low,high,signed", ENCODINGS)
    def test_encode_equals_reference(self, levels, low, high, signed):
        g = gen(levels)
        for m, k in [*ENCODE_SHAPES, (300, 4097)]:
            x = torch.randn(m, k, generator=g) * 3
            if k > 1:
                x = torch.cat([x, tie_rows(k, levels)])
            scale = torch.where(torch.rand(k, generator=g) < 0.3, 4.0, 1.0)
            for channel_scale in (None, scale):
                for step in (None, torch.rand(x.shape[0], generator=g) + 0.01):
                    ref = encode_counts_reference(x, levels, low, high, signed, step=step, channel_scale=channel_scale)
                    got = encode_counts(x.cuda(), levels, low, high, signed,
                                        step=None if step is None else step.cuda(),
                                        channel_scale=None if channel_scale is None else channel_scale.cuda())
                    bound = max(abs(low), abs(high)) * (1 if channel_scale is None else 4)
                    assert_encoded_equal([t.cpu() for t in got], ref, bound)

    @pytest.mark.parametrize("cls,kwargs", ENCODERS, ids=ENCODER_IDS)
    def test_encode_equals_library_encoders(self, cls, kwargs):
        encoder = cls(**kwargs).cuda()
        x = torch.randn(33, 517, generator=gen(2)).cuda() * 2
        counts, step = encoder.encode(x)
        got, got_step, _, _ = kernel_encode(encoder, x)
        assert torch.equal(got.float(), counts)
        assert torch.equal(got_step, step)

    @pytest.mark.parametrize("with_bias", [False, True])
    @pytest.mark.parametrize("rate", RATES)
    def test_spike_linear_equals_reference(self, rate, with_bias):
        for m, n, k in [*LINEAR_SHAPES, (200, 300, 1029)]:
            check_linear(m, n, k, rate, with_bias, "cuda")

    @pytest.mark.parametrize("fmt", list(RANGES))
    def test_spike_linear_reads_packed_weights(self, fmt):
        for m, n, k in [*PACKED_SHAPES, (100, 129, 1029)]:
            for rate in (0.0, 0.05, 1.0):
                check_packed_linear(m, n, k, fmt, rate, "cuda")

    @pytest.mark.parametrize("rate", RATES)
    def test_spike_linear_trains(self, rate):
        for m, n, k in [*LINEAR_SHAPES[1:], (100, 129, 257)]:
            check_train(m, n, k, rate, "cuda")
