"""Post-training conversion pieces (spikellm.posttrain, spikellm.data.calibration, the GPTQ
static grids, spikellm.models.hf export), each on tiny random models."""
import copy
import math

import pytest
import torch
import transformers
from torch.func import functional_call

from spikellm.data.calibration import calibration_samples
from spikellm.errors import ConfigError, DataError
from spikellm.io import atomic_directory
from spikellm.models import LlamaConfig
from spikellm.checkpoints.hf import load_hf_causal_lm, save_hf_llama, to_hf_llama
from spikellm.models.hf import causal_lm_logits
from spikellm.models.spikify import spikify, spikify_from_config, spiking_modules
from spikellm.neurons import GIFEncoder, TernaryEncoder
from spikellm.neurons.saliency import allocate_steps
from spikellm.posttrain.blocks import capture_block_inputs, decoder_blocks, floating_point, run_block
from spikellm.posttrain.distill import DistillationTask, distillation_loss
from spikellm.checkpoints.converted import RECORD, load_converted, read_record, save_converted
from spikellm.posttrain.omniquant import LearnableClipping, SmoothingScales, block_calibration
from spikellm.posttrain.sequential import gptq_model
from spikellm.quant.gptq import HessianAccumulator, gptq_quantize_detailed
from spikellm.quant.ternary import TernaryAbsMean, TernaryGIFGrid
from spikellm.quant.weights import RoundToNearest
from spikellm.sparsity import gates, install_thresholds

VOCAB = 64
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
HF_CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(**{**_DECODER, **kw}),
    "mistral": lambda **kw: transformers.MistralConfig(**{**_DECODER, "sliding_window": None, **kw}),
    "qwen2": lambda **kw: transformers.Qwen2Config(**{**_DECODER, **kw}),
    "opt": lambda **kw: transformers.OPTConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64,
                                                          num_hidden_layers=2, num_attention_heads=4,
                                                          max_position_embeddings=64, word_embed_proj_dim=32), **kw}),
}
GIF4 = {"encoder": {"_target_": "spikellm.neurons.GIFEncoder", "_partial_": True, "bits": 4, "levels": 4,
                    "signed": True},
        "weight_quantizer": None}


pytestmark = pytest.mark.usefixtures("one_thread")


def _hf(arch: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[arch](**kw)).eval()


def _ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return causal_lm_logits(model, ids)


def _rows_distinct(weight: torch.Tensor) -> int:
    return max(len(torch.unique(row)) for row in weight.detach())


# ---- calibration windows ------------------------------------------------------------------------

def test_calibration_samples_are_seeded_windows_of_the_stream():
    tokens = torch.arange(1000, 1500, dtype=torch.int32)
    samples = calibration_samples(tokens, n_samples=6, seq_len=20, seed=3)
    assert samples.shape == (6, 20) and samples.dtype == torch.long
    for row in samples:  # a contiguous slice, and one with a following token (a next-token target)
        start = int(row[0]) - 1000
        assert 0 <= start and start + 20 < len(tokens)
        assert torch.equal(row, tokens[start:start + 20].long())
    assert torch.equal(samples, calibration_samples(tokens, n_samples=6, seq_len=20, seed=3))
    assert not torch.equal(samples, calibration_samples(tokens, n_samples=6, seq_len=20, seed=4))
    # more windows than room: they overlap, but every one still fits
    many = calibration_samples(tokens[:25], n_samples=10, seq_len=20, seed=0)
    assert many.shape == (10, 20) and int(many[:, 0].max()) - 1000 <= 4
    # the shortest stream that fits one window
    assert torch.equal(calibration_samples(tokens[:21], 2, 20, 0), tokens[:20].long().expand(2, -1))


def test_calibration_samples_errors():
    tokens = torch.arange(100)
    with pytest.raises(DataError, match=r"convert\.calibration\.seq_len=100"):
        calibration_samples(tokens, n_samples=1, seq_len=100)
    with pytest.raises(ConfigError) as raised:
        calibration_samples(tokens, n_samples=0, seq_len=10)
    assert raised.value.key == "n_samples"
    with pytest.raises(ConfigError):
        calibration_samples(tokens, n_samples=1, seq_len=1)
    with pytest.raises(DataError, match="1-D"):
        calibration_samples(tokens.reshape(10, 10), n_samples=1, seq_len=5)


# ---- GPTQ onto static ternary grids -------------------------------------------------------------

