"""Cost models are data: the shipped YAML files, a user's file, and bad ones."""
import pytest
from conftest import CONF

from spikellm.energy import CostModel, load_cost_model
from spikellm.energy.cost import Operations
from spikellm.errors import ConfigError


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "energy").glob("*.yaml")))
def test_every_shipped_cost_model_loads(name):
    model = load_cost_model(name)
    assert model.mac_pj > 0 and model.ac_pj > 0 and model.source
    text = model.describe()
    assert text.startswith(model.name) and "charges compute" in text and "leaves out" in text
    assert "embeddings" in text and "softmax" in text  # never charged by any model
    # every memory term it charges is named with its price, every one it does not is listed as left out
    assert ("weight reads (" in text) == bool(model.weight_read_pj) != ("leaves out weight reads" in text)
    assert ("activation memory (" in text) == bool(model.activation_read_pj or model.activation_write_pj)
    assert ("spike events (" in text) == bool(model.event_pj)
    if model.weight_read_pj:
        per_spike = model.weight_reads == "per_spike" and model.events == "binary"  # graded: one event per input
        assert ("once per spike" if per_spike else "once per non-zero input") in text
        assert f"{model.weight_bits}-bit weight" in text
    assert {"one_ac": "one AC per graded spike", "level_acs": "k ACs per graded spike",
            "mac": "one MAC"}[model.graded_spike] in text
    # the compute-only models are named so, wherever only the name is shown
    assert ("compute only" in model.name) == (not model.charges_memory)


def test_horowitz_figures_and_bit_scaling():
    fp32 = load_cost_model("horowitz45_fp32")
    assert (fp32.mac_pj, fp32.ac_pj) == (4.6, 0.9)
    assert fp32.joules(macs=1e12, acs=1e12) == pytest.approx(5.5)
    w4a4 = load_cost_model("sdllm_w4a4")
    assert w4a4.joules(macs=1e12) == pytest.approx(4.6 / 8)  # energy × bits / 32


def test_a_user_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: my chip\nmac_pj: 1.0\nac_pj: 0.1\nweight_read_pj: 2.0\nweight_reads: per_input\n")
    model = load_cost_model(str(path))
    assert model.joules(macs=10, acs=10, weight_reads=1) == pytest.approx(13e-12)
    assert model.weight_reads == "per_input" and model.graded_spike == "one_ac"


def test_energy_terms():
    model = CostModel(name="x", mac_pj=1.0, ac_pj=0.5, graded_mac_pj=0.25, weight_read_pj=2.0,
                      activation_read_pj=3.0, activation_write_pj=4.0, event_pj=5.0, operand_bits=32, scale_bits=16)
    split = model.energy(Operations(macs=1, graded_macs=4, acs=2, weight_reads=1, activation_reads=1,
                                    activation_writes=1, events=1))
    half = 0.5e-12  # × 16/32
    assert split.compute == pytest.approx((1 + 1 + 1) * half)
    assert (split.weight_memory, split.activation_memory, split.events) == pytest.approx((2 * half, 7 * half, 5 * half))
    assert split.total == pytest.approx(15 * half)
    assert CostModel(name="x", mac_pj=3.0, ac_pj=1.0).graded_mac == 3.0  # mac_pj unless given


def test_unknown_name_lists_the_choices():
    with pytest.raises(ConfigError, match="energy='nope' is invalid: no such cost model; one of: .*horowitz45_fp32"):
        load_cost_model("nope")


def test_bad_fields(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmac_pj: 1.0\nac_pj: 0.1\nwatts: 3\n")
    with pytest.raises(ConfigError, match="fields must be those of CostModel"):
        load_cost_model(str(path))
    with pytest.raises(ConfigError, match="mac_pj=-1"):
        CostModel(name="x", mac_pj=-1, ac_pj=0.1)
    with pytest.raises(ConfigError, match="weight_reads='per_row' is invalid: must be one of: per_spike, per_input"):
        CostModel(name="x", mac_pj=1, ac_pj=0.1, weight_reads="per_row")
    with pytest.raises(ConfigError, match="graded_spike='two_acs' is invalid: must be one of: one_ac, level_acs, mac"):
        CostModel(name="x", mac_pj=1, ac_pj=0.1, graded_spike="two_acs")
    # the memory fields of earlier versions, which nothing charged, say what replaced them
    path.write_text("name: x\nmac_pj: 1.0\nac_pj: 0.1\nload_pj: 3.7\n")
    with pytest.raises(ConfigError, match="load_pj=3.7 is invalid: no longer a field: memory is charged by weight_read_pj"):
        load_cost_model(str(path))
