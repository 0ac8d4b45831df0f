"""The energy account with memory: counts against counts made by hand from the spike trains,
the dense reference on the same terms, spiking attention's scale products, reports read back and
repriced (DESIGN.md §6)."""
import json
import math

import pytest
import torch
from conftest import CONF
from omegaconf import OmegaConf

from spikellm.config import build_attention_encoder
from spikellm.energy import CostModel, EnergyReport, OperationCounter, estimate_llama, llama2_7b, load_cost_model
from spikellm.energy.cost import Operations
from spikellm.errors import DataError
from spikellm.models import LlamaConfig
from spikellm.neurons import GIFEncoder, TernaryEncoder

COST_MODELS = sorted(p.stem for p in (CONF / "energy").glob("*.yaml"))
CFG = LlamaConfig(vocab_size=11, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16, max_seq_len=8)
BATCH, SEQ = 2, 5
TOKENS = BATCH * SEQ
SHAPES = {  # projection → (in, out), head_dim 4, one kv head
    "self_attn.q_proj": (8, 8), "self_attn.k_proj": (8, 4), "self_attn.v_proj": (8, 4), "self_attn.o_proj": (8, 8),
    "mlp.gate_proj": (8, 16), "mlp.up_proj": (8, 16), "mlp.down_proj": (16, 8)}


def prices(**fields) -> CostModel:
    """A model whose terms are told apart by their prices."""
    return CostModel(name="test", mac_pj=1.0, ac_pj=10.0, graded_mac_pj=100.0, weight_read_pj=1e3,
                     activation_read_pj=1e4, activation_write_pj=1e5, event_pj=1e6, **fields)


def run(model, ids, keep=None):
    """Count one forward; ``keep``: module → name whose inputs are recorded (the hand count's data)."""
    seen, hooks = {}, []
    for module, name in (keep or {}).items():
        hooks.append(module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, i[0].detach())))
    try:
        with OperationCounter(model) as counter, torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return counter, seen


def by_name(report):
    return {layer.name: layer for layer in report.layers}


def train_facts(encoder, x):
    """From the temporal form, independent of the closed forms the counter uses: spike events,
    summed spike levels and non-zero elements, per element."""
    train, _ = encoder.spike_train(x)
    return (train != 0).sum(0).double(), train.abs().sum(0).double(), (encoder.decode(train) != 0).double()


@pytest.mark.parametrize("encoder", [lambda: TernaryEncoder(bits=3), lambda: GIFEncoder(bits=4, levels=4, signed=True)],
                         ids=["ternary", "gif"])
