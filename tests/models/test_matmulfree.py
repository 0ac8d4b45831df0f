"""The MatMul-free LM (spikellm/models/matmulfree.py) and its hardware-aware fixed-point mode.

- the MLGRU and the GLU equal hand-written float references of their equations;
- recurrent inference: ``step()`` token by token and chunked ``forward()`` with the carried state
  equal one ``forward()`` over the whole sequence (float, BitLinear, and bit for bit in hardware mode);
- hardware mode stays within a measured relative error of float mode, coarser bits are worse, and
  switching back restores the float model exactly;
- the fixed-point helpers (spikellm/quant/fixed_point.py) put values on their grids;
- gradients reach every parameter, also through the hardware mode;
- configuration errors, the spiking checkpoint round trip (packed ternary weights, thresholds),
  the operation counter's recurrence and projection rows;
- end to end: train.py experiment=matmulfree_tiny, eval.py hardware=loihi2, and the activation
  sparsity conversion of the trained model (experiment=sparsify model=native).
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CONF, run_script
from omegaconf import OmegaConf
from safetensors.torch import load_file

from spikellm.checkpoints.spiking import load_spiking_checkpoint, read_config, save_spiking_checkpoint
from spikellm.config import build_neuron
from spikellm.energy import OperationCounter
from spikellm.errors import ConfigError
from spikellm.kernels.packing import packed_width, unpack_weights_reference
from spikellm.models import LlamaConfig, MatMulFreeConfig, MatMulFreeLM, set_hardware_mode
from spikellm.nn.packed import PackedWeight
from spikellm.nn.spiking_linear import SpikingLinear
from spikellm.quant.fixed_point import HardwareQuant, lut, rsqrt_fixed, to_fixed
from spikellm.sparsity import gates, install_thresholds

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300  # the tokenizer fixture's byte-level BPE size (at least the 256 bytes)
ARCH = dict(vocab_size=VOCAB, dim=32, n_layers=2, ffn_dim=64)
BITNET = OmegaConf.to_container(OmegaConf.load(CONF / "neuron" / "bitnet.yaml"))
LOIHI2 = OmegaConf.to_container(OmegaConf.load(CONF / "hardware" / "loihi2.yaml"))
MMF_MODEL = {"_target_": "spikellm.models.MatMulFreeConfig", **ARCH}

# Hardware (fixed-point) logits vs float logits, relative L2 error ‖hw - fp‖ / ‖fp‖, on the models
# of `trained` (2 layers, dim 32, 20 Adam steps). Measured over seeds 0-7: float projections
# 0.0010-0.0035 (seed 0: 0.0024), BitLinear 0.0077-0.0223 (seed 0: 0.0113); the BitLinear error is
# larger because a fixed-point rounding can move an 8-bit activation code by one. Bounds ~3x the worst.
HW_REL_TOL = {False: 1e-2, True: 5e-2}
# activation_frac_bits=4, state_frac_bits=4 measured 0.20-0.73 (float) and 0.32-0.74 (BitLinear),
# 59x-143x the default's error at seed 0: asking for 10x is far inside that.
COARSE_FACTOR = 10.0


def build(bitnet: bool = False, seed: int = 0, **overrides) -> MatMulFreeLM:
    encoder, quantizer = build_neuron(BITNET) if bitnet else (None, None)
    torch.manual_seed(seed)
    return MatMulFreeConfig(**{**ARCH, **overrides}).build(encoder, quantizer)


def ids(batch=3, length=12, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def train_steps(model: MatMulFreeLM, steps: int = 20, lr: float = 1e-2) -> MatMulFreeLM:
    """A few Adam steps on a fixed batch, so the weights and norms move away from their init."""
    data = ids(4, 17, seed=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    """``{bitnet: model}``: float projections and BitLinear, trained 20 steps (seed 0)."""
    return {bitnet: train_steps(build(bitnet)) for bitnet in (False, True)}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def rms_norm(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def stepped_logits(model, tokens):
    state, outs = None, []
    for t in range(tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state)
        outs.append(logits)
    return torch.stack(outs, 1), state


# ---- 1. the MLGRU and the GLU against their equations ---------------------------------------

@pytest.mark.parametrize("lower_bound", [0.0, 0.3])
def test_mlgru_equals_its_equations(lower_bound):
    model = build(forget_lower_bound=lower_bound)
    mlgru = model.layers[0].token_mixer
    with torch.no_grad():
        mlgru.g_norm.weight.copy_(0.5 + torch.rand(32))
        for layer in (mlgru.i_proj, mlgru.f_proj, mlgru.g_proj, mlgru.o_proj):
            layer.weight.normal_(0, 0.3)
    x = torch.randn(2, 7, 32)
    h0 = torch.randn(2, 32)
    for initial in (None, h0):
        with torch.no_grad():
            out, final = mlgru(x, initial)
            sigma = torch.sigmoid(x @ mlgru.f_proj.weight.T)
            f = lower_bound + (1 - lower_bound) * sigma
            c = F.silu(x @ mlgru.i_proj.weight.T)
            g = x @ mlgru.g_proj.weight.T
            h = torch.zeros(2, 32) if initial is None else initial
            hs = []
            for t in range(7):
                h = f[:, t] * h + (1 - f[:, t]) * c[:, t]
                hs.append(h)
            hs = torch.stack(hs, 1)
            expected = (rms_norm(hs, mlgru.g_norm.weight, mlgru.g_norm.eps) * F.silu(g)) @ mlgru.o_proj.weight.T
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(final, h, rtol=1e-5, atol=1e-6)
    if lower_bound:  # the bound holds: f ≥ b, so the state keeps at least b of its past
        forget, _, _ = mlgru.gates(x)
        assert float(forget.detach().min()) >= lower_bound


def test_glu_and_block_equal_their_equations():
    model = build()
    block = model.layers[0]
    with torch.no_grad():
        for norm in (block.input_layernorm, block.post_attention_layernorm, block.mlp.down_norm):
            norm.weight.copy_(0.5 + torch.rand(norm.weight.shape))
    x = torch.randn(2, 5, 32)
    mlp = block.mlp
    with torch.no_grad():
        hidden = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
        expected = rms_norm(hidden, mlp.down_norm.weight, mlp.down_norm.eps) @ mlp.down_proj.weight.T
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)
        # the Metaformer block: two pre-norm residual branches
        mixed, _ = block.token_mixer(rms_norm(x, block.input_layernorm.weight, 1e-6))
        y = x + mixed
        y = y + mlp(rms_norm(y, block.post_attention_layernorm.weight, 1e-6))
        out, _ = block(x)
        torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-6)


# ---- 2. recurrent inference -----------------------------------------------------------------

@pytest.mark.parametrize("bitnet", [False, True], ids=["float", "bitnet"])
def test_step_and_chunks_equal_the_whole_sequence(trained, bitnet):
    model = trained[bitnet]
    tokens = ids()
    with torch.no_grad():
        whole, finals = model(tokens, return_state=True)
        stepped, state = stepped_logits(model, tokens)
        first, carried = model(tokens[:, :5], return_state=True)
        second, chunk_finals = model(tokens[:, 5:], state=carried, return_state=True)
    assert stepped.shape == whole.shape == (3, 12, VOCAB)
    torch.testing.assert_close(stepped, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-5)
    assert len(state) == len(finals) == 2 and all(s.shape == (3, 32) for s in state)
    for a, b, c in zip(state, finals, chunk_finals):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6)
    # the state is not a no-op: dropping it changes the continuation
    assert not torch.allclose(model(tokens[:, 5:]), second, atol=1e-4)


@pytest.mark.parametrize("bitnet", [False, True], ids=["float", "bitnet"])
def test_hardware_step_equals_parallel_exactly(trained, bitnet):
    model = set_hardware_mode(build(bitnet), HardwareQuant())  # a fresh copy: `trained` stays float
    model.load_state_dict(trained[bitnet].state_dict())
    model.eval()
    tokens = ids()
    with torch.no_grad():
        whole, finals = model(tokens, return_state=True)
        stepped, state = stepped_logits(model, tokens)
        first, carried = model(tokens[:, :5], return_state=True)
        second = model(tokens[:, 5:], state=carried)
    # the state is fixed point, but the gates it integrates come from floating-point matmuls
    # (and the logits from the float norm and head, DESIGN.md §4) whose reductions may round
    # differently for a [B, T] and a [B, 1] batch on some CPUs' kernels: logits up to 2.5e-4 apart
    # and a state a few 2^-16 grid steps apart on this 2-core machine, so they are compared closely
    torch.testing.assert_close(stepped, whole, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-4, atol=1e-3)
    for a, b in zip(state, finals):
        torch.testing.assert_close(a, b, rtol=0, atol=2 ** -12)
        assert torch.equal(a * 2 ** 16, torch.round(a * 2 ** 16))  # the state lies on its 2^-16 grid


# ---- 3. hardware mode vs float mode ---------------------------------------------------------

@pytest.mark.parametrize("bitnet", [False, True], ids=["float", "bitnet"])
def test_hardware_mode_is_close_to_float_and_bits_matter(trained, bitnet):
    model = trained[bitnet]
    tokens = ids()
    try:
        with torch.no_grad():
            fp = model(tokens)
            set_hardware_mode(model, HardwareQuant())
            hw = model(tokens)
            set_hardware_mode(model, HardwareQuant(activation_frac_bits=4, state_frac_bits=4))
            coarse = model(tokens)
            set_hardware_mode(model, None)
            back = model(tokens)
    finally:
        set_hardware_mode(model, None)
    default_error, coarse_error = rel_error(hw, fp), rel_error(coarse, fp)
    assert 0 < default_error < HW_REL_TOL[bitnet], default_error
    assert coarse_error > COARSE_FACTOR * default_error, (coarse_error, default_error)
    assert torch.equal(back, fp)  # float mode restored exactly
    assert all(m.hardware is None for m in model.modules() if hasattr(m, "hardware"))


def test_hardware_mode_reaches_every_fixed_point_module():
    model = build()
    spec = HardwareQuant(state_frac_bits=10)
    assert set_hardware_mode(model, spec) is model
    holders = [m for m in model.modules() if hasattr(m, "hardware")]
    # per block: 3 norms (input, post, g_norm) + down_norm, the MLGRU, the GLU, the block; + final norm
    assert len(holders) == 2 * 7 + 1
    assert all(m.hardware is spec for m in holders)


def test_hardware_state_saturates_instead_of_wrapping():
    """A valid HardwareQuant whose activations (±2^15) exceed the int32 state's range (±2^31 / 2^24 = ±128):
    the fixed-point state must saturate as the integer scan's accumulator does (sat32), keeping its sign."""
    try:
        spec = HardwareQuant(activation_bits=32, activation_frac_bits=16, state_frac_bits=24)
    except ConfigError:
        return  # refusing the combination up front is as good as saturating
    model = build(n_layers=1)
    mlgru = model.layers[0].token_mixer
    with torch.no_grad():
        mlgru.i_proj.weight.normal_(0, 60.0)  # candidates of a few hundred
        x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))
        _, float_final = mlgru(x)
        set_hardware_mode(model, spec)
        _, hardware_final = mlgru(x)
    big = float_final.abs() > 130
    assert big.any()
    assert float(hardware_final.abs().max()) <= 128
    assert torch.equal(torch.sign(hardware_final[big]), torch.sign(float_final[big])), \
        (float_final[big][:6].tolist(), hardware_final[big][:6].tolist())


