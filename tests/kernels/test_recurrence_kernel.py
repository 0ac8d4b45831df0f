"""The MLGRU's gated linear recurrence ``h_t = f_t ⊙ h_{t-1} + x_t`` (kernels/recurrence.py).

- the Triton kernels against the PyTorch reference: states, final state and the gradients of
  forget, inputs and initial, over odd shapes (masked channel blocks, T = 1), fp32 / fp16 / bf16;
- the reference's custom backward (a reverse scan) against plain autograd through the loop;
- chunking invariance: a run continued from the previous chunk's final state equals one run
  (token-by-token inference relies on it);
- the fixed-point variant: kernel equal to reference bit for bit (negative values, rounding ties,
  int32 saturation), and within t/2 units of the exact recurrence after t steps;
- shape, dtype and argument errors.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes
are small. The interpreter converts fp32 → bf16 by truncation, not round-to-nearest-even as
PyTorch and the GPU do, so bf16 outputs can differ by one bf16 ulp; and the kernel's backward
reads the previous states in the input dtype (the reference keeps them in fp32), so fp16 / bf16
``d forget`` differ by about one ulp of that dtype: hence the looser half-precision tolerances.
The ``gpu`` tests rerun the comparisons on CUDA tensors; to exercise the compiled kernels rather
than the interpreter, run them as ``TRITON_INTERPRET=0 pytest -m gpu``.
"""
import pytest
import torch

import spikellm.kernels.recurrence as rec
from spikellm.kernels.recurrence import (fixed_point_recurrence, fixed_point_recurrence_reference, linear_recurrence,
                                         linear_recurrence_reference, recurrence)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(1, 1, 1), (2, 7, 5), (1, 2, 64), (3, 33, 130), (2, 1, 130)]  # (B, T, D): D = 130 spans two blocks
SHAPE_IDS = [f"{b}x{t}x{d}" for b, t, d in SHAPES]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32: the same roundings in the same order (no FMA), so equal in practice; the bound is a margin
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=4e-3, atol=1e-3),
              torch.bfloat16: dict(rtol=3e-2, atol=1e-2)}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlgru_case(b, t, d, dtype, seed, with_initial=True, device="cpu"):
    """Gates σ(·) in (0, 1), inputs (1 - f) ⊙ c as the MLGRU forms them, an fp32 initial state."""
    g = gen(seed)
    forget = torch.sigmoid(torch.randn(b, t, d, generator=g) + 1.0)
    inputs = (1 - forget) * torch.randn(b, t, d, generator=g) * 2
    initial = torch.randn(b, d, generator=g) if with_initial else None
    tensors = [forget.to(dtype), inputs.to(dtype), initial]
    return [None if x is None else x.to(device).requires_grad_() for x in tensors]


def run_with_grads(fn, forget, inputs, initial, seed=0):
    """``(states, final, d forget, d inputs, d initial)`` for a random upstream gradient on both outputs."""
    states, final = fn(forget, inputs, initial)
    g = gen(seed)
    dstates = torch.randn(states.shape, generator=g).to(states.device, states.dtype)
    dfinal = torch.randn(final.shape, generator=g).to(final.device)
    leaves = [x for x in (forget, inputs, initial) if x is not None]
    grads = torch.autograd.grad((states.float() * dstates.float()).sum() + (final * dfinal).sum(), leaves)
    grads = list(grads) + ([None] if initial is None else [])
    return [states, final, *grads]


