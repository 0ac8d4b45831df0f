"""Spiking attention products (DESIGN.md §3.5, §4): Q·Kᵀ and P·V with K (per channel) and V spiking."""
import pytest
import torch
import torch.nn.functional as F
from conftest import CONF
from omegaconf import OmegaConf

from spikellm.config import build
from spikellm.models.llama import LlamaConfig, spiking_attention_temporal
from spikellm.neurons import BitPlaneEncoder, TernaryEncoder

CFG = LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)


def ternary_attention(role: str, **kwargs):
    return TernaryEncoder(bits=5, granularity="channel" if role == "key" else "token", **kwargs)


def test_no_attention_encoder_is_the_model_as_before():
    torch.manual_seed(0)
    before = CFG.build()
    torch.manual_seed(0)
    after = CFG.build(attention_encoder=None)
    assert all(layer.self_attn.encoder is None for layer in after.layers)
    ids = torch.randint(0, 50, (2, 16))
    assert torch.equal(before(ids), after(ids))


@pytest.mark.parametrize("n_kv_heads,factory", [
    (2, ternary_attention),
    (1, lambda role: ternary_attention(role, clip=6, residual="outlier")),  # outlier stream beside the train
    (2, lambda role: ternary_attention(role) if role == "key" else BitPlaneEncoder(bits=5, signed=True)),
])
def test_collapsed_equals_spike_train_reference_with_gqa(n_kv_heads, factory):
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=50, dim=64, n_layers=1, n_heads=8, n_kv_heads=n_kv_heads, max_seq_len=16)
    attn = cfg.build(attention_encoder=factory).layers[0].self_attn
    attn.encoder["key"].allocate_channels(torch.arange(cfg.head_dim) % 5 == 0, addbit=1)  # OBS on K channels
    q = torch.randn(2, 8, 13, cfg.head_dim)
    k, v = torch.randn(2, 2, n_kv_heads, 13, cfg.head_dim).unbind(0)
    k[..., 3] *= 20  # an outlier key channel, as real keys have
    collapsed = attn.attend(q, k, v)
    reference = spiking_attention_temporal(q, attn.encoder["key"], attn.encoder["value"], k, v)
    torch.testing.assert_close(reference, collapsed, rtol=1e-5, atol=1e-5)
    # and the products really are spiking: float attention differs by the quantization error
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (dense - collapsed).abs().max() > 1e-4


class AbsmaxOverAllTokens(TernaryEncoder):
    """A per-channel step from every token, later ones included: leaks the future (negative control)."""

    def step_size(self, x):
        return self.magnitude(x).amax(dim=-2, keepdim=True).clamp_min(1e-8) / self.step_levels


@pytest.mark.parametrize("key_encoder,causal", [(TernaryEncoder, True), (AbsmaxOverAllTokens, False)])
def test_later_tokens_leave_earlier_logits_unchanged(key_encoder, causal):
    torch.manual_seed(2)
    factory = lambda role: key_encoder(bits=5, granularity="channel") if role == "key" else TernaryEncoder(bits=5)
    model = CFG.build(encoder=lambda: TernaryEncoder(bits=5), attention_encoder=factory)
    ids = torch.randint(0, 50, (2, 16))
    changed = ids.clone()
    changed[:, 9:] = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        same = torch.allclose(model(ids)[:, :9], model(changed)[:, :9], rtol=0, atol=1e-5)
    assert same == causal


def test_gradients_are_finite_and_reach_every_parameter():
    torch.manual_seed(3)
    factory = lambda role: ternary_attention(role, learnable_step=True)  # LSQ: the step scales are parameters too
    model = CFG.build(encoder=lambda: TernaryEncoder(bits=5), attention_encoder=factory)
    ids = torch.randint(0, 50, (2, 16))
    F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    named = dict(model.named_parameters())
    assert any(".encoder.key." in name for name in named)
    for name, param in named.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_short_training_lowers_the_loss():
    torch.manual_seed(4)
    model = CFG.build(encoder=lambda: TernaryEncoder(bits=5), attention_encoder=ternary_attention)
    ids = torch.randint(0, 50, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < 0.7 * losses[0], losses


def test_ternary_attention_config_composes_and_builds():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["neuron=ternary_attention", "paths.output_dir=/tmp/x"])
    neuron = OmegaConf.to_container(cfg.neuron, resolve=True)
    assert set(neuron["attention"]) == {"key", "value"} and neuron["encoder"]["bits"] == 5
    factories = {role: build(node, f"neuron.attention.{role}") for role, node in neuron["attention"].items()}
    model = CFG.build(build(neuron["encoder"], "neuron.encoder"), attention_encoder=lambda role: factories[role]())
    assert model.layers[1].self_attn.encoder["key"].granularity == "channel"
    assert model.layers[1].self_attn.encoder["value"].granularity == "token"
    assert model(torch.randint(0, 50, (1, 8))).shape == (1, 8, 50)
