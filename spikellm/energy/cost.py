"""Energy cost models: data (``conf/energy/*.yaml``), never constants in code (DESIGN.md §6).

A cost model is policy: it prices the raw operation counts of a run (:mod:`spikellm.energy.report`)
in four terms, each in picojoules per operation, optionally scaled by ``scale_bits / operand_bits`` as SDLLM does
for low-bit models:

* **compute**: dense multiply-accumulates (``mac_pj``), accumulates driven by spikes (``ac_pj``),
  and graded spikes as ``graded_spike`` says;
* **weight memory**: every weight element read (``weight_read_pj``, a weight of ``weight_bits``
  bits), once per non-zero input or once per spike (``weight_reads``);
* **activation memory**: inputs read and outputs written (``activation_read_pj``,
  ``activation_write_pj``) by the projections and the head;
* **events**: every spike sent on the chip's network (``event_pj``).

The figures of the ``horowitz45_*`` models without ``_sram`` and of ``sdllm_w4a4`` are compute
only (the papers' accounting). A user adds a model by writing a YAML file with these fields.
"""
from __future__ import annotations

from dataclasses import InitVar, dataclass
from pathlib import Path

from spikellm.checks import check_float, check_int
from spikellm.errors import ConfigError

PICO = 1e-12
WEIGHT_READS = ("per_spike", "per_input")
GRADED_SPIKES = ("one_ac", "level_acs", "mac")
EVENTS = ("binary", "graded")
#: What no cost model charges (DESIGN.md §4 keeps it in floating point, or it is not counted yet).
LEFT_OUT = ("embeddings", "norms", "rotary embeddings", "softmax", "SiLU and the SwiGLU product", "residual adds",
            "Hadamard rotations", "spike generation and neuron updates", "recurrent state memory")


@dataclass(frozen=True)
class Operations:
    """Operations of one layer as a cost model sees them: what :meth:`CostModel.energy` prices.

    ``macs`` are multiply-accumulates at ``mac_pj`` (floating-point work, scale products),
    ``graded_macs`` those of graded spikes at ``graded_mac_pj``, ``acs`` accumulates at ``ac_pj``.
    """

    macs: float = 0.0
    graded_macs: float = 0.0
    acs: float = 0.0
    weight_reads: float = 0.0
    activation_reads: float = 0.0
    activation_writes: float = 0.0
    events: float = 0.0


@dataclass(frozen=True)
class EnergySplit:
    """Energy in joules, by term."""

    compute: float = 0.0
    weight_memory: float = 0.0
    activation_memory: float = 0.0
    events: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.weight_memory + self.activation_memory + self.events

    def __add__(self, other: "EnergySplit") -> "EnergySplit":
        return EnergySplit(self.compute + other.compute, self.weight_memory + other.weight_memory,
                           self.activation_memory + other.activation_memory, self.events + other.events)

    def to_dict(self) -> dict:
        return {"compute": self.compute, "weight_memory": self.weight_memory,
                "activation_memory": self.activation_memory, "events": self.events, "total": self.total}


