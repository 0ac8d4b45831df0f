"""The operation counter against counts worked out by hand (DESIGN.md §6)."""
import pytest
import torch

from spikellm.energy import OperationCounter, load_cost_model
from spikellm.models import LlamaConfig
from spikellm.neurons import GIFEncoder, TernaryEncoder
from spikellm.nn import SpikingLinear

X = torch.tensor([[3.0, -1.4, 0.2, -3.0]])  # absmax 3: with Q = 3 the step is 1 (no ties to round)


def count(layer, x):
    with OperationCounter(layer) as counter, torch.no_grad():
        layer(x)
    return counter.report(load_cost_model("horowitz45_fp32"))


@pytest.mark.parametrize("encoder,macs,acs,spikes", [
    (None, 4 * 5, 0, 0),  # dense: in × out MACs per token
    (TernaryEncoder(bits=3), 0, 7 * 5, 7),  # counts 3, -1, 0, -3: 7 spikes, each a row of 5
    (TernaryEncoder(bits=3, clip=1), 0, 3 * 5, 3),  # membrane clipping: 1, -1, 0, -1
    (TernaryEncoder(bits=3, clip=1, residual="outlier"), 2 * 5, 3 * 5, 3),  # 2 outlier events, one MAC row each
    (GIFEncoder(bits=3, levels=2, signed=True), 0, 7 * 5, 7),  # L = 2: binary GIF, one spike per count
    (GIFEncoder(bits=3, levels=4, signed=True), 0, 3 * 5, 3),  # L = 4: |3| and |-3| one spike each, -1 one
])
def test_projection_counts(encoder, macs, acs, spikes):
    layer = SpikingLinear(4, 5, encoder=encoder)
    ops = count(layer, X).layers[0]
    assert (ops.macs, ops.acs, ops.spikes, ops.dense_macs) == (macs, acs, spikes, 4 * 5)


def test_zero_input_costs_nothing():
    report = count(SpikingLinear(4, 5, encoder=TernaryEncoder(bits=4)), torch.zeros(3, 4))
    ops = report.layers[0]
    assert (ops.macs, ops.acs, ops.spikes, ops.activations, ops.dense_macs) == (0, 0, 0, 12, 3 * 4 * 5)
    assert report.joules == 0 and report.tokens == 3


def test_channel_allocation_adds_the_extra_spikes():
    encoder = TernaryEncoder(bits=3)
    encoder.allocate_channels(torch.tensor([True, False, False, False]), addbit=1)
    ops = count(SpikingLinear(4, 5, encoder=encoder), X).layers[0]
    assert ops.spikes == 6 + 1 + 0 + 3  # channel 0 has step 1/2: count 6
    assert ops.acs == 10 * 5


def test_rotated_layer_counts_the_spikes_of_the_rotated_input():
    torch.manual_seed(0)
    layer = SpikingLinear(8, 3, encoder=TernaryEncoder(bits=4), rotate=True)
    x = torch.randn(2, 8)
    from spikellm.ops.hadamard import hadamard_transform
    counts, _ = layer.encoder.encode(hadamard_transform(x))
    assert count(layer, x).layers[0].spikes == counts.abs().sum().item()


def test_dense_llama_counts_match_the_formula():
    cfg = LlamaConfig(vocab_size=11, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16, max_seq_len=8)
    batch, seq = 3, 5
    report = count(cfg.build(), torch.randint(0, 11, (batch, seq)))
    tokens = batch * seq
    projections = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16  # q, k, v (1 kv head of 4), o, gate/up/down
    attention = 2 * batch * 2 * (seq * (seq + 1) // 2) * 4  # QK and PV, 2 heads, causal pairs, head_dim 4
    expected = cfg.n_layers * (tokens * projections + attention) + tokens * 8 * 11
    assert report.macs == report.dense_macs == expected
    assert report.acs == 0 and report.ratio_to_dense == 1.0 and (report.tokens, report.sequences) == (15, 3)


def test_spiking_attention_counts_equal_counting_the_trains():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=13, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=8)
    model = cfg.build(attention_encoder=lambda role: TernaryEncoder(bits=3, granularity="channel" if role == "key" else "token"))
    attention = model.layers[0].self_attn
    seen = {}
    for role in ("key", "value"):
        attention.encoder[role].register_forward_hook(lambda m, i, o, role=role: seen.__setitem__(role, i[0]))
    ids = torch.randint(0, 13, (2, 6))
    report = count(model, ids)
    products = next(layer for layer in report.layers if layer.kind == "attention")
    trains = {role: attention.encoder[role].spike_train(seen[role])[0] for role in ("key", "value")}  # [T_steps, B, H_kv, T, D]
    events = (trains["value"] != 0).sum(dim=(0, 4))  # [B, H_kv, T]: spike events of each value position
    elements = (trains["key"] != 0).any(dim=0).sum(dim=-1)  # non-zero key elements of each key position
    active = (trains["value"] != 0).any(dim=0).any(dim=-1)  # values with a spike: P_ij·Δ_Vj is needed
    acs = macs = scale = 0
    for i in range(6):  # every query position attends to positions 0..i, each query head of the group
        acs += events[:, :, : i + 1].sum().item() * 2  # V per token: each spike adds P_ij·Δ_Vj
        macs += elements[:, :, : i + 1].sum().item() * 2  # K per channel: q_ic times each non-zero Δ_jc·n_jc
        scale += active[:, :, : i + 1].sum().item() * 2
    assert (products.sops, products.macs) == (acs, macs)
    assert products.scale_macs == scale + elements.sum().item()  # and Δ_jc·n_jc once per key element
    assert 0 < scale <= 2 * 4 * 21  # at most every (query, key) pair of every query head
