"""The analytic energy estimator (spikellm/energy/estimator.py) against hand counts and DESIGN.md §6."""
import math

import pytest

from spikellm.energy import load_cost_model
from spikellm.energy.estimator import PROJECTIONS, estimate_llama, llama2_7b
from spikellm.errors import ConfigError
from spikellm.models.llama import LlamaConfig

FP32 = load_cost_model("horowitz45_fp32")


def tiny() -> LlamaConfig:
    # head_dim 4, two query heads sharing one kv head
    return LlamaConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16, max_seq_len=8)


# tiny(), one sequence of 3 tokens, dense MACs by hand (tokens × in × out):
TINY_DENSE = {
    "layers.0.self_attn.q_proj": 3 * 8 * 8,  # 192
    "layers.0.self_attn.k_proj": 3 * 8 * 4,  # 96
    "layers.0.self_attn.v_proj": 3 * 8 * 4,  # 96
    "layers.0.self_attn.o_proj": 3 * 8 * 8,  # 192
    "layers.0.mlp.gate_proj": 3 * 8 * 16,  # 384
    "layers.0.mlp.up_proj": 3 * 8 * 16,  # 384
    "layers.0.mlp.down_proj": 3 * 16 * 8,  # 384
    # causal: queries see 1, 2, 3 keys = 6 pairs × head_dim 4 × 2 heads × (Q·Kᵀ and P·V)
    "layers.0.self_attn.products": (1 + 2 + 3) * 4 * 2 * 2,  # 96
    "lm_head": 3 * 8 * 10,  # 240
}


def by_name(report):
    return {layer.name: layer for layer in report.layers}


