"""Energy cost models: data (``conf/energy/*.yaml``), never constants in code (DESIGN.md §6).

``energy = MACs · E_MAC + ACs · E_AC (+ memory terms)``, optionally scaled by ``bits / 32`` as
SDLLM does for low-bit models. A user adds a model by writing a YAML file with these fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spikellm.checks import check_float, check_int
from spikellm.errors import ConfigError

PICO = 1e-12


@dataclass(frozen=True)
class CostModel:
    """Energy per operation in picojoules.

    Args:
        name: shown in reports.
        mac_pj: one multiply-accumulate (dense floating-point or integer matmul work).
        ac_pj: one accumulate (a spike adding a weight row entry: a synaptic operation).
        bits: operand width the scaling refers to; with ``scale_bits`` set, energies are multiplied
            by ``scale_bits / bits`` (SDLLM's ``energy × bits/32`` for W4A4: bits 32, scale_bits 4).
        scale_bits: see ``bits``; None for no scaling.
        load_pj, store_pj: optional memory-access energy per operand load / result store.
        event_pj: optional energy per spike event sent on the network-on-chip.
        source: where the figures come from.
    """

    name: str
    mac_pj: float
    ac_pj: float
    bits: int = 32
    scale_bits: int | None = None
    load_pj: float = 0.0
    store_pj: float = 0.0
    event_pj: float = 0.0
    source: str = ""

    def __post_init__(self):
        for key in ("mac_pj", "ac_pj", "load_pj", "store_pj", "event_pj"):
            check_float(key, getattr(self, key), 0.0, 1e6)
        check_int("bits", self.bits, 1, 64)
        if self.scale_bits is not None:
            check_int("scale_bits", self.scale_bits, 1, 64)

    @property
    def scale(self) -> float:
        return 1.0 if self.scale_bits is None else self.scale_bits / self.bits

    def joules(self, macs: float = 0.0, acs: float = 0.0, loads: float = 0.0, stores: float = 0.0,
               events: float = 0.0) -> float:
        """Energy of the given operation counts, in joules."""
        picojoules = (macs * self.mac_pj + acs * self.ac_pj + loads * self.load_pj
                      + stores * self.store_pj + events * self.event_pj)
        return picojoules * self.scale * PICO


def load_cost_model(name_or_path: str, config_dir: str | Path | None = None) -> CostModel:
    """A cost model by name (``conf/energy/<name>.yaml``) or by path to a YAML file."""
    from omegaconf import OmegaConf

    path = Path(name_or_path)
    if not path.suffix:
        path = Path(config_dir or Path(__file__).resolve().parents[2] / "conf" / "energy") / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise ConfigError("energy", str(name_or_path), f"no such cost model; one of: {', '.join(available)} "
                                                       "or a path to a YAML file")
    fields = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    fields.pop("_target_", None)
    try:
        return CostModel(**fields)
    except TypeError as error:
        raise ConfigError("energy", str(path), f"fields must be those of CostModel: {error}") from None
