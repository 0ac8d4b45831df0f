"""Module surgery on tiny random Hugging Face causal LMs (spikellm.models.spikify)."""
import copy

import pytest
import torch
import transformers
from torch import nn

from spikellm.errors import ConfigError
from spikellm.models.spikify import projection_names, spikify, spikify_from_config, spiking_modules
from spikellm.neurons import TernaryEncoder
from spikellm.nn.spiking_linear import SpikingLinear
from spikellm.quant.weights import RoundToNearest

VOCAB, HIDDEN, LAYERS, HEADS = 64, 32, 2, 4
_DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_DECODER),
    "mistral": lambda: transformers.MistralConfig(**_DECODER, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**_DECODER),
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=LAYERS,
                                          num_attention_heads=HEADS, max_position_embeddings=64,
                                          word_embed_proj_dim=HIDDEN),
    "rwkv": lambda: transformers.RwkvConfig(vocab_size=VOCAB, hidden_size=HIDDEN, attention_hidden_size=HIDDEN,
                                            intermediate_size=64, num_hidden_layers=LAYERS, context_length=64),
}
# the projections each block must have replaced
PER_BLOCK = {
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
    "rwkv": {"attention.key", "attention.value", "attention.receptance", "attention.output",
             "feed_forward.key", "feed_forward.receptance", "feed_forward.value"},
}
PER_BLOCK["mistral"] = PER_BLOCK["qwen2"] = PER_BLOCK["llama"]
BLOCKS = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
          "opt": "model.decoder.layers", "rwkv": "rwkv.blocks"}
ARCHS = sorted(CONFIGS)


@pytest.fixture(scope="module")
def models():
    """One tiny random model per architecture (deep-copied by every test that changes it)."""
    built = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        built[arch] = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    return built


def _ids():
    return torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_surgery_without_encoder_is_exact(models, arch):
    original = models[arch]
    model = copy.deepcopy(original)
    ids = _ids()
    reference = _logits(original, ids)
    linears = {name: module for name, module in model.named_modules() if name in projection_names(model)}
    assert spikify(model) is model
    spiking = spiking_modules(model)
    # same tensors, not copies; everything outside the blocks stays floating point
    assert set(spiking) == set(linears)
    for name, layer in spiking.items():
        assert layer.weight is linears[name].weight and layer.bias is linears[name].bias
        assert layer.encoder is None and layer.weight_quantizer is None
        assert layer.rotation_folded.device == layer.weight.device
    assert not isinstance(model.get_output_embeddings(), SpikingLinear)
    assert torch.equal(_logits(model, ids), reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_ternary_encoder_stays_close(models, arch):
    original = models[arch]
    model = spikify(copy.deepcopy(original), encoder=lambda: TernaryEncoder(bits=8))
    ids = _ids()
    reference, spiked = _logits(original, ids), _logits(model, ids)
    relative = (spiked - reference).norm() / reference.norm()
    assert 0 < relative < 0.05, relative

    spiking = spiking_modules(model)
    assert len(spiking) == LAYERS * len(PER_BLOCK[arch])
    encoders = [layer.encoder for layer in spiking.values()]
    assert all(isinstance(e, TernaryEncoder) for e in encoders)
    assert len({id(e) for e in encoders}) == len(encoders)  # a fresh encoder per projection
    for block in range(LAYERS):
        prefix = f"{BLOCKS[arch]}.{block}."
        names = {name.removeprefix(prefix) for name in spiking if name.startswith(prefix)}
        assert names == PER_BLOCK[arch]
    # no other Linear was touched: the LM head and any non-listed linear stay plain nn.Linear
    others = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in spiking]
    assert all(type(m) is nn.Linear for m in others) and others


def test_biases_are_kept(models):
    for arch, biased in (("qwen2", {"q_proj", "k_proj", "v_proj"}), ("opt", None), ("llama", set())):
        spiking = spiking_modules(spikify(copy.deepcopy(models[arch])))
        for name, layer in spiking.items():
            expect = True if biased is None else name.rsplit(".", 1)[-1] in biased
            assert (layer.bias is not None) == expect, name


@pytest.mark.parametrize("arch", ["llama", "rwkv"])
def test_forward_temporal_matches_forward(models, arch):
    model = spikify(copy.deepcopy(models[arch]), encoder=lambda: TernaryEncoder(bits=6))
    name, layer = next(iter(spiking_modules(model).items()))
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        collapsed = layer(x)
    temporal = layer.forward_temporal(x)
    torch.testing.assert_close(temporal, collapsed, rtol=1e-4, atol=1e-5)


def test_weight_quantizer_and_rotation(models):
    original = models["llama"]
    model = spikify(copy.deepcopy(original), weight_quantizer=lambda: RoundToNearest(bits=8), rotate=True)
    layers = list(spiking_modules(model).values())
    assert all(isinstance(layer.weight_quantizer, RoundToNearest) and layer.rotate for layer in layers)
    assert len({id(layer.weight_quantizer) for layer in layers}) == len(layers)
    ids = _ids()
    reference, spiked = _logits(original, ids), _logits(model, ids)
    assert (spiked - reference).norm() / reference.norm() < 0.05


def test_from_config(models):
    neuron = {"encoder": {"_target_": "spikellm.neurons.TernaryEncoder", "_partial_": True, "bits": 8},
              "weight_quantizer": None, "unroll": True, "rotate": False}
    model = spikify_from_config(copy.deepcopy(models["opt"]), neuron)
    layers = list(spiking_modules(model).values())
    assert len(layers) == LAYERS * 6
    assert all(isinstance(layer.encoder, TernaryEncoder) and layer.unroll and not layer.rotate for layer in layers)
    assert layers[0].encoder.bits == 8
    exact = spikify_from_config(copy.deepcopy(models["opt"]), None)
    assert all(layer.encoder is None for layer in spiking_modules(exact).values())


def test_unsupported_architecture():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ConfigError) as raised:
        spikify(model)
    assert raised.value.key == "model_type" and raised.value.value == "gpt2"
    assert "llama, mistral, opt, qwen2, rwkv" in str(raised.value)


def test_spikify_twice_is_refused(models):
    model = spikify(copy.deepcopy(models["llama"]))
    with pytest.raises(ConfigError, match="already spiking"):
        spikify(model)


def test_keeps_dtype(models):
    model = copy.deepcopy(models["llama"]).to(torch.bfloat16)
    spikify(model, encoder=lambda: TernaryEncoder(bits=8))
    assert all(layer.weight.dtype == torch.bfloat16 for layer in spiking_modules(model).values())
    assert _logits(model, _ids()).dtype == torch.bfloat16
