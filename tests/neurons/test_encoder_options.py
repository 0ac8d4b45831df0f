"""Options shared by every spike encoder (spikellm/neurons/base.py, DESIGN.md §2–§3): per-channel step
allocation (Optimal Brain Spiking), the ternary outlier stream, closed-form firing statistics, the
learnable step (LSQ), causal per-channel steps, and unrolled training with surrogate gradients.

Every test runs on every encoder kind below, on random and adversarial inputs."""
import math

import pytest
import torch

from spikellm.errors import ConfigError
from spikellm.neurons import BitPlaneEncoder, GIFEncoder, IFEncoder, TernaryEncoder
from spikellm.neurons.stats import spike_report, track_spikes
from spikellm.nn import SpikingLinear

C = 16  # channels (last dim) of every input
DTYPES = [torch.float32, torch.bfloat16]
# (class, kwargs, T with 1, 2 and 4 times the steps on the allocated channels), T worked out by hand
SPECS = [
    (TernaryEncoder, dict(bits=5), (15, 30, 60)),
    (TernaryEncoder, dict(bits=6, clip=4), (4, 8, 16)),
    (TernaryEncoder, dict(bits=6, clip=4, residual="outlier"), (4, 8, 16)),
    (IFEncoder, dict(bits=4, signed=True), (7, 14, 28)),
    (IFEncoder, dict(bits=3), (7, 14, 28)),
    (GIFEncoder, dict(bits=5, levels=4, signed=True), (5, 10, 20)),  # ceil(15/3), ceil(30/3), ceil(60/3)
    (GIFEncoder, dict(bits=5, levels=16), (3, 5, 9)),  # ceil(31/15), ceil(62/15), ceil(124/15)
    (BitPlaneEncoder, dict(bits=5, signed=True), (4, 5, 6)),  # bit_length(15), (30), (60)
    (BitPlaneEncoder, dict(bits=4), (4, 5, 6)),
]
IDS = [f"{cls.__name__}({','.join(f'{k}={v}' for k, v in kw.items())})" for cls, kw, _ in SPECS]

_g = torch.Generator().manual_seed(7)
MASK = torch.rand(C, generator=_g) < 0.4  # salient channels; channel 0 (where the bounds sit) is one
MASK[0], MASK[1] = True, False


@pytest.fixture(params=SPECS, ids=IDS)
def spec(request):
    return request.param


def make(spec, **extra):
    """A fresh encoder of the spec's kind (the options mutate encoders)."""
    cls, kwargs, _ = spec
    return cls(**{**kwargs, **extra})


def is_outlier_stream(encoder) -> bool:
    return isinstance(encoder, TernaryEncoder) and encoder.residual == "outlier" and encoder.clip is not None


def inputs(encoder, dtype=torch.float32):
    """Adversarial rows ``[R, C]`` and a random ``[B, T, C]`` batch.

    Each tie row starts with ``step_levels`` on channel 0, so the token step is exactly 1 and the
    row holds exact ties ``k + 1/2`` (and ``(k + 1/2) / m``: ties on channels given m times the steps).
    """
    g = torch.Generator().manual_seed(0)
    top = encoder.step_levels
    start = max(encoder.min_count, -7)
    span = min(C - 1, top - start)  # keep every tie below the header, so the step stays 1
    ties = start + torch.arange(C - 1) % span + 0.5
    rows = [torch.cat([torch.tensor([float(top)]), ties / m]) for m in (1, 2, 4)]
    rows += [
        torch.zeros(C),
        torch.full((C,), -3.0),  # all negative
        torch.linspace(-1, 1, C),
        torch.tensor([3e4] + [1e-3] * (C - 1)),  # one huge outlier
        torch.tensor([-3e4] + [1e-3] * (C - 1)),
        torch.randn(C, generator=g) * 1e-30,  # tiny
        *(torch.randn(4, C, generator=g) * 4),
    ]
    return [torch.stack(rows).to(dtype), (torch.randn(2, 5, C, generator=g) * 4).to(dtype)]


def bound(encoder) -> int:
    return max(-encoder.min_count, encoder.max_count)