IN, OUT, TOKENS = 64, 32, 512


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(TOKENS, IN, generator=g)
    mixing = torch.randn(IN, IN, generator=g) / 8 + 0.3 * torch.eye(IN)
    x = z @ mixing * torch.linspace(0.2, 3.0, IN)  # correlated inputs of unequal scales
    acc = HessianAccumulator(IN)
    acc.add_batch(x)
    return x, torch.randn(OUT, IN, generator=g), acc.hessian


def _output_error(x, weight, quantized):
    return ((x @ weight.T - x @ quantized.T) ** 2).sum().item()


@pytest.mark.parametrize("act_order", [False, True])
def test_ternary_gif_grid_gptq(act_order):
    x, weight, hessian = _problem()
    grid = TernaryGIFGrid(salient_fraction=0.1, salient_terms=2)
    result = gptq_quantize_detailed(weight, hessian, grid, block_size=16, act_order=act_order)
    salient = grid.salient_columns(weight, hessian)
    assert int(salient.sum()) == math.ceil(0.1 * IN)

    integers = result.integers
    assert torch.equal(integers, torch.round(integers))
    assert set(integers[:, ~salient].unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert integers[:, salient].abs().max() <= 2 and integers[:, salient].abs().max() == 2
    assert result.scales.shape == (OUT, IN) and result.group_index.tolist() == list(range(IN))
    torch.testing.assert_close(result.weight, integers * result.scales, rtol=0, atol=0)
    # one α per row on the ordinary columns, one scale per row on the salient ones
    ordinary, special = result.scales[:, ~salient], result.scales[:, salient]
    assert torch.equal(ordinary, ordinary[:, :1].expand_as(ordinary))
    assert torch.equal(special, special[:, :1].expand_as(special))
    assert _rows_distinct(result.weight) <= 3 + 5

    gif_error = _output_error(x, weight, result.weight)
    absmean = TernaryAbsMean()
    gptq_ternary = gptq_quantize_detailed(weight, hessian, absmean, block_size=16, act_order=act_order)
    assert set(gptq_ternary.integers.unique().tolist()) <= {-1.0, 0.0, 1.0}
    ternary_error = _output_error(x, weight, gptq_ternary.weight)
    rounded_error = _output_error(x, weight, absmean(weight))
    assert gif_error < ternary_error < rounded_error, (gif_error, ternary_error, rounded_error)


@pytest.mark.parametrize("grid", [TernaryAbsMean(), TernaryGIFGrid()])
def test_static_grids_zero_a_dead_input(grid):
    x, weight, _ = _problem()
    x[:, 5] = 0.0  # an input channel that never fires
    acc = HessianAccumulator(IN)
    acc.add_batch(x)
    result = gptq_quantize_detailed(weight, acc.hessian, grid, block_size=16, act_order=True)
    assert bool((result.weight[:, 5] == 0).all()) and bool(torch.isfinite(result.weight).all())
    assert _output_error(x, weight, result.weight) < _output_error(x, weight, TernaryAbsMean()(weight))


def test_ternary_gif_grid_checks():
    _, weight, hessian = _problem()
    everything = TernaryGIFGrid(salient_fraction=1.0).salient_columns(weight, hessian)
    assert bool(everything.all())
    nothing = TernaryGIFGrid(salient_fraction=0.0)
    scales, levels = nothing.column_grid(weight, hessian)
    assert levels.tolist() == [1] * IN
    torch.testing.assert_close(scales[:, :1], weight.abs().mean(1, keepdim=True))
    with pytest.raises(ConfigError):
        TernaryGIFGrid(salient_fraction=1.5)
    with pytest.raises(ConfigError):
        TernaryGIFGrid(salient_terms=0)


# ---- learnable weight clipping ------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [None, 8])
def test_learnable_clipping_at_full_range_is_round_to_nearest(group_size):
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    rtn = RoundToNearest(bits=4, group_size=group_size)
    clip = LearnableClipping.like(rtn, weight)
    assert clip.clip_logit.shape == (16, 32 // (group_size or 32), 1) and clip.bits == 4
    with torch.no_grad():
        clip.clip_logit.fill_(50.0)  # sigmoid = 1: the full range
    torch.testing.assert_close(clip(weight), rtn(weight), rtol=0, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_learnable_clipping_levels_and_gradient(bits):
    weight = torch.randn(8, 24, generator=torch.Generator().manual_seed(1))
    clip = LearnableClipping(8, 24, bits=bits, init=0.0)  # half the max
    quantized = clip(weight)
    assert _rows_distinct(quantized) <= 2 ** bits - 1
    bound = 0.5 * weight.abs().amax(1, keepdim=True)
    assert bool((quantized.abs() <= bound + 1e-6).all())
    assert bool((quantized.abs().amax(1, keepdim=True) - bound).abs().max() < 1e-6)  # the clip is reached
    loss = ((quantized - weight) ** 2).sum()
    loss.backward()
    assert clip.clip_logit.grad is not None and bool(torch.isfinite(clip.clip_logit.grad).all())
    assert bool((clip.clip_logit.grad != 0).all())
    # clipping to half the range loses the large weights: the gradient widens the range
    assert bool((clip.clip_logit.grad < 0).any())


def test_learnable_clipping_refuses_a_group_that_does_not_divide():
    with pytest.raises(ConfigError):
        LearnableClipping(4, 30, bits=4, group_size=8)


# ---- smoothing (LET) is an identity in floating point ------------------------------------------

def _randomize_norms(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5 if "norm" in name
                        else torch.randn(p.shape, generator=g, dtype=p.dtype))


def _check_smoothing_is_exact(model, ids):
    model = model.double()
    _randomize_norms(model)
    inputs = capture_block_inputs(model, ids, batch_size=1)
    assert len(inputs.hidden) == ids.shape[0]
    block = decoder_blocks(model)[0]
    consumers = ("self_attn.q_proj", "mlp.gate_proj", "self_attn.o_proj", "mlp.down_proj")
    g = torch.Generator().manual_seed(7)
    absmax = {name: torch.rand(block.get_submodule(name).in_features, generator=g) + 0.1 for name in consumers}
    scales = SmoothingScales(block, absmax, alpha=0.5)
    assert set(scales.log_scales) == {"qkv", "gate_up", "v_o", "up_down"}
    with torch.no_grad():
        for log_scale in scales.log_scales.values():
            log_scale.copy_(torch.randn(log_scale.shape, generator=g))  # scales between e^-3 and e^3
    params = dict(block.named_parameters())
    replaced = scales.transformed(params)
    assert {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
            "mlp.down_proj.weight"} <= set(replaced)
    for name, value in replaced.items():
        assert value.shape == params[name].shape and not torch.allclose(value, params[name]), name
    for i in range(len(inputs.hidden)):
        with torch.no_grad():
            expected = run_block(block, inputs, i)
            out = functional_call(block, replaced, (inputs.hidden[i], *inputs.args[i]), inputs.kwargs[i],
                                  strict=False)
        out = out[0] if isinstance(out, (tuple, list)) else out
        torch.testing.assert_close(out, expected)
    return scales


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_smoothing_keeps_the_hf_block_output(arch):
    model = _hf(arch)
    if arch == "qwen2":  # q/k/v biases: v's is divided with its weight
        assert model.model.layers[0].self_attn.v_proj.bias is not None
    scales = _check_smoothing_is_exact(model, _ids())
    v_o = next(p for p in scales.pairs if p.name == "v_o")
    assert v_o.repeat == 2  # GQA: 4 query heads over 2 key/value heads
    assert (("self_attn.v_proj.bias", 0) in v_o.divide) == (arch == "qwen2")


def test_smoothing_keeps_the_hf_block_output_without_gqa():
    scales = _check_smoothing_is_exact(_hf("llama", num_key_value_heads=4), _ids())
    assert next(p for p in scales.pairs if p.name == "v_o").repeat == 1


def test_smoothing_keeps_the_native_block_output():
    torch.manual_seed(0)
    model = LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64,
                        max_seq_len=32).build().eval()
    _check_smoothing_is_exact(model, _ids())


def test_smoothing_refuses_other_blocks():
    block = decoder_blocks(_hf("opt"))[0]
    with pytest.raises(ConfigError, match="LLaMA-like"):
        SmoothingScales(block, {})


# ---- block-wise calibration ---------------------------------------------------------------------

def _spiking_llama(seed=0, **kw):
    return spikify(_hf("llama", seed, **kw), encoder=lambda: GIFEncoder(bits=4, signed=True),
                   weight_quantizer=lambda: RoundToNearest(bits=4))


def test_block_calibration_folds_clipping_and_smoothing():
    model = _spiking_llama()
    reference = _hf("llama")
    samples = _ids(4, 16)
    before = _logits(model, samples)
    results = block_calibration(model, samples, epochs=3)
    assert [r.index for r in results] == [0, 1]
    assert sum(r.final_mse for r in results) < sum(r.initial_mse for r in results)
    assert not model.training
    layers = spiking_modules(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        assert layer.weight_quantizer is None, name
        assert isinstance(layer.encoder, GIFEncoder), name
        assert _rows_distinct(layer.weight) <= 15, name
        assert layer.weight.requires_grad  # flags restored
    # the folded block computes what calibration measured: its final MSE to the FP block, on the
    # inputs the calibrated blocks before it produce
    inputs = capture_block_inputs(model, samples)
    for block, fp_block, result in zip(decoder_blocks(model), decoder_blocks(reference), results):
        with torch.no_grad():
            outputs = [run_block(block, inputs, i) for i in range(len(inputs.hidden))]
            targets = [run_block(fp_block, inputs, i) for i in range(len(inputs.hidden))]
        mse = sum(float(torch.nn.functional.mse_loss(o, t)) for o, t in zip(outputs, targets)) / len(outputs)
        assert mse == pytest.approx(result.final_mse, rel=1e-4), result
        inputs.hidden = outputs
    # and the calibrated model still computes roughly what the floating-point one does
    after, fp = _logits(model, samples), _logits(reference, samples)
    assert not torch.equal(after, before)
    assert (after - fp).norm() / fp.norm() < 0.2


def test_block_calibration_never_ends_worse_than_it_started():
    """The stage reports each block's output MSE before and after; what it folds in must not be
    worse than where it started (default learning rates, a few random tiny models)."""
    worse = []
    for seed in range(5):
        model = _spiking_llama(seed)
        for r in block_calibration(model, _ids(4, 16, seed=seed), epochs=2):
            if r.final_mse > r.initial_mse:
                worse.append((seed, r.index, f"{r.initial_mse:.4g} -> {r.final_mse:.4g}"))
    assert not worse, f"(seed, block, MSE) that calibration made worse: {worse}"


def test_smoothing_alone_folds_to_the_same_function():
    """No encoder, no grid: LET's fold is an exact reparametrization of the FP model."""
    model = spikify(_hf("llama"))
    original = copy.deepcopy(model)
    samples = _ids(2, 10)
    results = block_calibration(model, samples, epochs=2, lwc=False, let=True)
    assert all(r.initial_mse < 1e-10 for r in results)
    changed = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(changed, original.model.layers[0].input_layernorm.weight)
    torch.testing.assert_close(_logits(model, samples), _logits(original, samples), rtol=1e-4, atol=1e-5)


def test_block_calibration_refusals():
    opt = spikify(_hf("opt"), weight_quantizer=lambda: RoundToNearest(bits=4))
    with pytest.raises(ConfigError) as raised:
        block_calibration(opt, _ids(2, 8), epochs=1, let=True)
    assert raised.value.key == "convert.stages.block.let" and "let=false" in str(raised.value)
    results = block_calibration(opt, _ids(2, 8), epochs=1, let=False)
    assert len(results) == 2 and all(layer.weight_quantizer is None for layer in spiking_modules(opt).values())

    rotated = spikify(_hf("llama"), weight_quantizer=lambda: RoundToNearest(bits=4), rotate=True)
    with pytest.raises(ConfigError) as raised:
        block_calibration(rotated, _ids(2, 8), epochs=1, let=True)
    assert raised.value.key == "convert.stages.block.let"
    # a failed calibration leaves the grids in place
    assert all(isinstance(layer.weight_quantizer, RoundToNearest) for layer in spiking_modules(rotated).values())


def test_native_llama_calibrates_and_quantizes():
    config = LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
    torch.manual_seed(0)
    model = config.build(encoder=lambda: GIFEncoder(bits=4, signed=True),
                         weight_quantizer=lambda: RoundToNearest(bits=4)).eval()
    results = block_calibration(model, _ids(2, 16), epochs=1)
    assert len(results) == 2
    assert all(m.weight_quantizer is None and _rows_distinct(m.weight) <= 15 for m in model.spiking_linears().values())

    torch.manual_seed(0)
    model = config.build(encoder=lambda: GIFEncoder(bits=4, signed=True)).eval()
    errors = gptq_model(model, _ids(2, 16), grid=TernaryGIFGrid())
    assert len(errors) == 14
    assert all(_rows_distinct(m.weight) <= 8 for m in model.spiking_linears().values())


def test_floating_point_context_restores_encoders_and_grids():
    model = _spiking_llama()
    layer = model.model.layers[0].mlp.up_proj
    encoder, quantizer = layer.encoder, layer.weight_quantizer
    with pytest.raises(RuntimeError):
        with floating_point(model):
            assert layer.encoder is None and layer.weight_quantizer is None
            raise RuntimeError
    assert layer.encoder is encoder and layer.weight_quantizer is quantizer


# ---- GPTQ over a whole model --------------------------------------------------------------------

@pytest.mark.parametrize("grid, bound", [(RoundToNearest(bits=4), 15), (TernaryAbsMean(), 3),
                                         (TernaryGIFGrid(), 8)])
def test_gptq_model_puts_every_weight_on_the_grid(grid, bound):
    model = spikify(_hf("llama"), encoder=lambda: TernaryEncoder(bits=6))
    original = {name: layer.weight.detach().clone() for name, layer in spiking_modules(model).items()}
    errors = gptq_model(model, _ids(4, 16), grid=grid, block_size=16)
    assert len(errors) == 14 and all(0 <= e < 1 for e in errors.values())
    for name, layer in spiking_modules(model).items():
        assert layer.weight_quantizer is None and isinstance(layer.encoder, TernaryEncoder), name
        assert _rows_distinct(layer.weight) <= bound, name
    if isinstance(grid, RoundToNearest):  # integers times RTN's scale of the original row
        for name, layer in spiking_modules(model).items():
            w = layer.weight.detach()
            scale = original[name].abs().amax(1, keepdim=True) / 7
            torch.testing.assert_close(w / scale, torch.round(w / scale), rtol=0, atol=1e-4)


def test_fp32_hessians_quantize_as_float64_ones():
    """GPTQ accumulates and inverts fp32 Hessians (half the memory and time of float64);
    on a small model they choose the same integers almost everywhere and fit as well."""
    import copy

    model = spikify(_hf("llama"), encoder=lambda: TernaryEncoder(bits=6))
    double = copy.deepcopy(model)
    single_errors = gptq_model(model, _ids(4, 16), grid=RoundToNearest(bits=3), block_size=16)
    double_errors = gptq_model(double, _ids(4, 16), grid=RoundToNearest(bits=3), block_size=16,
                               hessian_dtype=torch.float64)
    same = [float((a.packed.integers() == b.packed.integers()).float().mean())
            for a, b in zip(spiking_modules(model).values(), spiking_modules(double).values())]
    assert min(same) > 0.98 and sum(same) / len(same) > 0.995, same
    mean = lambda errors: sum(errors.values()) / len(errors)  # noqa: E731
    assert mean(single_errors) == pytest.approx(mean(double_errors), rel=0.02)


def test_gptq_model_uses_the_layers_own_grid():
    model = spikify(_hf("opt"), weight_quantizer=lambda: RoundToNearest(bits=3))
    errors = gptq_model(model, _ids(2, 8))
    assert len(errors) == 12
    assert all(layer.weight_quantizer is None and _rows_distinct(layer.weight) <= 7
               for layer in spiking_modules(model).values())


def test_gptq_model_needs_exactly_one_grid():
    both = spikify(_hf("llama"), weight_quantizer=lambda: RoundToNearest(bits=4))
    weights = {n: p.detach().clone() for n, p in both.named_parameters()}
    with pytest.raises(ConfigError) as raised:
        gptq_model(both, _ids(2, 8), grid=RoundToNearest(bits=4))
    assert raised.value.key == "convert.stages.gptq.grid"
    assert all(torch.equal(weights[n], p) for n, p in both.named_parameters())  # nothing quantized

    neither = spikify(_hf("llama"))
    with pytest.raises(ConfigError) as raised:
        gptq_model(neither, _ids(2, 8))
    assert raised.value.key == "convert.stages.gptq.grid" and "no weight grid" in str(raised.value)

    with pytest.raises(ConfigError, match="spikify it first"):
        gptq_model(_hf("llama"), _ids(2, 8), grid=RoundToNearest(bits=4))


# ---- export -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from spikellm.data.corpus import load_documents
    from spikellm.data.tokenizer import build_tokenizer

    return build_tokenizer(load_documents("pydoc")[:200], vocab_size=512)


def _converted(tokenizer, tie: bool):
    """A spiking HF llama with OBS channel scales and activation thresholds."""
    model = _hf("llama", vocab_size=tokenizer.vocab_size, tie_word_embeddings=tie)
    spikify_from_config(model, GIF4)
    ids = torch.randint(0, tokenizer.vocab_size, (3, 16), generator=torch.Generator().manual_seed(2))
    allocate_steps(model, list(ids.split(1)), low_p=0.75, addbit=1, forward=causal_lm_logits)
    names = list(spiking_modules(model))
    thresholds = {name: 0.01 * (i + 1) for i, name in enumerate(names[::3])}
    install_thresholds(model, thresholds, names=names)
    with torch.no_grad():  # weights not at their init values, so nothing loads by accident
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, ids, {"neuron": GIF4, "thresholds": thresholds, "stages": {"obs": {"layers": len(names)}},
                        "source": "test"}


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_converted_give_the_same_logits(tmp_path, tokenizer, tie):
    model, ids, record = _converted(tokenizer, tie)
    expected = _logits(model, ids)
    directory = save_converted(model, tokenizer, tmp_path / "converted", record)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no temporary left beside it
    loaded, saved_record = load_converted(directory)
    assert saved_record == read_record(directory)
    assert saved_record["format"] == "spikellm-converted" and saved_record["version"] == 3
    assert {k: saved_record[k] for k in record} == record
    assert not loaded.training
    for name, layer in spiking_modules(loaded).items():
        original = spiking_modules(model)[name]
        assert isinstance(layer.encoder, GIFEncoder) and layer.encoder.bits == 4, name
        assert torch.equal(layer.encoder.channel_scale, original.encoder.channel_scale), name
        assert torch.equal(layer.weight, original.weight), name
    assert {n: float(g.threshold) for n, g in gates(loaded).items() if float(g.threshold) > 0} == \
        pytest.approx(record["thresholds"])
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)

    from spikellm.checkpoints.loader import load_model

    evaluated = load_model(directory)  # a LLaMA loads as our own, which equals transformers' to ≤ 1e-5
    torch.testing.assert_close(evaluated.model(ids), expected, rtol=0, atol=1e-5)
    assert evaluated.config["hf_model_type"] == "llama" and evaluated.config["neuron"] == GIF4
    with pytest.raises(ConfigError, match="carries its own encoders"):
        load_model(directory, neuron=GIF4)


def test_edited_converted_weights_are_refused(tmp_path, tokenizer):
    """The tensors' SHA-256 digests travel in the shards' metadata and are checked on load."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, _, record = _converted(tokenizer, False)
    directory = save_converted(model, tokenizer, tmp_path / "converted", record)
    path = str(directory / "model.safetensors")
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    tensors["model.embed_tokens.weight"][0, 0] += 1
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(DataError, match=r"tensor model.embed_tokens.weight are not those it was written with"):
        load_converted(directory)


def test_a_truncated_or_foreign_converted_model_is_a_data_error(tmp_path, tokenizer):
    model, _, record = _converted(tokenizer, True)
    directory = save_converted(model, tokenizer, tmp_path / "converted", record)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        load_converted(directory)

    (directory / RECORD).write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(DataError, match="not a spikellm converted model"):
        load_converted(directory)
    (directory / RECORD).write_text('{"format": ')
    with pytest.raises(DataError, match="incomplete"):
        read_record(directory)


def test_an_existing_directory_is_never_overwritten(tmp_path, tokenizer):
    model, _, record = _converted(tokenizer, False)
    target = tmp_path / "converted"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        save_converted(model, tokenizer, target, record)
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]


def test_a_failed_write_leaves_nothing_behind(tmp_path, tokenizer):
    target = tmp_path / "out" / "model"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(target) as tmp:
            assert tmp.parent == target.parent and tmp.is_dir()
            (tmp / "half.bin").write_bytes(b"x" * 100)
            raise RuntimeError("disk full")
    assert not target.exists() and list(target.parent.iterdir()) == []

    class Broken:
        eos_id = 0

        def save(self, directory):
            raise OSError("no space left on device")

    model, _, record = _converted(tokenizer, False)
    with pytest.raises(OSError):
        save_converted(model, Broken(), target, record)
    assert not target.exists() and list(target.parent.iterdir()) == []

    # overwrite=True replaces a directory only once the new one is complete
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            raise RuntimeError
    assert [p.name for p in target.parent.iterdir()] == ["model"] and (target / "old.txt").read_text() == "old"
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in target.parent.iterdir()] == ["model"]


# ---- our LLaMA as a Hugging Face one ------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_to_hf_llama_gives_the_same_logits(tie):
    torch.manual_seed(0)
    model = LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32,
                        rope_theta=500.0, norm_eps=1e-6, tie_embeddings=tie).build().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    hf_model = to_hf_llama(model)
    assert isinstance(hf_model, transformers.LlamaForCausalLM) and not hf_model.training
    assert (hf_model.lm_head.weight is hf_model.model.embed_tokens.weight) == tie
    ids = _ids(2, 20)
    torch.testing.assert_close(_logits(hf_model, ids), model(ids).detach(), rtol=0, atol=1e-5)


def test_save_hf_llama_round_trip_and_refusals(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = LlamaConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=4, ffn_dim=64,
                        max_seq_len=32).build().eval()
    directory = save_hf_llama(model, tokenizer, tmp_path / "hf")
    loaded = load_hf_causal_lm(directory)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(loaded, ids), model(ids).detach(), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="already exists"):
        save_hf_llama(model, tokenizer, directory)

    spiking = LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, ffn_dim=64,
                          max_seq_len=32).build(encoder=lambda: TernaryEncoder(bits=4))
    with pytest.raises(ConfigError, match="dense model"):
        to_hf_llama(spiking)
    with pytest.raises(ConfigError, match="dense model"):
        save_hf_llama(spiking, tokenizer, tmp_path / "spiking", dequantize=False)
    assert not (tmp_path / "spiking").exists()
    quantized = LlamaConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=4, ffn_dim=64,
                            max_seq_len=32).build(weight_quantizer=lambda: RoundToNearest(bits=4)).eval()
    with pytest.raises(ConfigError):
        to_hf_llama(quantized)
    # dequantized: the weights the projections multiply, in plain transformers (same logits: no encoders here)
    dequantized = load_hf_causal_lm(save_hf_llama(quantized, tokenizer, tmp_path / "dequantized"))
    torch.testing.assert_close(_logits(dequantized, ids), quantized(ids).detach(), rtol=0, atol=1e-5)
    rotated = LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, ffn_dim=64,
                          max_seq_len=32).build(rotate=True)
    with pytest.raises(ConfigError, match="rotated"):
        to_hf_llama(rotated, dequantize=True)
    with pytest.raises(ConfigError, match="SpikingLlama"):
        to_hf_llama(_hf("llama"))


# ---- distillation -------------------------------------------------------------------------------

def test_distillation_loss():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 11, generator=g)
    assert float(distillation_loss(teacher, teacher.clone(), temperature=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(teacher, teacher + 3.0, temperature=2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(torch.randn(2, 5, 11, generator=g), teacher)) > 0

    # two tokens over three words, by hand: T² · mean_tokens Σ p log(p / q) with p, q at temperature 2
    student_logits = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]
    teacher_logits = [[2.0, 0.0, 1.0], [0.0, 0.0, 4.0]]

    def softmax(row, t):
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]

    kls = []
    for s_row, t_row in zip(student_logits, teacher_logits):
        p, q = softmax(t_row, 2.0), softmax(s_row, 2.0)
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    expected = 4.0 * sum(kls) / 2
    loss = distillation_loss(torch.tensor([student_logits]), torch.tensor([teacher_logits]), temperature=2.0)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # bf16 logits are computed in fp32
    assert distillation_loss(teacher.bfloat16(), teacher.bfloat16()).dtype == torch.float32


def test_distillation_task_keeps_the_teacher_out():
    student, teacher = _hf("llama", 0), _hf("llama", 1)
    task = DistillationTask(student, teacher, max_steps=5, temperature=2.0)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert all(k.startswith("model.") for k in task.state_dict())
    assert sum(p.numel() for p in task.parameters()) == sum(p.numel() for p in student.parameters())
    ids = _ids(2, 9)
    batch = (ids[:, :-1], ids[:, 1:])
    task.log = lambda *a, **k: None  # outside a Trainer
    loss, tokens = task.training_loss(batch)
    assert tokens == 16 and float(loss.detach()) > 0
    loss.backward()
    assert student.model.layers[0].mlp.up_proj.weight.grad is not None
    same = DistillationTask(copy.deepcopy(teacher), teacher, max_steps=5)
    same.log = lambda *a, **k: None
    assert float(same.training_loss(batch)[0]) == pytest.approx(0.0, abs=1e-6)