# ---- 4. fixed-point helpers -----------------------------------------------------------------

def test_to_fixed_grid_rounding_saturation_and_gradient():
    x = (torch.randn(1000) * 10).requires_grad_()
    for frac in (1, 4, 12):
        y = to_fixed(x, frac)
        assert torch.equal(y * 2 ** frac, torch.round(y * 2 ** frac))
        assert float((y - x).detach().abs().max()) <= 2 ** -(frac + 1)
    # half up: k + 1/2 units go to k + 1, also for negative k
    halves = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, -0.51]) / 4
    assert to_fixed(halves, 2).mul(4).tolist() == [1, 2, 3, 0, -1, -2, 0, -1]
    # saturation at ±2^(bits-1) grid units (the signed range)
    big = torch.tensor([1000.0, -1000.0, 7.9375, 7.96875, -8.0, -8.03125])
    assert to_fixed(big, 4, bits=8).mul(16).tolist() == [127, -128, 127, 127, -128, -128]
    # straight-through gradient: ones everywhere (also where saturated)
    to_fixed(x, 3, bits=6).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_lut_values_lie_on_the_gate_grid_and_match_the_table():
    spec = HardwareQuant()
    step, unit = 2.0 ** -spec.lut_frac_bits, 2.0 ** -spec.gate_frac_bits
    x = (torch.randn(4000, dtype=torch.float64) * 5).float()
    x = torch.cat([x, torch.tensor([-100.0, 100.0, spec.lut_range, -spec.lut_range])])
    for fn in (torch.sigmoid, F.silu):
        y = lut(fn, x, spec)
        assert torch.equal(y / unit, torch.round(y / unit))
        # the table entry: x on the input grid (saturating), fn rounded to the gate grid
        point = torch.floor(x.double() / step + 0.5).clamp(-spec.lut_range / step, spec.lut_range / step - 1) * step
        expected = torch.floor(fn(point) / unit + 0.5) * unit
        torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-9)
    # on grid points inside the range, the table is the function to half a gate unit
    grid = torch.arange(-8 * 64, 8 * 64, dtype=torch.float32) / 64
    assert float((lut(torch.sigmoid, grid, spec) - torch.sigmoid(grid)).abs().max()) <= unit / 2 + 1e-7
    # anywhere, saturated inputs included: at most slope 1/4 times half an input step plus half a gate unit
    assert float((lut(torch.sigmoid, x, spec) - torch.sigmoid(x)).abs().max()) <= step / 8 + unit / 2 + 1e-7
    # gradient: that of the smooth function
    z = torch.linspace(-6, 6, 101, requires_grad=True)
    lut(torch.sigmoid, z, spec).sum().backward()
    torch.testing.assert_close(z.grad, torch.sigmoid(z) * (1 - torch.sigmoid(z)))
    assert spec.lut_entries == 1024  # 2 · 8 · 64, the loihi2 group's comment