class TestChannelAllocation:
    """Contract 1: ``allocate_channels(mask, addbit)`` gives the masked channels 2^addbit times the steps
    (step Δ/2^addbit, counts up to 2^addbit × the bound), leaves the other channels alone, keeps the
    train exact and the spiking layer's two forms equal, and is saved with the model."""

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("addbit", [1, 2])
    def test_allocation_keeps_the_train_exact(self, spec, addbit, dtype):
        encoder, m = make(spec), 2 ** addbit
        assert encoder.num_steps == spec[2][0]
        xs = inputs(encoder, dtype)
        before = [encoder.encode(x) for x in xs]
        encoder.allocate_channels(MASK, addbit)
        assert encoder.num_steps == encoder.steps_for(bound(encoder) * m) == spec[2][addbit]
        for x, (base_counts, base_step) in zip(xs, before):
            counts, step = encoder.encode(x)
            spikes, train_step = encoder.spike_train(x)
            assert spikes.shape == (encoder.num_steps, *x.shape) and torch.equal(step, train_step)
            assert torch.equal(encoder.decode(spikes), counts)
            assert torch.equal(counts, counts.round())
            base_step = base_step.expand_as(step)
            assert torch.equal(step[..., MASK], base_step[..., MASK] / m)
            assert torch.equal(step[..., ~MASK], base_step[..., ~MASK])
            assert torch.equal(counts[..., ~MASK], base_counts[..., ~MASK])  # untouched by the allocation
            salient = counts[..., MASK]
            assert salient.min() >= encoder.min_count * m and salient.max() <= encoder.max_count * m
        rows = encoder.encode(xs[0])[0]
        assert rows[:, 0].max() == encoder.max_count * m  # the allocated channel reaches m × the bound
        assert rows[:, ~MASK].max() <= encoder.max_count

    @pytest.mark.parametrize("addbit", [1, 2])
    def test_allocated_layer_temporal_equals_collapsed(self, spec, addbit):
        torch.manual_seed(0)
        layer = SpikingLinear(C, 8, bias=True, encoder=make(spec))
        layer.encoder.allocate_channels(MASK, addbit)
        for x in inputs(layer.encoder):
            torch.testing.assert_close(layer.forward_temporal(x), layer(x), rtol=1e-5, atol=1e-4)

    def test_allocation_is_a_saved_buffer(self, spec):
        layer = SpikingLinear(C, 8, encoder=make(spec))
        assert "encoder.channel_scale" not in layer.state_dict()
        layer.encoder.allocate_channels(MASK, 2)
        state = layer.state_dict()
        assert torch.equal(state["encoder.channel_scale"], torch.where(MASK, 4.0, 1.0))
        assert "channel_scale" in dict(layer.encoder.named_buffers())
        # it loads back into an encoder that already holds an allocation (any mask)
        other = SpikingLinear(C, 8, encoder=make(spec))
        other.encoder.allocate_channels(~MASK, 1)
        other.load_state_dict(state)
        assert other.encoder.num_steps == layer.encoder.num_steps
        for x in inputs(layer.encoder):
            assert torch.equal(other.encoder.encode(x)[0], layer.encoder.encode(x)[0])
            assert torch.equal(other(x), layer(x))

    def test_allocation_loads_into_a_fresh_encoder(self, spec):
        layer = SpikingLinear(C, 8, encoder=make(spec))
        layer.encoder.allocate_channels(MASK, 2)
        fresh = SpikingLinear(C, 8, encoder=make(spec))
        fresh.load_state_dict(layer.state_dict())
        assert torch.equal(fresh.encoder.channel_scale, layer.encoder.channel_scale)
        assert fresh.encoder.num_steps == layer.encoder.num_steps == spec[2][2]
        for x in inputs(layer.encoder):
            assert torch.equal(fresh.encoder.encode(x)[0], layer.encoder.encode(x)[0])
            assert torch.equal(fresh(x), layer(x))

    @pytest.mark.parametrize("mask,addbit,key", [
        (MASK.float(), 1, "salient"), (MASK.long(), 1, "salient"), (MASK.view(2, 8), 1, "salient"),
        (MASK, 9, "addbit"), (MASK, -1, "addbit"), (MASK, 1.0, "addbit"), (MASK, True, "addbit"),
    ], ids=["float", "long", "2d", "addbit9", "addbit-1", "addbit-float", "addbit-bool"])
    def test_bad_allocation_names_the_key(self, spec, mask, addbit, key):
        encoder = make(spec)
        with pytest.raises(ConfigError, match=f"^{key}="):
            encoder.allocate_channels(mask, addbit)
        assert encoder.channel_scale is None