@pytest.mark.parametrize("weight_reads", ["per_spike", "per_input"])
@pytest.mark.parametrize("graded_spike", ["one_ac", "level_acs", "mac"])
def test_two_layer_model_against_hand_counts(encoder, weight_reads, graded_spike):
    torch.manual_seed(0)
    model = CFG.build(encoder=encoder)
    projections = {f"layers.{i}.{path}": getattr(getattr(model.layers[i], path.split(".")[0]), path.split(".")[1])
                   for i in range(2) for path in SHAPES}
    ids = torch.randint(0, 11, (BATCH, SEQ))
    counter, seen = run(model, ids, keep={layer: name for name, layer in projections.items()})
    cost = prices(weight_reads=weight_reads, graded_spike=graded_spike)
    report = counter.report(cost)
    layers = by_name(report)
    graded = isinstance(next(iter(projections.values())).encoder, GIFEncoder)
    total = Operations()
    for name, layer in projections.items():
        in_features, out = SHAPES[name.split(".", 2)[2]]
        spikes, levels, nonzero = train_facts(layer.encoder, seen[name])
        n_spikes, n_levels, n_nonzero = spikes.sum().item(), levels.sum().item(), nonzero.sum().item()
        assert n_spikes > 0 and (n_levels > n_spikes) == graded  # some GIF spike has a level above 1
        active_tokens = nonzero.reshape(-1, in_features).any(-1).sum().item()
        sops = n_spikes * out
        expected = Operations(
            macs=active_tokens * out,  # Δ_t times each output of a token that spiked
            acs={"one_ac": sops, "level_acs": n_levels * out, "mac": 0 if graded else sops}[graded_spike],
            graded_macs=sops if graded and graded_spike == "mac" else 0,
            weight_reads=sops if weight_reads == "per_spike" else n_nonzero * out,
            activation_reads=0,  # spikes come as events
            activation_writes=TOKENS * out,
            events=n_spikes)
        assert report.operations(layers[name]) == expected, name
        # the dense reference: every weight per token, every input read, every output written
        assert report.dense_operations(layers[name]) == Operations(
            macs=TOKENS * in_features * out, weight_reads=TOKENS * in_features * out,
            activation_reads=TOKENS * in_features, activation_writes=TOKENS * out), name
        total = Operations(*(a + b for a, b in zip(vars(total).values(), vars(expected).values())))
    head = report.operations(layers["lm_head"])
    assert head == Operations(macs=TOKENS * 8 * 11, weight_reads=TOKENS * 8 * 11, activation_reads=TOKENS * 8,
                              activation_writes=TOKENS * 11)
    attention = BATCH * 2 * (SEQ * (SEQ + 1) // 2) * 4 * 2  # batch × heads × causal pairs × head_dim × (QK, PV)
    # float attention: MACs; the KV cache in float: K and V written once per token (1 kv head of 4),
    # each cached row read by every query of its group (2 query heads share it), P written and read
    kv_writes = 2 * TOKENS * 4
    kv_reads = 2 * BATCH * (SEQ * (SEQ + 1) // 2) * 4
    scores = BATCH * 2 * (SEQ * (SEQ + 1) // 2)
    memory = Operations(macs=attention, activation_reads=kv_reads + scores, activation_writes=kv_writes + scores)
    for i in range(2):
        assert report.operations(layers[f"layers.{i}.self_attn.products"]) == memory
        assert report.dense_operations(layers[f"layers.{i}.self_attn.products"]) == memory
    total = Operations(*(a + b for a, b in zip(vars(total).values(), (0, 0, 0, 0, 2 * memory.activation_reads,
                                                                        2 * memory.activation_writes, 0))))
    # energy by term, in picojoules: compute, weights, activations, events
    split = report.energy
    pj = 1e-12
    assert split.compute == pytest.approx(((total.macs + head.macs + 2 * attention) * 1 + total.acs * 10
                                           + total.graded_macs * 100) * pj)
    assert split.weight_memory == pytest.approx((total.weight_reads + head.weight_reads) * 1e3 * pj)
    assert split.activation_memory == pytest.approx(((total.activation_reads + head.activation_reads) * 1e4
                                                     + (total.activation_writes + head.activation_writes) * 1e5) * pj)
    assert split.events == pytest.approx(total.events * 1e6 * pj)
    assert report.joules == pytest.approx(split.total)


def test_dense_model_reads_every_weight_per_token():
    torch.manual_seed(1)
    model = CFG.build()
    counter, _ = run(model, torch.randint(0, 11, (BATCH, SEQ)))
    for name in COST_MODELS:
        report = counter.report(load_cost_model(name))
        for layer in report.layers:
            ops = report.operations(layer)
            if layer.kind == "projection":
                in_features, out = SHAPES[layer.name.split(".", 2)[2]]
                assert ops == Operations(macs=TOKENS * in_features * out, weight_reads=TOKENS * in_features * out,
                                         activation_reads=TOKENS * in_features, activation_writes=TOKENS * out)
            assert ops == report.dense_operations(layer), layer.name
        assert report.ratio_to_dense == pytest.approx(1.0)
        assert report.dense_energy == report.energy


def test_zero_inputs_skip_their_weight_rows_and_reads():
    """A dense projection whose inputs are zeroed (activation sparsity) reads neither their rows nor them."""
    from spikellm.nn import SpikingLinear

    layer = SpikingLinear(4, 3)
    x = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, -1.0]])
    counter, _ = run(layer, x)
    report = counter.report(prices())
    assert report.operations(report.layers[0]) == Operations(macs=3 * 3, weight_reads=3 * 3, activation_reads=3,
                                                             activation_writes=2 * 3)
    assert report.dense_operations(report.layers[0]) == Operations(macs=24, weight_reads=24, activation_reads=8,
                                                                   activation_writes=6)


def attention_model(value_encoder=None, key_granularity="channel"):
    """The tiny model with spiking K/V from conf/neuron/ternary_attention.yaml (K per channel, V per token)."""
    neuron = OmegaConf.to_container(OmegaConf.load(CONF / "neuron" / "ternary_attention.yaml"))
    neuron["attention"]["key"]["granularity"] = key_granularity
    factory = build_attention_encoder(neuron)
    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=13, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=8)
    return cfg.build(attention_encoder=lambda role: value_encoder() if role == "value" and value_encoder else factory(role))