@pytest.mark.parametrize("bits", [4, 8, 12])
def test_rsqrt_fixed_significant_bits_and_error(bits):
    m = torch.logspace(-6, 6, 2001, dtype=torch.float32)
    r = rsqrt_fixed(m, bits)
    exact = 1 / torch.sqrt(m.double())
    relative = ((r.double() - exact) / exact).abs()
    assert float(relative.max()) <= 2.0 ** -bits + 1e-6
    assert float(relative.max()) > 2.0 ** -(bits + 2)  # really rounded, not exact
    unit = 2.0 ** (torch.floor(torch.log2(r.double())) - (bits - 1))
    significand = r.double() / unit
    assert torch.equal(significand, torch.round(significand))
    assert int(significand.max()) < 2 ** bits
    mm = m[::100].clone().requires_grad_()
    rsqrt_fixed(mm, bits).sum().backward()
    torch.testing.assert_close(mm.grad, -0.5 * mm.detach() ** -1.5)


@pytest.mark.parametrize("field, value", [
    ("activation_bits", 7), ("activation_bits", 33), ("activation_frac_bits", 0), ("state_frac_bits", 25),
    ("gate_frac_bits", 0), ("weight_frac_bits", 25), ("lut_frac_bits", 13), ("lut_frac_bits", -1),
    ("lut_range", 0.0), ("lut_range", 2048.0), ("norm_mantissa_bits", 1), ("norm_mantissa_bits", 24),
    ("activation_frac_bits", 24), ("state_frac_bits", 2.5),
])
def test_hardware_quant_validation(field, value):
    with pytest.raises(ConfigError) as raised:
        HardwareQuant(**{field: value})
    assert raised.value.key == field