def check_kernel_against_reference(b, t, d, dtype, with_initial, device, **kernel_kwargs):
    forget, inputs, initial = mlgru_case(b, t, d, dtype, b * 1000 + t * 10 + d, with_initial, device)
    got = run_with_grads(lambda *a: linear_recurrence(*a, **kernel_kwargs), forget, inputs, initial)
    cpu = [None if x is None else x.detach().cpu().requires_grad_() for x in (forget, inputs, initial)]
    ref = run_with_grads(linear_recurrence_reference, *cpu)
    states, final = got[:2]
    assert states.shape == (b, t, d) and states.dtype == dtype and states.device.type == torch.device(device).type
    assert final.shape == (b, d) and final.dtype == torch.float32
    tolerance = TOLERANCES[dtype]
    for name, a, r in zip(["states", "final", "d forget", "d inputs", "d initial"], got, ref):
        if r is None:
            assert a is None
            continue
        assert a.dtype == r.dtype, name
        # the final state and d initial are fp32 sums of the same terms in both
        tol = TOLERANCES[torch.float32] if r.dtype == torch.float32 else tolerance
        torch.testing.assert_close(a.cpu(), r, **tol, msg=lambda m: f"{name}: {m}")


# ---- float recurrence: kernel against reference ----------------------------------------------

@pytest.mark.parametrize("with_initial", [False, True], ids=["zeros", "initial"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("b,t,d", SHAPES, ids=SHAPE_IDS)
def test_kernel_equals_reference(b, t, d, dtype, with_initial):
    check_kernel_against_reference(b, t, d, dtype, with_initial, "cpu")


def test_kernel_small_channel_blocks():
    """Many programs per sequence (blocks of 16 channels, the last one masked)."""
    check_kernel_against_reference(2, 9, 37, torch.float32, True, "cpu", block_d=16)


def test_kernel_mixed_dtypes_and_strides():
    """bf16 gates, fp32 inputs, an fp16 initial state, non-contiguous views: each keeps its own dtype."""
    g = gen(4)
    forget = torch.sigmoid(torch.randn(3, 5, 11, generator=g)).to(torch.bfloat16).transpose(0, 1)  # [5, 3, 11]
    inputs = torch.randn(11, 3, 5, generator=g).permute(2, 1, 0)
    initial = torch.randn(11, 5, generator=g).half().T
    leaves = [x.detach().requires_grad_() for x in (forget, inputs, initial)]
    got = run_with_grads(linear_recurrence, *leaves)
    ref = run_with_grads(linear_recurrence_reference, *[x.detach().requires_grad_() for x in (forget, inputs, initial)])
    assert [x.dtype for x in got] == [torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float16]
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, **TOLERANCES[a.dtype])


def test_kernel_without_grad_and_with_partial_grad():
    forget, inputs, initial = mlgru_case(2, 6, 9, torch.float32, 5)
    with torch.no_grad():
        states, final = linear_recurrence(forget, inputs, initial)
    assert states.grad_fn is None and final.grad_fn is None
    # only the states used: d final materialises as zeros
    forget = forget.detach()
    states, _ = linear_recurrence(forget, inputs, initial)
    got = torch.autograd.grad(states.sum(), (inputs, initial))
    states, _ = linear_recurrence_reference(forget, inputs, initial)
    ref = torch.autograd.grad(states.sum(), (inputs, initial))
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, **TOLERANCES[torch.float32])


# ---- the reference's custom backward ---------------------------------------------------------