@dataclass(frozen=True)
class CostModel:
    """Energy per operation in picojoules. Defaults charge compute only, as the papers do.

    Args:
        name: shown in reports.
        mac_pj: one multiply-accumulate (dense floating-point or integer matmul work).
        ac_pj: one accumulate (a spike adding one weight to one output: a synaptic operation).
        operand_bits: operand width the prices refer to; with ``scale_bits`` set, every energy
            (memory terms included) is multiplied by ``scale_bits / operand_bits`` (SDLLM's
            ``energy × bits/32`` for W4A4: operand_bits 32, scale_bits 4). (Named apart from an
            encoder's and a weight quantizer's ``bits``, the code widths.)
        scale_bits: see ``operand_bits``; None for no scaling.
        event_pj: energy per spike event sent on the network-on-chip (every spike of an encoder).
        weight_read_pj: energy to read one weight element of ``weight_bits`` bits from the memory
            the model assumes. A dense layer (and the dense reference of every report) at batch 1
            reads every weight once per token it multiplies: ``tokens × in × out`` reads.
        weight_bits: width of a stored weight that ``weight_read_pj`` is the price of (shown in
            :meth:`describe`; a model with narrower packed weights needs a model with a lower price).
        weight_reads: how a spike-driven layer reads its weights: ``per_spike`` (the row of an
            input is read for every spike it emits, as an event-driven core does when each spike
            arrives) or ``per_input`` (once per non-zero input, the row reused by all its spikes).
        activation_read_pj, activation_write_pj: energy per activation element read or written: a
            projection reads its floating-point inputs (a dense one all ``in`` per token, zeros
            skipped; a spiking one only its outlier stream, its spikes come as events) and writes
            its ``out`` outputs per token.
        graded_spike: how a spike of level ``k > 1`` (multi-level GIF) is priced: ``one_ac`` (one
            accumulate whatever ``k``), ``level_acs`` (``k`` accumulates, as ``k`` merged IF spikes
            would be) or ``mac`` (one low-bit multiply-accumulate at ``graded_mac_pj``). Binary and
            ternary spikes have level 1 and cost one accumulate under every policy.
        graded_mac_pj: price of that multiply-accumulate; None for ``mac_pj``.
        events: what a projection's encoded input sends: ``binary`` spikes (a count ``n`` is ``|n|``
            spikes, each one event, its weight reads and accumulates, as on Loihi 1), or ``graded``
            events (a non-zero count is one event carrying ``n`` as its payload: one read of its
            weight row and one multiply-accumulate per output at ``graded_mac_pj``, whatever ``|n|``,
            as SENECA and Loihi 2 carry integer payloads). Zeros send nothing either way.
        source: where the figures come from.
    """

    name: str
    mac_pj: float
    ac_pj: float
    operand_bits: int = 32
    scale_bits: int | None = None
    event_pj: float = 0.0
    weight_read_pj: float = 0.0
    weight_bits: int = 32
    weight_reads: str = "per_spike"
    activation_read_pj: float = 0.0
    activation_write_pj: float = 0.0
    graded_spike: str = "one_ac"
    graded_mac_pj: float | None = None
    events: str = "binary"
    source: str = ""
    # fields of earlier versions, refused with what replaced them
    load_pj: InitVar[float | None] = None
    store_pj: InitVar[float | None] = None

    def __post_init__(self, load_pj, store_pj):
        for key, value in (("load_pj", load_pj), ("store_pj", store_pj)):
            if value is not None:
                raise ConfigError(key, value, "no longer a field: memory is charged by weight_read_pj (per weight "
                                              "element read), activation_read_pj and activation_write_pj")
        for key in ("mac_pj", "ac_pj", "event_pj", "weight_read_pj", "activation_read_pj", "activation_write_pj"):
            check_float(key, getattr(self, key), 0.0, 1e6)
        if self.graded_mac_pj is not None:
            check_float("graded_mac_pj", self.graded_mac_pj, 0.0, 1e6)
        check_int("operand_bits", self.operand_bits, 1, 64)
        check_int("weight_bits", self.weight_bits, 1, 64)
        if self.scale_bits is not None:
            check_int("scale_bits", self.scale_bits, 1, 64)
        if self.weight_reads not in WEIGHT_READS:
            raise ConfigError("weight_reads", self.weight_reads, "must be one of: " + ", ".join(WEIGHT_READS))
        if self.graded_spike not in GRADED_SPIKES:
            raise ConfigError("graded_spike", self.graded_spike, "must be one of: " + ", ".join(GRADED_SPIKES))
        if self.events not in EVENTS:
            raise ConfigError("events", self.events, "must be one of: " + ", ".join(EVENTS))

    @property
    def scale(self) -> float:
        return 1.0 if self.scale_bits is None else self.scale_bits / self.operand_bits

    @property
    def graded_mac(self) -> float:
        return self.mac_pj if self.graded_mac_pj is None else self.graded_mac_pj

    @property
    def charges_memory(self) -> bool:
        return bool(self.weight_read_pj or self.activation_read_pj or self.activation_write_pj)

    def energy(self, ops: Operations) -> EnergySplit:
        """Energy of ``ops`` in joules, by term."""
        to_joules = self.scale * PICO
        return EnergySplit(
            compute=(ops.macs * self.mac_pj + ops.graded_macs * self.graded_mac + ops.acs * self.ac_pj) * to_joules,
            weight_memory=ops.weight_reads * self.weight_read_pj * to_joules,
            activation_memory=(ops.activation_reads * self.activation_read_pj
                               + ops.activation_writes * self.activation_write_pj) * to_joules,
            events=ops.events * self.event_pj * to_joules)

    def joules(self, macs: float = 0.0, acs: float = 0.0, weight_reads: float = 0.0, activation_reads: float = 0.0,
               activation_writes: float = 0.0, events: float = 0.0, graded_macs: float = 0.0) -> float:
        """Energy of the given operation counts, in joules."""
        return self.energy(Operations(macs, graded_macs, acs, weight_reads, activation_reads, activation_writes,
                                      events)).total

    def charges(self) -> str:
        """What this model charges, in a few words (figure titles, summary lines)."""
        graded = {"one_ac": "graded spike = 1 AC", "level_acs": "graded spike = level ACs",
                  "mac": f"graded spike = 1 MAC ({_pj(self.graded_mac)})"}[self.graded_spike]
        if self.events == "graded":
            graded = f"graded events: a non-zero count = 1 event, 1 row read, 1 MAC ({_pj(self.graded_mac)}) per output"
        parts = [f"MAC {_pj(self.mac_pj)}, AC {_pj(self.ac_pj)}, {graded}"]
        if self.weight_read_pj:
            mode = self.weight_reads.replace("_", " ")
            parts.append(f"weights {_pj(self.weight_read_pj)}/{self.weight_bits}-bit read {mode}")
        if self.activation_read_pj or self.activation_write_pj:
            parts.append(f"activations {_pj(self.activation_read_pj)} read/{_pj(self.activation_write_pj)} write")
        if self.event_pj:
            parts.append(f"events {_pj(self.event_pj)}")
        if not self.charges_memory:
            parts.append("compute only, no memory")
        if self.scale_bits is not None:
            parts.append(f"× {self.scale_bits}/{self.operand_bits} bits")
        return "; ".join(parts)

    def describe(self) -> str:
        """One line: what the model charges and what it leaves out (shown with every report)."""
        charged = ["compute (MACs, spike-driven ACs, scale products)"]
        if self.weight_read_pj:
            per_input = self.weight_reads == "per_input" or self.events == "graded"
            charged.append(f"weight reads ({_pj(self.weight_read_pj)} per {self.weight_bits}-bit weight, "
                           + ("once per non-zero input" if per_input else "once per spike")
                           + "; dense: every weight per token)")
        if self.activation_read_pj or self.activation_write_pj:
            charged.append(f"activation memory ({_pj(self.activation_read_pj)} per input read, "
                           f"{_pj(self.activation_write_pj)} per output written)")
        if self.event_pj:
            charged.append(f"spike events ({_pj(self.event_pj)} each)")
        graded = {"one_ac": "one AC per graded spike whatever its level",
                  "level_acs": "k ACs per graded spike of level k",
                  "mac": f"one MAC ({_pj(self.graded_mac)}) per graded spike"}[self.graded_spike]
        if self.events == "graded":
            graded = (f"graded events: a projection's non-zero input count is one event, one read of its "
                      f"weight row and one MAC ({_pj(self.graded_mac)}) per output, whatever the count")
        left = list(LEFT_OUT)
        if not self.weight_read_pj:
            left.insert(0, "weight reads")
        if not (self.activation_read_pj or self.activation_write_pj):
            left.insert(1 if not self.weight_read_pj else 0, "activation reads/writes")
        if not self.event_pj:
            left.append("spike events")
        scaled = f", all × {self.scale_bits}/{self.operand_bits} (bit scaling)" if self.scale_bits is not None else ""
        return (f"{self.name}: charges {', '.join(charged)}; {graded}{scaled}; "
                f"leaves out {', '.join(left)}")