@pytest.mark.parametrize("key_granularity", ["channel", "token"])
@pytest.mark.parametrize("graded_values", [False, True])
def test_spiking_attention_scale_products(key_granularity, graded_values):
    values = (lambda: GIFEncoder(bits=5, levels=4, signed=True)) if graded_values else None
    model = attention_model(values, key_granularity)
    attention = model.layers[0].self_attn
    assert attention.encoder["key"].granularity == key_granularity
    assert attention.encoder["value"].granularity == "token"
    ids = torch.randint(0, 13, (2, 6))
    counter, seen = run(model, ids, keep={attention.encoder["key"]: "key", attention.encoder["value"]: "value"})
    report = counter.report(prices(graded_spike="level_acs"))
    products = by_name(report)["layers.0.self_attn.products"]
    # key/value j (0-based) of a kv head reaches the 6 - j queries i >= j of each of its 2 query heads
    fan = torch.arange(6, 0, -1, dtype=torch.float64) * 2  # [T]
    sops = level_sops = macs = scale = 0.0
    for role in ("key", "value"):
        spikes, levels, nonzero = train_facts(attention.encoder[role], seen[role])  # [B, H_kv, T, D]
        per_channel = attention.encoder[role].granularity == "channel"
        if per_channel:  # q_ic · (Δ_jc n_jc): each non-zero element times each query reaching it
            macs += (nonzero.sum(-1) * fan).sum().item()
            scale += nonzero.sum().item()  # Δ_jc · n_jc once per element
        else:  # each spike adds (P_ij·Δ_Vj) or q_ic; the products with Δ once per pair and query head
            sops += (spikes.sum(-1) * fan).sum().item()
            level_sops += (levels.sum(-1) * fan).sum().item()
            scale += (nonzero.any(-1).double() * fan).sum().item()
    assert (products.sops, products.level_sops, products.macs, products.scale_macs) == (sops, level_sops, macs, scale)
    assert scale > 0 and (macs > 0) == (key_granularity == "channel")
    pairs = 2 * 4 * 6 * 7 // 2  # batch × query heads × causal pairs: the most scale products per role
    assert scale <= 2 * pairs + (2 * 2 * 6 * 4 if key_granularity == "channel" else 0)
    assert (level_sops > sops) == graded_values
    # the KV cache holds signed counts: their width is the encoders' bits; the scores are floats
    bits = max(attention.encoder[role].bits for role in ("key", "value"))
    assert products.kv_bits == bits
    width, kv_writes, kv_reads, scores = bits / 32, 2 * 2 * 6 * 2 * 4, 2 * (pairs // 2) * 4, pairs
    ops = report.operations(products)
    assert ops == Operations(macs=macs + scale, acs=level_sops, events=products.spikes,
                             activation_reads=kv_reads * width + scores, activation_writes=kv_writes * width + scores)


def test_report_round_trip_and_reprice(tmp_path):
    model = attention_model()
    model_with_encoders = LlamaConfig(vocab_size=13, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=8).build(
        encoder=lambda: GIFEncoder(bits=4, levels=4, signed=True), attention_encoder=lambda role: TernaryEncoder(
            bits=3, granularity="channel" if role == "key" else "token", clip=2, residual="outlier"))
    for counted in (model, model_with_encoders):
        counter, _ = run(counted, torch.randint(0, 13, (2, 6)))
        fp32 = counter.report(load_cost_model("horowitz45_fp32"))
        path = fp32.save_json(tmp_path / "energy.json")
        data = json.loads(path.read_text())
        assert data["cost_model"]["name"] == fp32.cost.name and data["cost_model_description"] == fp32.cost.describe()
        layer = data["layers"][0]
        assert {"counts", "operations", "energy", "dense_operations", "dense_energy", "joules", "macs", "acs"} <= set(layer)
        assert set(layer["energy"]) == {"compute", "weight_memory", "activation_memory", "events", "total"}
        read = EnergyReport.from_dict(data)
        assert read.layers == fp32.layers and read.cost == fp32.cost and read.to_dict() == data
        for name in COST_MODELS:  # a tool prices a run's energy.json on every cost model
            cost = load_cost_model(name)
            assert read.reprice(cost).to_dict() == counter.report(cost).to_dict() == \
                EnergyReport.from_dict(data, cost=cost).to_dict()
    with pytest.raises(DataError, match="cannot be repriced"):
        EnergyReport.from_dict({"cost_model": {}, "layers": []})  # written before raw counts were kept


def test_memory_models_price_the_dense_reference_alike():
    """Dense work and spikes pay the same memory on the same terms, so × dense is a fair ratio: the
    reference reads every weight of the projections and the head once per token."""
    for name in COST_MODELS:
        cost = load_cost_model(name)
        dense = estimate_llama(llama2_7b(), 128, cost)
        spiking = estimate_llama(llama2_7b(), 128, cost, spikes_per_activation=0.6, steps=4)
        assert dense.ratio_to_dense == pytest.approx(1.0)
        assert spiking.dense_energy == dense.energy  # the same reference whatever the model does
        weighted = sum(layer.dense_macs for layer in dense.layers if layer.kind in ("projection", "lm_head"))
        assert dense.dense_energy.weight_memory == pytest.approx(weighted * cost.weight_read_pj * cost.scale * 1e-12)
        # per spike, 0.6 spikes per activation read 0.6 × the projections' dense weight reads
        projections = [layer for layer in spiking.layers if layer.kind == "projection"]
        reads = sum(spiking.operations(layer).weight_reads for layer in projections)
        assert reads == pytest.approx(0.6 * sum(layer.dense_macs for layer in projections))


def test_compute_only_models_keep_the_7b_reproduction():
    fp32 = estimate_llama(llama2_7b(), 1024, load_cost_model("horowitz45_fp32"))
    w4a4 = estimate_llama(llama2_7b(), 1024, load_cost_model("sdllm_w4a4"))
    assert fp32.macs == 6_903_220_404_224
    assert math.isclose(fp32.joules, 6_903_220_404_224 * 4.6e-12, rel_tol=1e-12)  # 31.755 J
    assert math.isclose(w4a4.joules, 6_903_220_404_224 * 4.6e-12 / 8, rel_tol=1e-12)  # 3.969 J
    assert fp32.energy.weight_memory == fp32.energy.activation_memory == fp32.energy.events == 0
    # with memory the same dense run costs more, all of it in the weight reads and activations
    sram = estimate_llama(llama2_7b(), 1024, load_cost_model("horowitz45_fp32_sram"))
    assert sram.energy.compute == pytest.approx(fp32.joules)
    assert sram.joules > 3 * fp32.joules


def test_every_figure_names_the_cost_model(tmp_path):
    counter, _ = run(attention_model(), torch.randint(0, 13, (1, 6)))
    for name in ("horowitz45_fp32", "horowitz45_fp32_sram"):
        report = counter.report(load_cost_model(name))
        table = report.rich_table("energy")
        assert report.cost.name in str(table.title) and table.caption == report.cost.describe()
        assert report.cost.name in report.summary() and report.cost.charges() in report.summary()
        assert report.save_figure(tmp_path / f"{name}.png").stat().st_size > 0


def test_an_energy_json_written_before_operand_bits_still_reads(tmp_path):
    """The cost model's operand width was called ``bits`` (named apart from the code widths)."""
    counter, _ = run(attention_model(), torch.randint(0, 13, (2, 6)))
    report = counter.report(load_cost_model("sdllm_w4a4"))
    data = report.to_dict()
    data["cost_model"]["bits"] = data["cost_model"].pop("operand_bits")
    again = EnergyReport.from_dict(data)
    assert again.cost.operand_bits == report.cost.operand_bits and again.joules == pytest.approx(report.joules)


@pytest.mark.parametrize("encoder", [lambda: TernaryEncoder(bits=3), lambda: GIFEncoder(bits=4, levels=4, signed=True)],
                         ids=["ternary", "gif"])
def test_graded_events_against_hand_counts(encoder):
    """``events: graded`` (SENECA, Loihi 2): a non-zero count is one event carrying its value: one
    read of its weight row and one multiply-accumulate per output, whatever the count; zeros send
    nothing. Against the temporal form's non-zero elements, on the two-layer model."""
    torch.manual_seed(0)
    model = CFG.build(encoder=encoder)
    projections = {f"layers.{i}.{path}": getattr(getattr(model.layers[i], path.split(".")[0]), path.split(".")[1])
                   for i in range(2) for path in SHAPES}
    counter, seen = run(model, torch.randint(0, 11, (BATCH, SEQ)), keep={layer: name for name, layer in projections.items()})
    report = counter.report(prices(events="graded", weight_reads="per_spike", graded_spike="level_acs"))
    layers = by_name(report)
    for name, layer in projections.items():
        in_features, out = SHAPES[name.split(".", 2)[2]]
        spikes, _, nonzero = train_facts(layer.encoder, seen[name])
        n_nonzero = nonzero.sum().item()
        assert n_nonzero < spikes.sum().item()  # some count is above 1: binary spikes would be more events
        active_tokens = nonzero.reshape(-1, in_features).any(-1).sum().item()
        assert report.operations(layers[name]) == Operations(
            macs=active_tokens * out, graded_macs=n_nonzero * out, acs=0, weight_reads=n_nonzero * out,
            activation_reads=0, activation_writes=TOKENS * out, events=n_nonzero), name


def test_seneca_prices_graded_events_and_loihi_binary_spikes():
    assert load_cost_model("seneca").events == "graded"
    assert load_cost_model("loihi").events == "binary"
    with pytest.raises(Exception, match="events='analog' is invalid: must be one of: binary, graded"):
        CostModel(name="x", mac_pj=1.0, ac_pj=1.0, events="analog")