class TestOutlierStream:
    """Contract 2: a ternary encoder with ``clip=c, residual="outlier"`` fires a c-step train and sends the
    rest of the unclipped count beside it, so counts + outliers equal the unclipped encoder's counts and
    the value is (counts + outliers)·Δ; every other encoder (``drop``, and the rate codes) has no stream."""

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("addbit", [0, 2])
    def test_outlier_stream_restores_the_unclipped_counts(self, spec, addbit, dtype):
        encoder = make(spec)
        unclipped = make(spec, clip=None) if isinstance(encoder, TernaryEncoder) else make(spec)
        if addbit:
            encoder.allocate_channels(MASK, addbit)
            unclipped.allocate_channels(MASK, addbit)
        m = 2 ** addbit
        if isinstance(encoder, TernaryEncoder) and encoder.clip is not None:
            assert encoder.num_steps == encoder.clip * m  # the train is only c steps
        low, high = encoder.count_bounds()
        for x in inputs(encoder, dtype):
            counts, step = encoder.encode(x)
            outliers = encoder.outlier_counts(x, step, counts)
            reference, reference_step = unclipped.encode(x)
            assert torch.equal(step, reference_step)
            if is_outlier_stream(encoder):
                assert torch.equal(counts + outliers, reference)
                assert not outliers[counts.abs() < high].any()  # only saturated neurons send outliers
            else:
                assert outliers is None
                assert torch.equal(counts, torch.clamp(reference, low, high))
            spikes, _ = encoder.spike_train(x)
            assert spikes.shape[0] == encoder.num_steps and torch.equal(encoder.decode(spikes), counts)
            total = counts if outliers is None else counts + outliers
            assert torch.equal(encoder(x), (total * step).to(dtype))
        if is_outlier_stream(encoder):
            assert (outliers != 0).any()  # the inputs exercise the stream

    @pytest.mark.parametrize("residual", ["keep", "Outlier", None])
    def test_unknown_residual_names_the_key(self, residual):
        with pytest.raises(ConfigError, match="^residual="):
            TernaryEncoder(bits=6, clip=4, residual=residual)


def active_span(encoder, spikes) -> int:
    """Steps after which every neuron of the train is quiet; MSB-first bit planes skip the leading
    empty planes, so there it is the steps from the first active plane on."""
    active = (spikes != 0).flatten(1).any(1).nonzero().flatten()
    if len(active) == 0:
        return 0
    if isinstance(encoder, BitPlaneEncoder):
        return spikes.shape[0] - int(active[0])
    return int(active[-1]) + 1


