import pytest
import torch
import transformers

from spikellm.errors import ConfigError
from spikellm.models.llama import LlamaConfig, SpikingLlama, from_hf_llama
from spikellm.neurons import TernaryEncoder
from spikellm.quant import RoundToNearest


def tiny_hf_llama(tie: bool, kv_heads: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=tie, attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie,kv_heads", [(False, 2), (True, 4), (False, 1)])
def test_matches_transformers_llama(tmp_path, tie, kv_heads):
    hf = tiny_hf_llama(tie, kv_heads)
    hf.save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ours = from_hf_llama(hf).eval()
    ids = torch.randint(0, 97, (3, 37))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() <= 1e-5


def test_spiking_model_runs_and_backprops():
    cfg = LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    model = cfg.build(encoder=lambda: TernaryEncoder(bits=4), weight_quantizer=lambda: RoundToNearest(bits=4))
    assert len(model.spiking_linears()) == 2 * 7
    ids = torch.randint(0, 50, (2, 16))
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_temporal_forward_equals_collapsed_in_every_projection():
    cfg = LlamaConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, max_seq_len=16)
    model = cfg.build(encoder=lambda: TernaryEncoder(bits=5, clip=6))
    x = torch.randn(2, 7, 32)
    for layer in model.spiking_linears().values():
        inputs = x if layer.in_features == 32 else torch.randn(2, 7, layer.in_features)
        torch.testing.assert_close(layer.forward_temporal(inputs), layer(inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field,value", [("dim", 0), ("n_heads", 3), ("n_kv_heads", 3), ("vocab_size", -1)])
def test_bad_architecture_names_the_key(field, value):
    with pytest.raises(ConfigError, match=field):
        LlamaConfig(**{field: value})


def test_longer_than_max_seq_len_is_refused():
    model = SpikingLlama(LlamaConfig(vocab_size=10, dim=16, n_heads=2, n_layers=1, max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