def _pj(value: float) -> str:
    return f"{value:g} pJ"


def cost_model(spec, key: str = "energy") -> CostModel:
    """The one way to a :class:`CostModel`: ``spec`` is one already, its config node (the
    ``energy`` group as Hydra composed it, ``_target_`` included), the name of a group option
    (``conf/energy/<name>.yaml``) or a path to such a YAML file; the node is built by
    :func:`spikellm.config.build`, so a wrong field is one line naming ``key``."""
    from omegaconf import DictConfig

    from spikellm.config import build

    if isinstance(spec, CostModel):
        return spec
    if isinstance(spec, (dict, DictConfig)):
        built = build(spec, key)
        if not isinstance(built, CostModel):
            raise ConfigError(key, type(built).__name__, "must build a spikellm.energy.CostModel")
        return built
    return load_cost_model(str(spec), key=key)


def load_cost_model(name_or_path: str, config_dir: str | Path | None = None, key: str = "energy") -> CostModel:
    """A cost model by name (``conf/energy/<name>.yaml``) or by path to a YAML file."""
    from omegaconf import OmegaConf

    from spikellm.config.cli import conf_dir

    path = Path(name_or_path)
    if not path.suffix:
        path = Path(config_dir or conf_dir() / "energy") / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise ConfigError(key, str(name_or_path), f"no such cost model; one of: {', '.join(available)} "
                                                  "or a path to a YAML file")
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    try:
        return cost_model({**node, "_target_": "spikellm.energy.CostModel"}, key)
    except ConfigError as error:
        if "has no argument" not in str(error):  # a value out of range names its own field
            raise
        raise ConfigError(key, str(path), f"fields must be those of CostModel: {error}") from None