def test_llama2_7b_matches_the_paper():
    """DESIGN.md §6: LLaMA-2-7B, one 1,024-token sequence: ≈ 31.77 J (fp32 MACs), ≈ 3.97 J (W4A4)."""
    config, seq = llama2_7b(), 1024
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.ffn_dim, config.vocab_size,
            config.max_seq_len, config.head_dim) == (4096, 32, 32, 32, 11008, 32000, 4096, 128)
    per_layer_projections = 4 * 4096 * 4096 + 3 * 4096 * 11008  # q, k, v, o + gate, up, down per token
    projections = seq * 32 * per_layer_projections  # 6,476,005,376 per token
    lm_head = seq * 4096 * 32000
    attention = 32 * 32 * 2 * 128 * (seq * (seq + 1) // 2)  # layers × heads × (QKᵀ, PV) × head_dim × Σ t
    by_hand = projections + lm_head + attention
    assert by_hand == 6_903_220_404_224

    fp32 = estimate_llama(config, seq, FP32)
    w4a4 = estimate_llama(config, seq, load_cost_model("sdllm_w4a4"))
    print(f"\nLLaMA-2-7B, {seq} tokens: {fp32.macs:,.0f} MACs (by hand {by_hand:,}); "
          f"fp32 {fp32.joules:.3f} J, W4A4 {w4a4.joules:.4f} J")
    assert fp32.macs == by_hand == fp32.dense_macs == w4a4.macs
    assert fp32.acs == 0
    assert sum(layer.macs for layer in fp32.layers if layer.kind == "attention") == attention
    assert sum(layer.macs for layer in fp32.layers if layer.kind == "lm_head") == lm_head
    assert fp32.joules == pytest.approx(31.77, rel=0.01)
    assert w4a4.joules == pytest.approx(3.97, rel=0.01)
    assert fp32.ratio_to_dense == pytest.approx(1.0)
    assert len(fp32.layers) == 32 * 8 + 1
    assert (fp32.tokens, fp32.sequences) == (1024, 1)


def test_tiny_hand_counts():
    report = estimate_llama(tiny(), 3, FP32)
    assert [layer.name for layer in report.layers] == [
        "layers.0.self_attn.products", "layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj",
        "layers.0.self_attn.v_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.gate_proj",
        "layers.0.mlp.up_proj", "layers.0.mlp.down_proj", "lm_head"]
    kinds = {layer.name: layer.kind for layer in report.layers}
    assert kinds["lm_head"] == "lm_head" and kinds["layers.0.self_attn.products"] == "attention"
    assert {kinds[name] for name in TINY_DENSE if "_proj" in name} == {"projection"}
    for name, layer in by_name(report).items():
        assert (layer.macs, layer.acs, layer.dense_macs) == (TINY_DENSE[name], 0, TINY_DENSE[name]), name
        assert (layer.spikes, layer.activations, layer.steps) == (0, 0, 0)
    assert report.macs == 2064
    assert report.joules == pytest.approx(2064 * 4.6e-12)

    # two sequences: everything doubles (attention does not cross sequences)
    two = estimate_llama(tiny(), 3, FP32, sequences=2)
    assert (two.tokens, two.sequences) == (6, 2)
    assert {layer.name: layer.macs for layer in two.layers} == {k: 2 * v for k, v in TINY_DENSE.items()}


def test_tiny_spiking_hand_counts():
    rates = {"q_proj": 0.5, "k_proj": 0.25, "down_proj": 2.0}  # the others stay dense
    report = estimate_llama(tiny(), 3, FP32, spikes_per_activation=rates, steps={"q_proj": 4, "down_proj": 8},
                            spiking_attention=0.5)
    layers = by_name(report)
    # tokens × in × rate spikes, each adding one row of out entries; Δ_t times each output per token
    expected = {  # name: (macs, acs, scale_macs, spikes, activations, steps)
        "layers.0.self_attn.q_proj": (0, 3 * 8 * 0.5 * 8, 3 * 8, 12, 24, 4),  # 96 ACs
        "layers.0.self_attn.k_proj": (0, 3 * 8 * 0.25 * 4, 3 * 4, 6, 24, 0),  # 24 ACs
        "layers.0.self_attn.v_proj": (96, 0, 0, 0, 0, 0),
        "layers.0.self_attn.o_proj": (192, 0, 0, 0, 0, 0),
        "layers.0.mlp.gate_proj": (384, 0, 0, 0, 0, 0),
        "layers.0.mlp.up_proj": (384, 0, 0, 0, 0, 0),
        "layers.0.mlp.down_proj": (0, 3 * 16 * 2.0 * 8, 3 * 8, 96, 48, 8),  # 768 ACs
        # V per token: 3 tokens × 4 channels × 0.5 spikes; value j (0-based) reaches the 3 - j queries
        # i >= j of both query heads: 0.5 × 4 × (3 + 2 + 1) × 2 = 24 ACs, and P_ij·Δ_Vj once per pair and
        # head: 6 × 2 = 12 scale MACs. K per channel: the non-zero key elements (at most min(1, 0.5) of
        # them) times each of those queries: 0.5 × 4 × 6 × 2 = 24 MACs, and Δ·n of each: 0.5 × 12 = 6.
        "layers.0.self_attn.products": (24, 24, 12 + 6, 0.5 * 2 * 3 * 4, 2 * 3 * 4, 0),
        "lm_head": (240, 0, 0, 0, 0, 0),
    }
    for name, (macs, acs, scale, spikes, activations, steps) in expected.items():
        layer = layers[name]
        assert (layer.macs, layer.acs, layer.scale_macs, layer.spikes, layer.activations, layer.steps) == \
            (macs, acs, scale, spikes, activations, steps), name
        assert layer.dense_macs == TINY_DENSE[name], name
    assert layers["layers.0.self_attn.q_proj"].firing_rate == pytest.approx(0.5 / 4)
    assert layers["layers.0.self_attn.q_proj"].spikes_per_activation == pytest.approx(0.5)
    assert layers["layers.0.self_attn.k_proj"].firing_rate is None  # steps unknown
    assert report.acs == 96 + 24 + 768 + 24
    assert report.macs == 96 + 192 + 384 + 384 + 240 + 24 + (24 + 12 + 24 + 18)
    assert report.dense_macs == 2064

    # keys per token: the K side is accumulates too, with its own scale products
    token_keys = by_name(estimate_llama(tiny(), 3, FP32, spiking_attention=0.5, key_granularity="token"))
    products = token_keys["layers.0.self_attn.products"]
    assert (products.macs, products.acs, products.scale_macs) == (0, 48, 24)


def test_zero_spikes_cost_nothing_but_dense_macs_stay():
    report = estimate_llama(tiny(), 3, FP32, spikes_per_activation=0)
    for layer in report.layers:
        if layer.kind == "projection":
            assert (layer.macs, layer.acs, layer.spikes) == (0, 0, 0), layer.name
            assert layer.dense_macs == TINY_DENSE[layer.name] > 0
    assert report.macs == 96 + 240  # attention products and lm_head stay dense
    assert report.dense_macs == 2064
    # spiking attention at 0 too: only the head is left
    head_only = estimate_llama(tiny(), 3, FP32, spikes_per_activation=0.0, spiking_attention=0.0)
    assert head_only.macs == 240 and head_only.acs == 0
    assert head_only.ratio_to_dense == pytest.approx(240 / 2064)


def test_spiking_7b_ratio_and_to_dict():
    rate = 0.6  # E_AC × rate = 0.54 pJ < E_MAC = 4.6 pJ
    report = estimate_llama(llama2_7b(), 1024, FP32, spikes_per_activation=rate, steps=4, spiking_attention=rate)
    assert 0 < report.ratio_to_dense < 1
    dense = estimate_llama(llama2_7b(), 1024, FP32)
    head = 1024 * 4096 * 32000
    attention = 32 * 32 * 2 * 128 * (1024 * 1025 // 2)
    projections = dense.macs - head - attention
    # every projection's dense MACs become rate × ACs, plus Δ_t once per output and token
    outputs = 1024 * 32 * (4 * 4096 + 2 * 11008 + 4096)  # Σ tokens × out
    # attention: V per token, rate × its dense MACs as ACs and one P·Δ_V per (query, key) pair and head;
    # K per channel: the non-zero key elements (min(1, rate) of them) times their queries, as MACs
    pairs = 32 * 32 * (1024 * 1025 // 2)
    key_elements = rate * 1024 * 32 * 4096
    assert report.acs == pytest.approx(rate * projections + rate * attention / 2)
    assert report.macs == pytest.approx(head + outputs + rate * attention / 2 + pairs + key_elements)
    assert report.joules == pytest.approx((report.macs * 4.6 + report.acs * 0.9) * 1e-12)
    assert all(layer.firing_rate == pytest.approx(rate / 4) for layer in report.layers if layer.kind != "lm_head")

    result = report.to_dict()
    assert len(result["layers"]) == 32 * 8 + 1
    assert math.fsum(layer["joules"] for layer in result["layers"]) == pytest.approx(result["joules"], rel=1e-9)
    assert result["dense_macs"] == dense.macs
    assert result["ratio_to_dense"] == pytest.approx(report.joules / dense.joules)

    # an accumulate dearer than a MAC per activation makes the spiking model cost more
    assert estimate_llama(tiny(), 3, FP32, spikes_per_activation=6.0).ratio_to_dense > 1


def test_seq_len_scales_attention_quadratically():
    short, long = (by_name(estimate_llama(llama2_7b(), seq, FP32)) for seq in (512, 1024))
    assert long["layers.0.self_attn.q_proj"].macs == 2 * short["layers.0.self_attn.q_proj"].macs
    assert long["layers.0.self_attn.products"].macs == 32 * 2 * 128 * 1024 * 1025 // 2
    assert short["layers.0.self_attn.products"].macs == 32 * 2 * 128 * 512 * 513 // 2


@pytest.mark.parametrize("kwargs, key", [
    ({"seq_len": 0}, "seq_len"),
    ({"seq_len": 9}, "seq_len"),  # beyond max_seq_len=8
    ({"seq_len": 2.5}, "seq_len"),
    ({"sequences": 0}, "sequences"),
    ({"spikes_per_activation": -0.1}, "spikes_per_activation"),
    ({"spikes_per_activation": float("nan")}, "spikes_per_activation"),
    ({"spikes_per_activation": {"up_proj": -1.0}}, "spikes_per_activation.up_proj"),
    ({"spikes_per_activation": {"w_proj": 0.5}}, "spikes_per_activation.w_proj"),
    ({"spikes_per_activation": True}, "spikes_per_activation"),
    ({"steps": -1}, "steps"),
    ({"steps": {"attention": -2}}, "steps.attention"),
    ({"spiking_attention": -0.5}, "spiking_attention"),
    ({"spikes_per_activation": 0.5, "nonzero": 0.6}, "nonzero"),  # a non-zero count fires at least one spike
    ({"spikes_per_activation": 0.5, "nonzero": {"q_proj": -0.1}}, "nonzero.q_proj"),
    ({"spike_level": 0.5}, "spike_level"),
    ({"key_granularity": "head"}, "key_granularity"),
    ({"cost": "horowitz45_fp32"}, "cost"),
])
def test_invalid_arguments_name_the_key(kwargs, key):
    arguments = {"config": tiny(), "seq_len": 3, "cost": FP32, **kwargs}
    with pytest.raises(ConfigError) as error:
        estimate_llama(**arguments)
    assert error.value.key == key
    assert str(error.value).startswith(f"{key}=")


def test_matches_the_counter_on_a_dense_model():
    """Same names, kinds, order and dense counts as the exact counter run on a real (tiny) model."""
    import torch

    from spikellm.energy import OperationCounter

    config = tiny()
    torch.manual_seed(0)
    model = config.build()
    with OperationCounter(model) as counter, torch.no_grad():
        model(torch.randint(0, config.vocab_size, (2, 3)))
    counted = counter.report(FP32)
    estimated = estimate_llama(config, 3, FP32, sequences=2)
    assert [(layer.name, layer.kind, layer.counts()) for layer in counted.layers] == \
        [(layer.name, layer.kind, layer.counts()) for layer in estimated.layers]  # every raw count
    assert (counted.tokens, counted.sequences) == (estimated.tokens, estimated.sequences)


def test_projection_kinds():
    assert PROJECTIONS == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