@pytest.mark.parametrize("with_initial", [False, True], ids=["zeros", "initial"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_reference_backward_equals_autograd_through_the_loop(dtype, with_initial):
    for b, t, d in [(1, 1, 1), (3, 17, 29)]:
        leaves = mlgru_case(b, t, d, dtype, t + d, with_initial)
        custom = run_with_grads(linear_recurrence_reference, *leaves, seed=t)
        plain = run_with_grads(rec._linear_recurrence_loop, *leaves, seed=t)
        for a, r in zip(custom, plain):
            if r is None:
                assert a is None
            else:  # the same fp32 operations: equal, not close
                assert a.dtype == r.dtype and torch.equal(a, r)


def test_reference_is_one_autograd_node():
    """The loop runs outside autograd: both outputs hang off one node, whatever T."""
    forget, inputs, initial = mlgru_case(2, 50, 3, torch.float16, 1)
    states, final = linear_recurrence_reference(forget, inputs, initial)
    assert states.grad_fn is final.grad_fn
    assert type(states.grad_fn).__name__ == "_ReferenceScanBackward"
    assert {type(fn).__name__ for fn, _ in states.grad_fn.next_functions if fn is not None} == {"AccumulateGrad"}


def test_reference_values():
    """A hand-computed case: f = 1/2, x = 1, h_0 = 4 → 3, 2.5, 2.25."""
    forget = torch.full((1, 3, 2), 0.5)
    inputs = torch.ones(1, 3, 2)
    initial = torch.full((1, 2), 4.0)
    for fn in (linear_recurrence_reference, linear_recurrence):
        states, final = fn(forget, inputs, initial)
        assert states[0, :, 0].tolist() == [3.0, 2.5, 2.25]
        assert final.tolist() == [[2.25, 2.25]]
        states, final = fn(forget, inputs)  # zeros: 1, 1.5, 1.75
        assert states[0, :, 1].tolist() == [1.0, 1.5, 1.75]


def test_recurrence_dispatches_to_the_reference_on_cpu(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton kernel is for CUDA tensors")

    monkeypatch.setattr(rec, "linear_recurrence", no_kernel)
    forget, inputs, initial = mlgru_case(2, 4, 3, torch.float32, 2)
    got = recurrence(forget, inputs, initial)
    ref = linear_recurrence_reference(forget, inputs, initial)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert type(got[0].grad_fn).__name__ == "_ReferenceScanBackward"


# ---- chunking: what token-by-token inference relies on ---------------------------------------

def check_chunking(fn, forget, inputs, initial):
    states, final = fn(forget, inputs, initial)
    half = forget.shape[1] // 2
    first, carried = fn(forget[:, :half], inputs[:, :half], initial)
    second, final_chunked = fn(forget[:, half:], inputs[:, half:], carried)
    assert torch.equal(torch.cat([first, second], 1), states)
    assert torch.equal(final_chunked, final)
    h, steps = initial, []
    for t in range(forget.shape[1]):  # one token at a time
        step, h = fn(forget[:, t:t + 1], inputs[:, t:t + 1], h)
        steps.append(step)
    assert torch.equal(torch.cat(steps, 1), states)
    assert torch.equal(h, final)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("fn", [linear_recurrence_reference, linear_recurrence], ids=["reference", "kernel"])
def test_chunked_runs_equal_one_run(fn, dtype):
    """The final state is fp32, so the carried state loses nothing, even for half-precision inputs."""
    with torch.no_grad():
        for with_initial in (False, True):
            check_chunking(fn, *mlgru_case(2, 7, 37, dtype, 3, with_initial))


def test_chunked_fixed_point_runs_equal_one_run():
    forget, inputs, initial = fixed_point_case(2, 7, 37, 12, 3)
    for fn in (fixed_point_recurrence_reference, fixed_point_recurrence):
        check_chunking(lambda f, x, h: fn(f, x, 12, h), forget, inputs, initial)


# ---- fixed point -------------------------------------------------------------------------------

def fixed_point_case(b, t, d, frac_bits, seed, device="cpu", magnitude=2 ** 20):
    """Gates over the whole range 0 … 2^frac_bits (both ends present), signed inputs and initial state."""
    g = gen(seed)
    forget = torch.randint(0, 2 ** frac_bits + 1, (b, t, d), generator=g, dtype=torch.int32)
    ends = forget.view(-1)[:2]
    ends.copy_(torch.tensor([0, 2 ** frac_bits], dtype=torch.int32)[:ends.numel()])
    inputs = torch.randint(-magnitude, magnitude + 1, (b, t, d), generator=g, dtype=torch.int32)
    initial = torch.randint(-magnitude, magnitude + 1, (b, d), generator=g, dtype=torch.int32)
    return [x.to(device) for x in (forget, inputs, initial)]


def exact_recurrence(forget, inputs, frac_bits, initial):
    """The unrounded recurrence in float64 (exact for these magnitudes), in units of the inputs' LSB."""
    f, x = forget.double() / 2 ** frac_bits, inputs.double()
    h = torch.zeros_like(x[:, 0]) if initial is None else initial.double()
    states = []
    for t in range(x.shape[1]):
        h = f[:, t] * h + x[:, t]
        states.append(h)
    return torch.stack(states, 1)


def check_fixed_point(b, t, d, frac_bits, device, magnitude=2 ** 20):
    forget, inputs, initial = fixed_point_case(b, t, d, frac_bits, b + t + d + frac_bits, device, magnitude)
    for h0 in (None, initial):
        states, final = fixed_point_recurrence(forget, inputs, frac_bits, h0)
        ref_states, ref_final = fixed_point_recurrence_reference(forget.cpu(), inputs.cpu(), frac_bits,
                                                                 None if h0 is None else h0.cpu())
        assert states.dtype == final.dtype == torch.int32 and states.device == forget.device
        assert torch.equal(states.cpu(), ref_states) and torch.equal(final.cpu(), ref_final)
        assert torch.equal(ref_final, ref_states[:, -1])
        if ref_states.numel() > 10:
            assert (ref_states < 0).any() and (ref_states > 0).any()
        # each step rounds by at most half a unit and the gate (≤ 1) damps what came before
        error = (ref_states.double() - exact_recurrence(forget.cpu(), inputs.cpu(), frac_bits,
                                                        None if h0 is None else h0.cpu())).abs()
        bound = 0.5 * torch.arange(1, t + 1, dtype=torch.float64).view(1, t, 1)
        assert (error <= bound).all(), (error - bound).max()


@pytest.mark.parametrize("frac_bits", [8, 12, 16])
@pytest.mark.parametrize("b,t,d", [(1, 1, 1), (2, 7, 5), (3, 33, 130)], ids=["1x1x1", "2x7x5", "3x33x130"])
def test_fixed_point_kernel_equals_reference(b, t, d, frac_bits):
    check_fixed_point(b, t, d, frac_bits, "cpu")


def test_fixed_point_rounding_of_negative_values():
    """Rounding half up on the int64 product, with >> flooring: -1.5 → -1, -2.5 → -2, -0.25 → 0, 1.5 → 2."""
    frac_bits = 8
    half_gate = torch.full((1, 1, 6), 2 ** (frac_bits - 1), dtype=torch.int32)  # f = 1/2
    initial = torch.tensor([[-3, -5, 3, -1, 1, -4]], dtype=torch.int32)  # f·h = -1.5, -2.5, 1.5, -0.5, 0.5, -2
    zeros = torch.zeros(1, 1, 6, dtype=torch.int32)
    expected = [-1, -2, 2, 0, 1, -2]
    for fn in (fixed_point_recurrence_reference, fixed_point_recurrence):
        states, final = fn(half_gate, zeros, frac_bits, initial)
        assert states.flatten().tolist() == expected and final.flatten().tolist() == expected
    quarter = torch.full((1, 1, 2), 2 ** (frac_bits - 2), dtype=torch.int32)  # f = 1/4
    h0 = torch.tensor([[-1, -2]], dtype=torch.int32)  # f·h = -0.25, -0.5
    for fn in (fixed_point_recurrence_reference, fixed_point_recurrence):
        assert fn(quarter, torch.zeros(1, 1, 2, dtype=torch.int32), frac_bits, h0)[0].flatten().tolist() == [0, 0]


def test_fixed_point_saturates_at_the_int32_range():
    one = torch.full((1, 3, 2), 2 ** 12, dtype=torch.int32)  # f = 1: h grows by x every step
    big = torch.full((1, 3, 2), 2 ** 30, dtype=torch.int32)
    big[..., 1] = -(2 ** 30)
    for fn in (fixed_point_recurrence_reference, fixed_point_recurrence):
        states, final = fn(one, big, 12)
        assert states[0, :, 0].tolist() == [2 ** 30, 2 ** 31 - 1, 2 ** 31 - 1]
        assert states[0, :, 1].tolist() == [-(2 ** 30), -(2 ** 31), -(2 ** 31)]
        # large gates and states: the int64 product does not overflow
        states, _ = fn(torch.full((1, 2, 1), 2 ** 30, dtype=torch.int32), torch.full((1, 2, 1), 2 ** 31 - 1,
                       dtype=torch.int32), 30)
        assert states.flatten().tolist() == [2 ** 31 - 1, 2 ** 31 - 1]


# ---- errors ------------------------------------------------------------------------------------

FLOAT_FNS = [linear_recurrence_reference, linear_recurrence, recurrence]
FLOAT_IDS = ["reference", "kernel", "recurrence"]


@pytest.mark.parametrize("fn", FLOAT_FNS, ids=FLOAT_IDS)
def test_shape_errors(fn):
    with pytest.raises(ValueError, match=r"\[B, T, D\], got shapes \(2, 3\) and \(2, 3\)"):
        fn(torch.rand(2, 3), torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"forget \(2, 3, 4\) and inputs \(2, 3, 5\)"):
        fn(torch.rand(2, 3, 4), torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match=r"initial must be \[B, D\] = \(2, 4\) .* got \(2, 3\)"):
        fn(torch.rand(2, 3, 4), torch.rand(2, 3, 4), torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"initial must be \[B, D\] = \(2, 4\) .* got \(4,\)"):
        fn(torch.rand(2, 3, 4), torch.rand(2, 3, 4), torch.rand(4))
    with pytest.raises(ValueError, match=r"B, T, D ≥ 1"):
        fn(torch.rand(2, 0, 4), torch.rand(2, 0, 4))
    with pytest.raises(TypeError, match="floating-point .* inputs of dtype torch.int32"):
        fn(torch.rand(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.int32))


@pytest.mark.parametrize("fn", [fixed_point_recurrence_reference, fixed_point_recurrence], ids=["reference", "kernel"])
def test_fixed_point_errors(fn):
    q = torch.ones(2, 3, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"forget \(2, 3, 4\) and inputs \(2, 3, 5\)"):
        fn(q, torch.ones(2, 3, 5, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match=r"initial must be \[B, D\] = \(2, 4\)"):
        fn(q, q, 8, torch.ones(2, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="int32 .* forget_q of dtype torch.float32"):
        fn(q.float(), q, 8)
    with pytest.raises(TypeError, match="int32 .* initial_q of dtype torch.int64"):
        fn(q, q, 8, torch.ones(2, 4, dtype=torch.int64))
    for frac_bits in (0, 31, 8.0, True):
        with pytest.raises(ValueError, match="frac_bits"):
            fn(q, q, frac_bits)


def test_block_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        linear_recurrence(torch.rand(1, 2, 3), torch.rand(1, 2, 3), block_d=48)


# ---- the same comparisons on CUDA tensors ----------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestOnCuda:
    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    def test_kernel_equals_reference(self, dtype):
        for b, t, d in [*SHAPES, (4, 257, 1030), (1, 1, 4099)]:
            for with_initial in (False, True):
                check_kernel_against_reference(b, t, d, dtype, with_initial, "cuda")

    def test_recurrence_uses_the_kernel(self, monkeypatch):
        def no_reference(*args, **kwargs):
            raise AssertionError("CUDA tensors take the Triton kernel")

        monkeypatch.setattr(rec, "linear_recurrence_reference", no_reference)
        forget, inputs, initial = mlgru_case(2, 5, 7, torch.float32, 1, device="cuda")
        states, final = recurrence(forget, inputs, initial)
        assert states.is_cuda and final.is_cuda

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    def test_chunked_runs_equal_one_run(self, dtype):
        with torch.no_grad():
            check_chunking(linear_recurrence, *mlgru_case(3, 40, 300, dtype, 7, device="cuda"))

    @pytest.mark.parametrize("frac_bits", [8, 12, 16])
    def test_fixed_point_kernel_equals_reference(self, frac_bits):
        for b, t, d in [(1, 1, 1), (3, 33, 130), (4, 200, 1030)]:
            check_fixed_point(b, t, d, frac_bits, "cuda")