def test_hardware_quant_frac_bits_must_leave_integer_bits():
    with pytest.raises(ConfigError, match="activation_bits=16"):
        HardwareQuant(activation_bits=16, activation_frac_bits=16)
    HardwareQuant(activation_bits=16, activation_frac_bits=15)  # one integer bit is allowed


# ---- 5. gradients ---------------------------------------------------------------------------

@pytest.mark.parametrize("hardware", [False, True], ids=["float", "hardware"])
def test_gradients_reach_every_parameter(hardware):
    model = build(bitnet=True).train()
    if hardware:
        set_hardware_mode(model, HardwareQuant())
    tokens = ids(2, 9)
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    names = [name for name, _ in model.named_parameters()]
    assert len(names) == 2 * 11 + 2  # 7 projections + 4 norms per block, final norm, embeddings (tied head)
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert float(param.grad.abs().sum()) > 0, name


# ---- 6. configuration errors ----------------------------------------------------------------

@pytest.mark.parametrize("bound", [1.0, 1.5, -0.1])
def test_forget_lower_bound_below_one(bound):
    with pytest.raises(ConfigError) as raised:
        MatMulFreeConfig(**ARCH, forget_lower_bound=bound)
    assert raised.value.key == "forget_lower_bound"
    MatMulFreeConfig(**ARCH, forget_lower_bound=0.99)


