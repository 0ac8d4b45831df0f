"""Cost models are data: the shipped YAML files, a user's file, and bad ones."""
import pytest
from conftest import CONF

from spikellm.energy import CostModel, load_cost_model
from spikellm.errors import ConfigError


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "energy").glob("*.yaml")))
def test_every_shipped_cost_model_loads(name):
    model = load_cost_model(name)
    assert model.mac_pj > 0 and model.ac_pj > 0 and model.source


def test_horowitz_figures_and_bit_scaling():
    fp32 = load_cost_model("horowitz45_fp32")
    assert (fp32.mac_pj, fp32.ac_pj) == (4.6, 0.9)
    assert fp32.joules(macs=1e12, acs=1e12) == pytest.approx(5.5)
    w4a4 = load_cost_model("sdllm_w4a4")
    assert w4a4.joules(macs=1e12) == pytest.approx(4.6 / 8)  # energy × bits / 32


def test_a_user_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: my chip\nmac_pj: 1.0\nac_pj: 0.1\nload_pj: 2.0\n")
    model = load_cost_model(str(path))
    assert model.joules(macs=10, acs=10, loads=1) == pytest.approx(13e-12)


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
