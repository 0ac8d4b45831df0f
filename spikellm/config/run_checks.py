"""Checks of a composed config before the run starts: what Hydra would accept and the run then
trip over (a value left ``???``, an interpolation that does not resolve, a ``+key`` nothing reads,
a sweep without ``-m``, a run directory that cannot be made or holds an earlier run)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from spikellm.config.overrides import config_keys, nodes
from spikellm.errors import OverrideError, first_line

MISSING_HINTS = {
    "ckpt": "a train.py checkpoint (.ckpt), a spiking checkpoint directory or a local Hugging Face model directory",
    "model.hf_path": "a local Hugging Face model directory, e.g. /models/Llama-2-7b-hf",
    "model.checkpoint": "a spiking checkpoint directory, e.g. outputs/train/<time>/spiking_checkpoint",
}


def check_composed(cfg: DictConfig, parsed, overrides: list[str], config_name: str, printing: bool,
                   multirun: bool) -> None:
    """Every check of one composed config (``printing``: ``--cfg`` shows it, ``???`` included)."""
    check_additions(cfg, parsed)
    if not printing:
        check_values(cfg)
        if not multirun:
            check_sweep_needs_multirun(cfg, overrides)
            check_run_dir(cfg, config_name)


def check_additions(cfg: DictConfig, parsed) -> None:
    """``+precision=bf16-true`` adds a top-level key nothing reads, and the run would go on in fp32
    without a word: a ``+key`` whose name is that of a key deeper in the config is refused with
    that key (``trainer.precision``). A ``+key`` that matches nothing is the user's own addition."""
    added = [o for o in parsed if o.is_add() and "." not in o.key_or_group and "/" not in o.key_or_group]
    keys = config_keys(cfg) if added else set()  # walked only when there is a top-level +key
    for override in added:
        key = override.key_or_group
        deeper = sorted(k for k in keys if k.rpartition(".")[2] == key and "." in k and not k.startswith("hydra."))
        if deeper:
            value = override.value()
            raise OverrideError(key, value, f"+{key}={value} adds a top-level key that nothing reads; did you mean "
                                            f"{deeper[0]}={value}?")


def check_values(cfg: DictConfig) -> None:
    """Every value the run will read is set and every interpolation resolves (Hydra's own node,
    and what needs Hydra's runtime, excepted)."""
    from omegaconf.errors import OmegaConfBaseException

    for key, parent, name in nodes(cfg):
        if OmegaConf.is_missing(parent, name):
            hint = MISSING_HINTS.get(key, "a value")
            raise OverrideError(key, "???", f"{key}=??? is not set: add {key}=<{hint}> to the command line")
        if OmegaConf.is_interpolation(parent, name):
            try:
                parent[name]
            except OmegaConfBaseException as error:
                text = str(error)
                if "HydraConfig was not set" in text or "Missing mandatory value" in text:
                    continue  # ${hydra:...} is set when the run starts; a ??? is reported at its own key
                raw = OmegaConf.to_container(parent, resolve=False)[name]  # the ${...} as written
                raise OverrideError(key, raw, f"{key}={raw} cannot be resolved: {first_line(error)}") from None


def check_sweep_needs_multirun(cfg: DictConfig, overrides: list[str]) -> None:
    """A config that declares a sweep (``hydra.sweeper.params``, as ``experiment=spike_sweep`` does)
    trains one default run without ``-m``, with no word: refuse it."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
    if params:
        where = next((o for o in overrides if o.startswith("experiment=")), "the config")
        raise OverrideError("", None, f"{where} is a sweep over {', '.join(params)} "
                                      f"({len(str(next(iter(params.values()))).split(','))} runs): run it with -m "
                                      "(python train.py -m ...)")


# what an eval.py or generate.py run leaves in its directory: another run there would replace its
# record (Hydra rewrites .hydra/ before the job refuses to overwrite the results themselves)
_RUN_OUTPUTS = {"eval": "results.json", "generate": "generations.jsonl"}


def check_run_dir(cfg: DictConfig, config_name: str = "") -> None:
    """The directory Hydra is about to create for the run (``hydra.run.dir``) can be: the nearest
    part of it that exists is a writable directory (probed with an empty directory, removed at
    once; the run directory itself is left for Hydra to create), and it holds no earlier
    evaluation's or generation's outputs."""
    import tempfile

    try:
        from hydra.core.utils import setup_globals

        setup_globals()  # the ${now:...} resolver, as @hydra.main registers it
        run_dir = OmegaConf.select(cfg, "hydra.run.dir", throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - it needs Hydra's runtime: Hydra will create it, or report it
        return
    if not run_dir:
        return
    from spikellm.io import write_failure

    path = Path(str(run_dir)).expanduser().absolute()
    earlier = path / _RUN_OUTPUTS.get(config_name, "\0")
    if config_name in _RUN_OUTPUTS and earlier.exists():
        raise OverrideError("hydra.run.dir", str(run_dir), f"hydra.run.dir={run_dir} already holds an earlier run "
                                                           f"({earlier.name}); choose another hydra.run.dir "
                                                           "(nothing is overwritten)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OverrideError("hydra.run.dir", str(run_dir), f"hydra.run.dir={run_dir} cannot be created: {existing} "
                                                           "is a file, not a directory; choose another hydra.run.dir")
    try:
        probe = tempfile.mkdtemp(prefix=".spikellm-write-probe-", dir=existing)
        Path(probe).rmdir()
    except OSError as error:
        raise OverrideError("hydra.run.dir", str(run_dir),
                            f"hydra.run.dir={run_dir} cannot be created in {existing}: "
                            f"{write_failure(error) or error.strerror or error}; "
                            "choose another hydra.run.dir") from None