def test_default_ffn_dim():
    assert MatMulFreeConfig(dim=256).ffn_dim == 704  # 8/3 · 256 = 682.7, up to a multiple of 64
    assert MatMulFreeConfig(dim=96, ffn_dim=100).ffn_dim == 100


def test_attention_encoder_and_llama_hardware_mode_refused():
    from spikellm.config import build_attention_encoder

    attention = OmegaConf.to_container(OmegaConf.load(CONF / "neuron" / "ternary_attention.yaml"))
    with pytest.raises(ConfigError) as raised:
        MatMulFreeConfig(**ARCH).build(attention_encoder=build_attention_encoder(attention))
    assert raised.value.key == "neuron.attention"
    llama = LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48,
                        max_seq_len=16).build()
    with pytest.raises(ConfigError) as raised:
        set_hardware_mode(llama, HardwareQuant())
    assert raised.value.key == "model" and "MatMul-free" in str(raised.value)


def test_state_of_the_wrong_length():
    model = build()
    tokens = ids(2, 4)
    with pytest.raises(ValueError, match="state holds 1 layers' states, the model has 2"):
        model(tokens, state=[torch.zeros(2, 32)])
    with pytest.raises(ValueError):
        model.step(tokens[:, 0], [torch.zeros(2, 32)] * 3)


# ---- 7. spiking checkpoint ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from spikellm.data.corpus import load_documents
    from spikellm.data.tokenizer import build_tokenizer

    return build_tokenizer(load_documents("pydoc")[:20], vocab_size=VOCAB, cache_dir=tmp_path_factory.mktemp("bpe"))