class TestStatistics:
    """Contract 3: ``track_spikes`` / ``spike_report`` give, from closed forms on the counts, the same
    numbers as counting the spike trains (a GIF spike is one non-zero multi-level step), over several
    batches of [R, C] and [B, T, C] inputs, without changing the output; stopping removes them."""

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("addbit", [0, 2])
    def test_statistics_equal_counting_the_train(self, spec, addbit, dtype):
        torch.manual_seed(0)
        layer = SpikingLinear(C, 8, encoder=make(spec)).to(dtype)
        encoder = layer.encoder
        if addbit:
            encoder.allocate_channels(MASK, addbit)
        extra = torch.randn(3, 4, C, generator=torch.Generator().manual_seed(1)) * 2
        batches = [*inputs(encoder, dtype), extra.to(dtype)]  # [R, C], [2, 5, C], [3, 4, C]
        untracked = [layer(x) for x in batches]
        track_spikes(layer)
        tracked = [layer(x) for x in batches]
        assert all(torch.equal(a, b) for a, b in zip(tracked, untracked))  # tracking changes nothing

        spikes = silent = events = span = 0
        all_counts = []
        for x in batches:
            counts, step = encoder.encode(x)
            train, _ = encoder.spike_train(x)
            outliers = encoder.outlier_counts(x, step, counts)
            spikes += int((train != 0).sum())
            silent += int((counts == 0).sum())
            events += 0 if outliers is None else int((outliers != 0).sum())
            span = max(span, active_span(encoder, train))
            all_counts.append(counts.flatten())
        counts = torch.cat(all_counts)
        activations = counts.numel()
        low = int(torch.as_tensor(encoder.count_bounds()[0]).min())
        high = int(torch.as_tensor(encoder.count_bounds()[1]).max())

        report = spike_report(layer)
        assert list(report) == ["encoder"]
        r = report["encoder"]
        assert r["activations"] == activations == sum(x.numel() for x in batches)
        assert r["tokens"] == len(batches[0]) + 2 * 5 + 3 * 4  # R, and B·T of each [B, T, C]
        assert r["spikes"] == spikes
        assert r["spikes_per_activation"] == spikes / activations
        assert r["firing_rate"] == spikes / (activations * encoder.num_steps)
        assert r["steps"] == encoder.num_steps
        assert r["silent_fraction"] == silent / activations
        assert r["max_abs_count"] == int(counts.abs().max())
        assert r["steps_used"] == span
        assert r["outlier_events"] == events
        assert (events > 0) == is_outlier_stream(encoder)
        expected = torch.bincount(counts.long() - low, minlength=high - low + 1)
        assert r["histogram"] == dict(zip(range(low, high + 1), expected.tolist()))
        assert sum(r["histogram"].values()) == activations

        track_spikes(layer, False)
        assert not encoder.observers and spike_report(layer) == {}
        assert torch.equal(layer(batches[0]), untracked[0])

    def test_statistics_are_tracked_when_training_unrolled(self, spec):
        layer = SpikingLinear(C, 8, encoder=make(spec), unroll=True)
        track_spikes(layer)
        x = inputs(layer.encoder)[1]
        layer(x)
        assert spike_report(layer)["encoder"]["activations"] == x.numel()


def lsq_reference(encoder, x, grad, scale):
    """The LSQ gradients (x, s) by hand, from the counts, the element step and the count window."""
    counts, step = encoder.encode(x)
    outliers = encoder.outlier_counts(x, step, counts)
    n = counts if outliers is None else counts + outliers
    low, high = encoder.count_bounds()
    if is_outlier_stream(encoder):  # the stream extends the window to the unclipped ±Q (per channel)
        m = 1 if encoder.channel_scale is None else encoder.channel_scale
        low, high = -encoder.step_levels * m, encoder.step_levels * m
    v = x.detach().float() / step
    inside = (v >= low) & (v <= high)  # Esser et al.: v/s clipped to [-Q_N, Q_P] before rounding
    g = 1.0 / math.sqrt(x[0].numel() * encoder.max_count)  # N_F: the features of one example
    d_step = torch.where(inside, n - v, n)
    return n * step, grad * inside.to(grad.dtype), g * (grad.float() * d_step * step / scale).sum()


