"""The fused CPU encoder (spikellm/ops/cpu_encode.c) computes what the PyTorch path computes.

Decoding one token at a time spends most of an encoder's time dispatching ~10 small tensor
operations, so eval-mode encoders on small CPU tensors run one C call instead. These tests hold
it to the contract every fused encoder has: equal, not close, to the library's own arithmetic,
including ties, NaN, infinities, zeros and allocated channels; used only where nothing but the
value is needed; and never a reason for a run to fail (no compiler: a warning and the PyTorch path).
"""
import copy
import math
import os

import pytest
import torch

from spikellm.neurons import BitPlaneEncoder, GIFEncoder, IFEncoder, TernaryEncoder
from spikellm.neurons.dispatch import fused_reason, kernel_reason
from spikellm.neurons.observers import find
from spikellm.neurons.stats import SpikeStats, track_spikes
from spikellm.ops import cpu_encode
from spikellm.ops.cpu_encode import encode_reference, fused_encode, fused_encode_channels

pytestmark = pytest.mark.skipif(cpu_encode.cpu_encoder() is None, reason="no C compiler here")


def exactly(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    # equal also in the sign of zero: the PyTorch path never gives -0.0
    zeros = expected == 0
    assert torch.equal(torch.signbit(actual[zeros]), torch.signbit(expected[zeros]))


def awkward_rows(cols: int, seed: int = 0) -> torch.Tensor:
    """Rows that probe each branch: ordinary, ties of the absmax step, all zero, -0.0, a NaN, ±inf,
    tiny (below the step floor) and huge values, a single non-zero."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(cols, generator=g) * 3, torch.zeros(cols), -torch.zeros(cols),
            torch.randn(cols, generator=g) * 1e-12, torch.randn(cols, generator=g) * 1e30]
    ties = (torch.randint(-15, 15, (cols,), generator=g) + 0.5) / 15.5  # k + 1/2 on the step of max 15.5/15.5
    ties[0] = 1.0
    rows.append(ties)
    for special in (math.nan, math.inf, -math.inf):
        row = torch.randn(cols, generator=g)
        row[cols // 2] = special
        rows.append(row)
    one = torch.zeros(cols)
    one[-1] = -2.5
    rows.append(one)
    return torch.stack(rows)


@pytest.mark.parametrize("cols", [1, 3, 17, 256, 1000])
@pytest.mark.parametrize("levels,low,high,signed", [(15, -15, 15, True), (7, -7, 7, True), (1, -1, 1, True),
                                                    (255, 0, 255, False), (127, -127, 127, True),
                                                    (32767, -32767, 32767, True)])
def test_fused_encode_equals_the_pytorch_arithmetic(cols, levels, low, high, signed):
    x = awkward_rows(cols)
    for got, want in zip(fused_encode(x, levels, low, high, signed, want_counts=True),
                         encode_reference(x, levels, low, high, signed)):
        exactly(got, want)


@pytest.mark.parametrize("shape", [(2, 3, 7), (1, 1, 1, 64), (4, 33), (0, 8)])
def test_given_steps_and_channel_multipliers_are_those_of_the_pytorch_path(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 2
    step = x.abs().mean(-1, keepdim=True).clamp_min(1e-8) / 3  # a mean-rule step: counts saturate
    scale = torch.where(torch.rand(shape[-1], generator=g) < 0.3, 4.0, 1.0)
    for kwargs in ({"step": step}, {"channel_scale": scale}, {"step": step, "channel_scale": scale}):
        for got, want in zip(fused_encode(x, 7, -7, 7, True, want_counts=True, **kwargs),
                             encode_reference(x, 7, -7, 7, True, **kwargs)):
            exactly(got, want)
    value, counts, step_out = fused_encode(x, 7, -7, 7, want_step=False)
    assert counts is None and step_out is None and value.shape == x.shape


def test_non_contiguous_inputs_are_read_in_their_logical_order():
    x = torch.randn(6, 40).t()  # [40, 6], strided
    exactly(fused_encode(x, 15, -15, 15)[0], encode_reference(x, 15, -15, 15)[0])
    exactly(cpu_encode.absmax_encoder(15, -15, 15)(x), encode_reference(x, 15, -15, 15)[0])


@pytest.mark.parametrize("signed", [True, False])
def test_one_token_of_a_channel_code_continues_the_running_bound(signed):
    """A cached decoding step of spiking keys: the last row of the per-channel (causal) code."""
    g = torch.Generator().manual_seed(2)
    sequence = torch.randn(2, 4, 9, 16, generator=g)
    sequence[0, 1, 4, 3] = math.nan
    sequence[1, 2, 8, 5] = math.inf
    previous = (sequence[..., :-1, :].abs() if signed else sequence[..., :-1, :].clamp_min(0)).amax(-2, keepdim=True)
    last = sequence[..., -1:, :]
    whole = sequence.abs() if signed else sequence.clamp_min(0)
    step = whole.cummax(-2).values.clamp_min(1e-8)[..., -1:, :] / 15
    low = -15 if signed else 0
    value, bound = fused_encode_channels(last, previous, 15, low, 15, signed)
    exactly(value, encode_reference(last, 15, low, 15, signed, step=step)[0])
    exactly(bound, torch.maximum(previous, whole[..., -1:, :]))
    first_value, first_bound = fused_encode_channels(last, None, 15, low, 15, signed)
    exactly(first_bound, whole[..., -1:, :])
    exactly(first_value, encode_reference(last, 15, low, 15, signed, step=whole[..., -1:, :].clamp_min(1e-8) / 15)[0])
    with pytest.raises(ValueError, match="one token"):
        fused_encode_channels(sequence, None, 15, low, 15, signed)


def test_inputs_it_does_not_take_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="float32 CPU tensor"):
        fused_encode(torch.randn(2, 4, dtype=torch.float64), 15, -15, 15)


# ---- the encoders use it where, and only where, it computes their forward -------------------------

ENCODERS = {
    "ternary": lambda: TernaryEncoder(bits=5),
    "ternary_gamma": lambda: TernaryEncoder(bits=4, gamma=0.9),
    "ternary_mean": lambda: TernaryEncoder(bits=5, threshold="mean", threshold_k=2.0),
    "ternary_learned": lambda: TernaryEncoder(bits=5, learnable_step=True),
    "ternary_clip_drop": lambda: TernaryEncoder(bits=5, clip=3),
    "ternary_clip_outlier": lambda: TernaryEncoder(bits=5, clip=3, residual="outlier"),
    "if_signed": lambda: IFEncoder(bits=4, signed=True),
    "if_unsigned": lambda: IFEncoder(bits=8),
    "gif": lambda: GIFEncoder(bits=4, levels=4, signed=True),
    "bitplane": lambda: BitPlaneEncoder(bits=6, signed=True),
}


def pytorch_encode(encoder, x):
    """The encoder's collapsed form in PyTorch: ``(counts, element step)``."""
    step = encoder.element_step(x)
    return encoder.counts(x, step, *encoder.count_bounds()), step


def pytorch_value(encoder, x):
    """What the PyTorch path's forward returns in evaluation: ``(n + outliers) · Δ``."""
    counts, step = pytorch_encode(encoder, x)
    outliers = encoder.outlier_counts(x, step, counts)
    return ((counts if outliers is None else counts + outliers) * step).to(x.dtype)


def used_fused(encoder, x, monkeypatch, *call) -> bool:
    """Whether ``encoder(x)`` (or ``encoder.<call[0]>(x, *call[1:])``) ran a C function."""
    calls = []
    rows, channels = cpu_encode.cpu_encoder()
    monkeypatch.setitem(cpu_encode._state, "functions", (lambda *a: calls.append(1) or rows(*a),
                                                         lambda *a: calls.append(1) or channels(*a)))
    for cached in ("_fused", "_fused_channels"):  # planned again, with the counting functions
        encoder.__dict__.pop(cached, None)
    getattr(encoder, call[0])(x, *call[1:]) if call else encoder(x)
    monkeypatch.setitem(cpu_encode._state, "functions", (rows, channels))
    for cached in ("_fused", "_fused_channels"):
        encoder.__dict__.pop(cached, None)
    return bool(calls)


@pytest.mark.parametrize("name", sorted(ENCODERS))
@pytest.mark.parametrize("allocation", [None, "shared", "separate"])
def test_encoder_forward_in_evaluation_equals_the_pytorch_path(name, allocation, monkeypatch):
    torch.manual_seed(3)
    encoder = ENCODERS[name]()
    x = torch.randn(3, 5, 48) * 2
    x[0, 0, 7] = 40.0  # an outlier channel
    if allocation:
        encoder.allocate_channels(torch.arange(48) % 7 == 0, addbit=2, separate=allocation == "separate")
    with torch.no_grad():
        exactly(encoder(x), pytorch_value(encoder, x))
        fused = used_fused(encoder, x, monkeypatch)
    expected = fused_reason(encoder) is None
    assert fused == expected, (name, allocation, fused_reason(encoder))


def test_forward_keeps_the_pytorch_path_where_more_than_the_value_is_needed(monkeypatch):
    encoder = TernaryEncoder(bits=5)
    x = torch.randn(2, 32)
    with torch.no_grad():
        assert used_fused(encoder, x, monkeypatch)
    # a gradient to pass straight through
    leaf = x.clone().requires_grad_()
    encoder(leaf).sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    # statistics: the forward records them
    track_spikes(encoder)
    with torch.no_grad():
        encoder(x)
    assert find(encoder, SpikeStats) is not None and find(encoder, SpikeStats).activations == x.numel()
    track_spikes(encoder, False)
    # a sibling recording its statistics from the shared train
    sibling = TernaryEncoder(bits=5)
    track_spikes(sibling)
    with torch.no_grad():
        exactly(encoder(x, siblings=(sibling,)), pytorch_value(encoder, x))
    assert find(sibling, SpikeStats).activations == x.numel()
    # larger tensors: PyTorch's vectorised, threaded operations
    big = torch.randn(cpu_encode.MAX_ELEMENTS // 64 + 1, 64)
    with torch.no_grad():
        assert not used_fused(encoder, big, monkeypatch) or big.numel() <= cpu_encode.MAX_ELEMENTS
        exactly(encoder(big), pytorch_value(encoder, big))


def test_a_changed_encoder_is_planned_again():
    """The plan is cached; setting an attribute, allocating channels or loading a state dict drops it."""
    encoder = TernaryEncoder(bits=5)
    x = torch.randn(4, 24) * 3
    with torch.no_grad():
        encoder(x)
        encoder.bits, encoder.step_levels, encoder.max_count, encoder.min_count = 3, 3, 3, -3
        exactly(encoder(x), pytorch_value(encoder, x))
        encoder.allocate_channels(torch.arange(24) < 4, addbit=1, separate=False)
        exactly(encoder(x), pytorch_value(encoder, x))
        other = TernaryEncoder(bits=3)
        other.allocate_channels(torch.arange(24) < 4, addbit=1, separate=False)
        other(x)
        other.load_state_dict({"channel_scale": encoder.channel_scale, "separate_clusters": torch.tensor(True)})
        assert fused_reason(other) == "separate per-cluster steps"
        exactly(other(x), pytorch_value(other, x))
        copied = copy.deepcopy(encoder)
        assert "_fused" not in copied.__dict__
        exactly(copied(x), pytorch_value(encoder, x))


def test_an_encoder_with_its_own_collapsed_form_keeps_the_pytorch_path(monkeypatch):
    """A new encoder that defines its own counts() (or magnitude()) is never handed to the fused
    encoders by default: they would compute the rounding it replaced."""

    class Floor(TernaryEncoder):
        def counts(self, x, step, low, high):
            return torch.floor(x.float() / step).clamp(low, high)

    class Squared(IFEncoder):
        def magnitude(self, x):
            return x.float() ** 2

    for encoder in (Floor(bits=5), Squared(bits=4)):
        assert "defines its own" in fused_reason(encoder) and kernel_reason(encoder) == fused_reason(encoder)
        x = torch.randn(3, 16)
        with torch.no_grad():
            assert not used_fused(encoder, x, monkeypatch)
            exactly(encoder(x), pytorch_value(encoder, x))


class FixedStep(TernaryEncoder):
    def step_size(self, x):
        return torch.full((*x.shape[:-1], 1), 0.25)


class WideBounds(IFEncoder):
    def count_bounds(self):
        return -3, 3


class Residual(TernaryEncoder):
    def outlier_counts(self, x, step, counts):
        return torch.ones_like(counts)


@pytest.mark.parametrize("cls", [FixedStep, WideBounds, Residual])
def test_an_encoder_overriding_any_part_of_its_collapsed_form_keeps_the_pytorch_path(cls, monkeypatch):
    encoder = cls(bits=4)
    x = torch.randn(4, 32) * 3
    assert "defines its own" in fused_reason(encoder)
    with torch.no_grad():
        assert not used_fused(encoder, x, monkeypatch)
        exactly(encoder(x), pytorch_value(encoder, x))


def test_buffers_changed_in_place_are_seen_on_the_next_call(monkeypatch):
    """Buffers change without an attribute being set: in place, by register_buffer, by .double(),
    by torch.func.functional_call. Each call checks them."""
    x = torch.randn(4, 32) * 3
    x[:, 3] *= 20
    mask = torch.arange(32) < 6
    with torch.no_grad():
        encoder = TernaryEncoder(bits=4)
        encoder.allocate_channels(mask, 2, separate=False)
        encoder(x)
        encoder.separate_clusters.fill_(True)
        exactly(encoder(x), pytorch_value(encoder, x))
        assert not used_fused(encoder, x, monkeypatch)

        plain = TernaryEncoder(bits=4)
        plain(x)
        plain.register_buffer("channel_scale", torch.where(mask, 4.0, 1.0))
        exactly(plain(x), pytorch_value(plain, x))
        plain._buffers["channel_scale"] = None
        exactly(plain(x), pytorch_value(plain, x))

        wide = TernaryEncoder(bits=4)
        wide.allocate_channels(mask, 1)
        wide(x)
        wide.double()  # float64 multipliers: PyTorch computes x / Δ in float64, the C code cannot
        exactly(wide(x), pytorch_value(wide, x))
        assert not used_fused(wide, x, monkeypatch)

        swapped = TernaryEncoder(bits=4)
        swapped.allocate_channels(mask, 2, separate=False)
        swapped(x)
        state = {"channel_scale": swapped.channel_scale, "separate_clusters": torch.tensor(True)}
        got = torch.func.functional_call(swapped, state, (x,))
        reference = TernaryEncoder(bits=4)
        reference.allocate_channels(mask, 2, separate=True)
        exactly(got, pytorch_value(reference, x))


def test_counts_beyond_two_to_the_24_keep_the_pytorch_path(monkeypatch):
    encoder = IFEncoder(bits=16, signed=True)
    encoder.channel_scale = torch.full((8,), 2.0 ** 20)  # set directly: allocate_channels stops at 2^8
    x = torch.randn(2, 8)
    with torch.no_grad():
        exactly(encoder(x), pytorch_value(encoder, x))
        assert not used_fused(encoder, x, monkeypatch)


def test_tracing_and_exporting_see_the_pytorch_operations():
    encoder = TernaryEncoder(bits=4).eval()
    x, other = torch.randn(3, 16), torch.randn(3, 16) * 5
    traced = torch.jit.trace(encoder, x)
    with torch.no_grad():
        exactly(traced(other), pytorch_value(encoder, other))
        exported = torch.export.export(encoder, (x,))
        exactly(exported.module()(other), pytorch_value(encoder, other))


def test_a_cached_key_step_is_fused_only_without_hooks(monkeypatch):
    encoder = TernaryEncoder(bits=5, granularity="channel")
    token, previous = torch.randn(1, 2, 1, 8), torch.rand(1, 2, 1, 8)
    with torch.no_grad():
        assert used_fused(encoder, token, monkeypatch, "encode_continued", previous)
        seen = []
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: seen.append(1))
        try:
            assert not used_fused(encoder, token, monkeypatch, "encode_continued", previous) and seen
        finally:
            handle.remove()
        big = torch.randn(1, 1, 1, cpu_encode.MAX_ELEMENTS + 1)
        assert not used_fused(encoder, big, monkeypatch, "encode_continued", None)


def test_settings_follow_the_attributes():
    a, b = TernaryEncoder(bits=5), TernaryEncoder(bits=5)
    assert a.settings() == b.settings()
    b.gamma = 0.5
    assert a.settings() != b.settings() and b.settings() == b.extra_repr()


# ---- building it: cached, rebuilt when damaged, never a failure ----------------------------------

@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A cache of its own, and the loaded encoder forgotten before and after."""
    monkeypatch.setenv("SPIKELLM_CACHE", str(tmp_path / "cache"))
    cpu_encode.reset()
    yield tmp_path / "cache" / "compiled"
    monkeypatch.undo()
    cpu_encode.reset()


def test_it_is_built_once_and_then_loaded_from_the_cache(fresh, monkeypatch):
    assert cpu_encode.cpu_encoder() is not None
    built = list(fresh.glob("cpu_encode-*.so"))
    assert len(built) == 1 and not list(fresh.glob("*.tmp"))
    cpu_encode.reset()
    monkeypatch.setattr(cpu_encode, "_build", lambda *a: pytest.fail("built again"))
    assert cpu_encode.cpu_encoder() is not None


def test_a_damaged_cached_library_is_built_again(fresh):
    """A library truncated by a full disk, or copied from another machine, is replaced (never
    written in place: a process that has it loaded keeps its copy)."""
    target = cpu_encode.library_path(cpu_encode._compiler())
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a shared object")
    assert cpu_encode.cpu_encoder() is not None
    assert target.read_bytes()[:4] == b"\x7fELF" or target.stat().st_size > 1000
    x = torch.randn(2, 8)
    exactly(fused_encode(x, 15, -15, 15)[0], encode_reference(x, 15, -15, 15)[0])


def test_the_library_is_readable_by_others_sharing_the_cache(fresh):
    cpu_encode.cpu_encoder()
    (library,) = fresh.glob("cpu_encode-*.so")
    umask = os.umask(0)
    os.umask(umask)
    assert library.stat().st_mode & 0o755 == 0o755 & ~umask


def test_a_compiler_given_with_arguments_is_used(fresh, monkeypatch, tmp_path):
    wrapper = tmp_path / "wrap"
    wrapper.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\nexec "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", f"{wrapper} {cpu_encode._compiler()[0]}")
    assert cpu_encode.cpu_encoder() is not None
    assert "cpu_encode.c" in (tmp_path / "args").read_text()


@pytest.mark.parametrize("problem", ["no compiler", "compiler fails", "unwritable cache", "no home", "turned off"])
def test_without_it_a_warning_says_why_and_encoders_give_the_same_numbers(problem, fresh, monkeypatch, tmp_path,
                                                                            caplog):
    if problem == "no compiler":
        monkeypatch.setattr(cpu_encode, "_compiler", lambda: None)
    elif problem == "compiler fails":
        fake = tmp_path / "cc"
        fake.write_text("#!/bin/sh\necho 'cc: error: out of licences' >&2\nexit 1\n")
        fake.chmod(0o755)
        monkeypatch.setenv("CC", str(fake))
    elif problem == "unwritable cache":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where the cache directory should be")
        monkeypatch.setenv("SPIKELLM_CACHE", str(blocker / "cache"))
    elif problem == "no home":
        monkeypatch.delenv("SPIKELLM_CACHE")
        monkeypatch.setattr(cpu_encode.Path, "expanduser", lambda self: (_ for _ in ()).throw(
            RuntimeError("Could not determine home directory.")))
    else:
        monkeypatch.setenv("SPIKELLM_CPU_ENCODER", "0")
    encoder = TernaryEncoder(bits=5)
    x = torch.randn(3, 16)
    with caplog.at_level("WARNING", logger="spikellm.ops.cpu_encode"), torch.no_grad():
        value = encoder(x)
        encoder(x)
    assert cpu_encode.cpu_encoder() is None
    exactly(value, pytorch_value(encoder, x))
    warnings = [r.getMessage() for r in caplog.records]
    if problem == "turned off":
        assert not warnings and "SPIKELLM_CPU_ENCODER=0" in cpu_encode.unavailable_reason()
        return
    assert len(warnings) == 1 and "PyTorch path" in warnings[0], warnings
    hint = {"no compiler": "install gcc or clang", "compiler fails": "out of licences",
            "unwritable cache": "SPIKELLM_CACHE", "no home": "home directory"}[problem]
    assert hint in warnings[0]
    with pytest.raises(RuntimeError, match="unavailable"):
        fused_encode(x, 15, -15, 15)


def test_the_source_is_shipped_with_the_package():
    from spikellm.ops import cpu_encode as module

    assert module.SOURCE.is_file() and os.path.dirname(module.__file__) == str(module.SOURCE.parent)