def test_spiking_checkpoint_round_trip_with_thresholds(trained, tokenizer, tmp_path):
    assert tokenizer.vocab_size == VOCAB
    model = trained[True]
    tokens = ids()
    with torch.no_grad():
        plain = model(tokens)
    thresholds = {"layers.0.token_mixer.i_proj": 0.4, "layers.0.mlp.gate_proj": 0.3,
                  "layers.1.token_mixer.o_proj": 0.05, "layers.1.mlp.down_proj": 0.2}
    for name, with_thresholds in (("plain", None), ("sparse", thresholds)):
        save_spiking_checkpoint(model, tmp_path / name, model_config=MMF_MODEL, neuron=BITNET, tokenizer=tokenizer,
                                thresholds=with_thresholds)
    loaded, _, config = load_spiking_checkpoint(tmp_path / "plain", backend="torch")
    assert isinstance(loaded, MatMulFreeLM)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), plain)
    # the weights: packed ternary, decoding to the very matrices the model used
    tensors = load_file(str(tmp_path / "plain" / "model.safetensors"))
    linears = model.spiking_linears()
    assert len(linears) == 14
    for name, layer in linears.items():
        assert config["layers"][name]["weight_format"] == "ternary"
        assert f"{name}.weight" not in tensors
        packed = tensors[f"{name}.qweight"]
        assert packed.dtype == torch.uint8
        assert packed.shape == (layer.out_features, packed_width(layer.in_features, "ternary"))  # 4 per byte
        integers = unpack_weights_reference(packed, layer.in_features, "ternary")
        assert set(integers.unique().tolist()) <= {-1, 0, 1}
        stored = PackedWeight(packed, "ternary", layer.in_features, tensors[f"{name}.qscale"])
        assert torch.equal(stored.dequantize(), layer.effective_weight().detach())
    # thresholds: recorded, reinstalled on load, and they change the output
    assert read_config(tmp_path / "sparse")["thresholds"] == thresholds
    assert read_config(tmp_path / "plain")["thresholds"] == {}
    sparse, _, _ = load_spiking_checkpoint(tmp_path / "sparse", backend="torch")
    assert {name: float(gate.threshold) for name, gate in gates(sparse).items() if float(gate.threshold) > 0} == \
        pytest.approx(thresholds)
    with torch.no_grad():
        sparse_logits = sparse(tokens)
    assert not torch.allclose(sparse_logits, plain, atol=1e-3)
    reference = build(bitnet=True)
    reference.load_state_dict(model.state_dict())
    install_thresholds(reference.eval(), thresholds)
    with torch.no_grad():
        assert torch.equal(sparse_logits, reference(tokens))


# ---- 8. operation counts --------------------------------------------------------------------

def bitplane_spikes(x: torch.Tensor) -> int:
    """popcount(|n|) of the 8-bit per-token absmax codes of BitLinear, computed here."""
    step = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
    counts = torch.floor(x / step + 0.5).clamp(-127, 127).abs().long()
    return int(sum(((counts >> bit) & 1).sum() for bit in range(7)))


def test_operation_counter_on_the_matmul_free_lm(trained):
    from spikellm.config import build as build_config

    model = trained[True]
    inputs = {}

    def keep(name):
        def hook(module, args, output):  # returns None: the output stays
            inputs[name] = args[0].detach()
        return hook

    hooks = [layer.register_forward_hook(keep(name)) for name, layer in model.spiking_linears().items()]
    tokens = ids(2, 6)
    try:
        with OperationCounter(model) as counter, torch.no_grad():
            model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    n_tokens = tokens.numel()
    assert counter.tokens == n_tokens
    recurrences = {name: ops for name, ops in counter.ops.items() if ops.kind == "recurrence"}
    assert sorted(recurrences) == [f"layers.{i}.token_mixer.recurrence" for i in range(2)]
    for ops in recurrences.values():
        assert ops.macs == ops.dense_macs == 2 * n_tokens * 32
        assert ops.acs == 0
    for name, layer in model.spiking_linears().items():
        ops = counter.ops[name]
        assert ops.kind == "projection" and ops.macs == 0
        assert ops.spikes == bitplane_spikes(inputs[name]) > 0
        assert ops.acs == ops.spikes * layer.out_features
        assert ops.dense_macs == n_tokens * layer.in_features * layer.out_features
    assert counter.ops["lm_head"].macs == n_tokens * 32 * VOCAB
    report = counter.report(build_config(OmegaConf.load(CONF / "energy" / "seneca.yaml"), "energy"))
    kinds = [layer["kind"] for layer in report.to_dict()["layers"]]
    assert kinds.count("recurrence") == 2 and kinds.count("projection") == 14