class TestLearnedStep:
    """Contract 4: with ``learnable_step=True`` the value is still counts·Δ exactly, x's gradient is straight
    through the window, and ``step_scale`` gets the LSQ gradient (Esser et al. 2020)
    ``g · Σ grad · (inside ? n - x/Δ : n) · Δ/s`` with ``g = 1/sqrt(N_F · Q_P)`` (N_F the features
    of one example, inside = ``-Q_N <= x/Δ <= Q_P``), computed here by hand;
    SGD on the scale from a bad start lowers the reconstruction error."""

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("addbit", [0, 1])
    def test_learned_step_value_and_lsq_gradient(self, spec, addbit, dtype):
        encoder = make(spec, learnable_step=True)
        if addbit:
            encoder.allocate_channels(MASK, addbit)
        with torch.no_grad():
            encoder.step_scale.fill_(0.75)
        g = torch.Generator().manual_seed(3)
        for x in inputs(encoder, dtype):
            x = x.clone().requires_grad_()
            encoder.step_scale.grad = None
            out = encoder(x)
            grad = torch.randn(x.shape, generator=g).to(dtype)
            out.backward(grad)
            value, x_grad, scale_grad = lsq_reference(encoder, x, grad, 0.75)
            assert out.dtype == dtype and torch.equal(out, value.to(dtype))
            assert torch.equal(x.grad, x_grad)
            assert encoder.step_scale.grad.shape == ()
            torch.testing.assert_close(encoder.step_scale.grad, scale_grad, rtol=1e-5, atol=1e-7)
            # the step is the dynamic step times the scale
            plain = make(spec)
            if addbit:
                plain.allocate_channels(MASK, addbit)
            torch.testing.assert_close(encoder.encode(x)[1], plain.encode(x)[1] * 0.75, rtol=1e-6, atol=0)

    def test_lsq_gradient_for_a_negative_scale(self, spec):
        encoder = make(spec, learnable_step=True)
        with torch.no_grad():
            encoder.step_scale.fill_(-0.75)
        x = inputs(encoder)[1].requires_grad_()
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        encoder(x).backward(grad)
        torch.testing.assert_close(encoder.step_scale.grad, lsq_reference(encoder, x, grad, -0.75)[2])

    def test_sgd_on_the_step_scale_lowers_the_error(self, spec):
        encoder = make(spec, learnable_step=True)
        x = torch.randn(32, C, generator=torch.Generator().manual_seed(0)) * 2
        if not getattr(encoder, "signed", True):
            x = x.abs()  # unsigned codes drop negatives whatever the step
        with torch.no_grad():
            encoder.step_scale.fill_(4.0)
        optimizer = torch.optim.SGD([encoder.step_scale], lr=100.0)
        losses = []
        for _ in range(10):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(encoder(x), x)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < 0.97 * losses[0], losses
        assert encoder.step_scale.item() != 4.0


class TestChannelGranularity:
    """Contract 5: ``granularity="channel"`` gives every (token, channel) its own step, the running maximum
    of the channel over the tokens so far (causal: later tokens change nothing before them); the train
    still decodes to the counts and the spiking layer's two forms agree."""

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_channel_granularity_is_per_token_channel_and_causal(self, spec, dtype):
        encoder = make(spec, granularity="channel")
        rows, batch = inputs(encoder, dtype)
        g = torch.Generator().manual_seed(5)
        for x in (rows.unsqueeze(0), batch):  # [B, T, C]: the adversarial rows as one sequence
            counts, step = encoder.encode(x)
            assert step.shape == x.shape
            magnitude = x.float().abs() if getattr(encoder, "signed", True) else x.float().clamp_min(0)
            for t in range(x.shape[1]):
                expected = magnitude[:, : t + 1].amax(1).clamp_min(1e-8) / encoder.step_levels
                assert torch.equal(step[:, t], expected)
            spikes, _ = encoder.spike_train(x)
            assert torch.equal(encoder.decode(spikes), counts)
            assert counts.min() >= encoder.min_count and counts.max() <= encoder.max_count
            for t in (0, 2, x.shape[1] - 2):
                future = x.clone()
                future[:, t + 1:] = (torch.randn(future[:, t + 1:].shape, generator=g) * 1e3).to(dtype)
                future_counts, future_step = encoder.encode(future)
                assert torch.equal(future_counts[:, : t + 1], counts[:, : t + 1])
                assert torch.equal(future_step[:, : t + 1], step[:, : t + 1])
                assert not torch.equal(future_step, step)

    def test_channel_granularity_layer_temporal_equals_collapsed(self, spec):
        torch.manual_seed(0)
        layer = SpikingLinear(C, 8, bias=True, encoder=make(spec, granularity="channel"))
        for x in inputs(layer.encoder):
            x = x if x.dim() == 3 else x.unsqueeze(0)
            torch.testing.assert_close(layer.forward_temporal(x), layer(x), rtol=1e-5, atol=1e-4)

    @pytest.mark.parametrize("granularity", ["bogus", "tensor", None])
    def test_unknown_granularity_names_the_key(self, spec, granularity):
        with pytest.raises(ConfigError, match="^granularity="):
            make(spec, granularity=granularity)


def twin_layers(spec, addbit):
    torch.manual_seed(0)
    collapsed = SpikingLinear(C, 8, bias=True, encoder=make(spec))
    unrolled = SpikingLinear(C, 8, bias=True, encoder=make(spec), unroll=True)
    unrolled.load_state_dict(collapsed.state_dict())
    if addbit:
        for layer in (collapsed, unrolled):
            layer.encoder.allocate_channels(MASK, addbit)
    return collapsed, unrolled