def test_dense_projection_counts_nonzero_inputs():
    layer = SpikingLinear(16, 8)
    x = torch.randn(3, 4, 16)
    x[x.abs() < 0.7] = 0.0
    nnz = int((x != 0).sum())
    assert 0 < nnz < x.numel()
    with OperationCounter(layer) as counter, torch.no_grad():
        layer(x)
    ops = counter.ops[""]
    assert ops.macs == nnz * 8
    assert ops.dense_macs == 12 * 16 * 8
    assert ops.acs == 0
    # in the model: thresholds zero projection inputs and the MACs follow
    model = build().eval()
    install_thresholds(model, {"layers.0.mlp.up_proj": 0.5})
    seen = {}

    def keep(module, args, output):  # returns None: the output stays
        seen["x"] = args[0].detach()

    hook = model.layers[0].mlp.up_proj.register_forward_hook(keep)
    tokens = ids(2, 6)
    with OperationCounter(model) as counter, torch.no_grad():
        model(tokens)
    hook.remove()
    up = counter.ops["layers.0.mlp.up_proj"]
    zeros = int((seen["x"] == 0).sum())
    assert zeros > 0
    assert up.macs == (seen["x"].numel() - zeros) * 64 < up.dense_macs == 12 * 32 * 64


# ---- 9. end to end --------------------------------------------------------------------------

TINY_TRAIN = ["model.dim=32", "model.n_layers=1", "model.ffn_dim=64", "data.block_size=32", "data.batch_size=2",
              "data.vocab_size=512", "trainer.max_steps=3", "trainer.val_check_interval=3",
              "+trainer.limit_val_batches=2", "callbacks=none", "logger=none", "validate_at_start=false"]


def one_error_line(done) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def mmf_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("mmf") / "run"
    done = run_script("train.py", "experiment=matmulfree_tiny", *TINY_TRAIN, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_attention_neuron_group_refused_by_train_config(mmf_run, tmp_path):
    """train.py experiment=matmulfree_tiny neuron=ternary_attention: the error names the override to change."""
    from conftest import compose

    from spikellm.training.pipeline import run_training

    cfg = compose(["experiment=matmulfree_tiny", "neuron=ternary_attention", *TINY_TRAIN], tmp_path / "run")
    with pytest.raises(ConfigError) as raised:
        run_training(cfg)
    assert raised.value.key == "neuron.attention", str(raised.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_writes_checkpoints(mmf_run):
    from spikellm.checkpoints.loader import load_model

    assert (mmf_run / "checkpoints" / "last.ckpt").is_file()
    spiking = mmf_run / "spiking_checkpoint"
    config = read_config(spiking)
    assert config["model"]["_target_"] == "spikellm.models.MatMulFreeConfig"
    assert (config["model"]["dim"], config["model"]["n_layers"], config["model"]["ffn_dim"]) == (32, 1, 64)
    assert config["neuron"]["name"] == "bitnet"
    assert {layer["weight_format"] for layer in config["layers"].values()} == {"ternary"}
    # the spiking checkpoint is the trained model: the same logits as the Lightning checkpoint
    model, tokenizer, _ = load_spiking_checkpoint(spiking, backend="torch")
    lightning = load_model(mmf_run / "checkpoints" / "last.ckpt").model.eval()
    tokens = torch.tensor([tokenizer.encode("def f(x):\n    return x + 1")])
    with torch.no_grad():
        assert torch.equal(model(tokens), lightning(tokens))


def test_eval_in_hardware_mode(mmf_run, tmp_path):
    from spikellm.evaluation.perplexity import evaluation_text, perplexity

    text = tmp_path / "held_out.txt"  # a slice of the validation text keeps the subprocess short
    text.write_text(evaluation_text("pydoc")[:5000])
    out = tmp_path / "eval"
    done = run_script("eval.py", f"ckpt={mmf_run / 'spiking_checkpoint'}", "hardware=loihi2", "backend=torch",
                      f"perplexity.datasets=[{text}]", "perplexity.seqlen=128", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["hardware"] == LOIHI2
    ppl = results["perplexity"][str(text)]["ppl"]
    # the same number in-process in hardware mode; float mode differs, but little
    model, tokenizer, _ = load_spiking_checkpoint(mmf_run / "spiking_checkpoint", backend="torch")
    tokens = torch.tensor(tokenizer.encode(evaluation_text(str(text))), dtype=torch.long)
    with torch.no_grad():
        fp = perplexity(model, tokens, 128).ppl
        set_hardware_mode(model, HardwareQuant(**{k: v for k, v in LOIHI2.items() if k != "_target_"}))
        hw = perplexity(model, tokens, 128).ppl
    assert ppl == hw, (ppl, hw)
    assert ppl != fp and abs(ppl / fp - 1) < 1e-3, (ppl, fp)  # measured 1.9e-5
    assert 1 < ppl < 2 * 512  # a barely trained model over 512 tokens
    assert results["energy"]["tokens"] > 0
    kinds = {layer["kind"] for layer in results["energy"]["layers"]}
    assert {"recurrence", "projection", "lm_head"} <= kinds


def test_eval_hardware_mode_refuses_a_llama(mmf_run, tmp_path):
    _, tokenizer, _ = load_spiking_checkpoint(mmf_run / "spiking_checkpoint", backend="torch")
    arch = dict(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48,
                max_seq_len=64)
    llama = LlamaConfig(**arch).build()
    save_spiking_checkpoint(llama, tmp_path / "llama", model_config={"_target_": "spikellm.models.LlamaConfig", **arch},
                            neuron=None, tokenizer=tokenizer)
    out = tmp_path / "eval"
    done = run_script("eval.py", f"ckpt={tmp_path / 'llama'}", "hardware=loihi2", f"hydra.run.dir={out}")
    line = one_error_line(done)
    assert "SpikingLlama" in line and "MatMul-free" in line, line
    assert not (out / "results.json").exists()


def test_sparsify_the_trained_matmul_free_lm(mmf_run, tmp_path):
    out = tmp_path / "sparse"
    done = run_script("train.py", "experiment=sparsify", "model=native",
                      f"model.checkpoint={mmf_run / 'spiking_checkpoint'}", "convert.calibration.n_samples=2",
                      "convert.calibration.seq_len=32", "convert.eval_batches=2", "convert.stages.sparsify.samples=2",
                      "data.block_size=32", "data.batch_size=2", "data.vocab_size=512", "logger=none",
                      "callbacks=none", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    config = read_config(out / "spiking_model")
    source = read_config(mmf_run / "spiking_checkpoint")
    assert config["model"] == source["model"] and config["neuron"] == source["neuron"]
    thresholds = config["thresholds"]
    assert thresholds and set(thresholds) <= set(source["layers"])
    assert any(value > 0 for value in thresholds.values())
    energy = json.loads((out / "energy.json").read_text())
    before, after = energy["before"], energy["after"]
    assert after["joules"] <= before["joules"]
    assert before["cost_model"]["name"] == after["cost_model"]["name"]
    assert "recurrence" in {layer["kind"] for layer in after["layers"]}
    assert after["macs"] + after["acs"] <= before["macs"] + before["acs"]
    # the saved model carries its thresholds
    model, _, _ = load_spiking_checkpoint(out / "spiking_model", backend="torch")
    installed = {name: float(gate.threshold) for name, gate in gates(model).items()}
    assert installed == pytest.approx(thresholds)


def test_native_model_with_an_encoder_group_is_refused(mmf_run, tmp_path):
    out = tmp_path / "refused"
    done = run_script("train.py", "experiment=sparsify", "model=native",
                      f"model.checkpoint={mmf_run / 'spiking_checkpoint'}", "neuron=ternary", f"hydra.run.dir={out}")
    line = one_error_line(done)
    assert line.startswith("error: neuron='ternary' is invalid:") and "neuron=none" in line, line
    assert not (out / "spiking_model").exists() and not (out / "energy.json").exists()