class TestUnrolledTraining:
    """Contract 6: ``SpikingLinear(unroll=True)`` computes the collapsed layer's output and weight gradient;
    its input gradient is the ternary neuron's surrogate gradient (``surrogate_value``: exactly counts·Δ
    in value, finite and non-zero gradient at the thresholds), and the straight-through gradient for the
    encoders that fire from integer counts."""

    @pytest.mark.parametrize("addbit", [0, 2])
    def test_unrolled_layer_matches_collapsed(self, spec, addbit):
        collapsed, unrolled = twin_layers(spec, addbit)
        encoder = unrolled.encoder
        g = torch.Generator().manual_seed(6)
        for x in inputs(encoder):
            grad = torch.randn(*x.shape[:-1], 8, generator=g)
            results = []
            for layer in (collapsed, unrolled):
                layer.zero_grad()
                xg = x.clone().requires_grad_()
                out = layer(xg)
                out.backward(grad)
                results.append((out.detach(), layer.weight.grad.clone(), layer.bias.grad.clone(), xg.grad))
            (out_c, w_c, b_c, x_c), (out_u, w_u, b_u, x_u) = results
            torch.testing.assert_close(out_u, out_c, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(w_u, w_c, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(b_u, b_c)
            assert torch.isfinite(x_u).all()
            if isinstance(encoder, TernaryEncoder):
                xs = x.clone().requires_grad_()
                encoder.surrogate_value(xs).backward(grad @ unrolled.weight.detach())
                torch.testing.assert_close(x_u, xs.grad)  # the surrogate gradient, through W
            else:
                assert encoder.surrogate_value(x) is None
                torch.testing.assert_close(x_u, x_c)  # the collapsed straight-through gradient

    @pytest.mark.parametrize("addbit", [0, 2])
    def test_ternary_surrogate_value_is_exact_and_has_gradient_at_thresholds(self, spec, addbit):
        encoder = make(spec)
        if addbit:
            encoder.allocate_channels(MASK, addbit)
        if not isinstance(encoder, TernaryEncoder):
            assert encoder.surrogate_value(inputs(encoder)[1]) is None
            return
        for x in inputs(encoder):
            xs = x.clone().requires_grad_()
            value = encoder.surrogate_value(xs)
            counts, step = encoder.encode(x)
            assert torch.equal(value, counts * step)
            value.sum().backward()
            assert torch.isfinite(xs.grad).all()
        # activations a hair above each threshold k + 1/2 of their element step, inside the window
        scale = encoder.channel_scale if addbit else torch.ones(C)
        k = torch.arange(-encoder.max_count, encoder.max_count).float().view(-1, 1)
        x = (k + 0.5 + 1e-3) / scale
        x[:, 0] = encoder.step_levels  # the token bound: Δ = 1, so the element step is 1/scale
        counts, step = encoder.encode(x)
        torch.testing.assert_close((x / step)[:, 1:], (k + 0.5 + 1e-3).expand(-1, C - 1))
        xs = x.clone().requires_grad_()
        value = encoder.surrogate_value(xs)
        value.sum().backward()
        assert torch.equal(value, counts * step)
        assert torch.isfinite(xs.grad).all() and (xs.grad[:, 1:] != 0).all()

    def test_unrolled_layer_trains_the_learned_step(self, spec):
        torch.manual_seed(0)
        collapsed = SpikingLinear(C, 8, encoder=make(spec, learnable_step=True))
        unrolled = SpikingLinear(C, 8, encoder=make(spec, learnable_step=True), unroll=True)
        unrolled.load_state_dict(collapsed.state_dict())
        x = inputs(collapsed.encoder)[1]
        for layer in (collapsed, unrolled):
            layer(x).square().sum().backward()
        assert unrolled.encoder.step_scale.grad is not None
        if not isinstance(unrolled.encoder, TernaryEncoder):  # same value, same straight-through path
            torch.testing.assert_close(unrolled.encoder.step_scale.grad, collapsed.encoder.step_scale.grad)
