"""What a run checks before it writes anything into its directory: that no other run is writing
there (an exclusive lock), that it does not overwrite another run's checkpoint, and, when it
resumes, that the checkpoint is readable, resumable and of the same model."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from spikellm.errors import ConfigError


@contextlib.contextmanager
def run_directory_lock(output_dir: Path):
    """Hold ``<run>/.run.lock`` for the whole run: a second run started into the same directory
    (the same command twice, another seed) is refused in one line instead of both writing there.
    Processes that a run launches itself (DDP ranks, other nodes) share the first one's directory."""
    from filelock import FileLock, Timeout

    if any(os.environ.get(name, "0") != "0" for name in ("LOCAL_RANK", "NODE_RANK")):
        yield
        return
    lock = FileLock(str(output_dir / ".run.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError("hydra.run.dir", str(output_dir), "another run is writing into this directory now; wait "
                                                            "for it to end, or give this one another hydra.run.dir") from None
    try:
        yield
    finally:
        lock.release()


def resolve_ckpt_path(value, output_dir: Path) -> Path | None:
    """The checkpoint ``ckpt_path`` names: ``last`` is ``<output_dir>/checkpoints/last.ckpt``
    (``output_dir`` is ``hydra.run.dir``), anything else a path; a missing one is an error, never
    a silent fresh start."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("ckpt_path", value, "must be `last` (resume the run in hydra.run.dir) or the path of a "
                                              ".ckpt file written by train.py")
    if value == "last":
        path = output_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ConfigError("ckpt_path", value, f"there is no {path}: ckpt_path=last resumes the run in "
                                                  "hydra.run.dir, so rerun with hydra.run.dir=<the interrupted "
                                                  "run's directory> ckpt_path=last, or pass the path of a .ckpt")
        return path
    path = Path(value).expanduser()
    if path.is_dir():
        hint = path / "checkpoints" / "last.ckpt"
        raise ConfigError("ckpt_path", value, "is a directory; pass a .ckpt file" +
                          (f", e.g. {hint}" if hint.is_file() else " (<run>/checkpoints/last.ckpt)"))
    if not path.is_file():
        raise ConfigError("ckpt_path", value, "no such file; pass a .ckpt written by train.py "
                                              "(<run>/checkpoints/last.ckpt), or ckpt_path=last with hydra.run.dir")
    return path


def read_resume_checkpoint(path: Path) -> dict:
    """What the pre-fit checks need from a Lightning checkpoint (its hyperparameters and the data
    module's state), after checking that it loads as data and can resume a run."""
    from spikellm.checkpoints.lightning import datamodule_state, read_training_checkpoint

    state = read_training_checkpoint(path, key="ckpt_path", resumable=True)
    return {"hyper_parameters": dict(state["hyper_parameters"]), "data": datamodule_state(state)}


def check_same_model(resume: dict, cfg: DictConfig, ckpt: Path) -> None:
    """A resumed run trains the checkpoint's model: the ``model`` and ``neuron`` groups must be its own."""
    hparams = resume["hyper_parameters"]
    theirs = {"model": hparams.get("model"), "neuron": hparams.get("neuron")}
    ours = {"model": OmegaConf.to_container(cfg.model, resolve=True),
            "neuron": OmegaConf.to_container(cfg.neuron, resolve=True) if cfg.get("neuron") is not None else None}
    differ = _differences(theirs, ours)
    if differ:
        shown = "; ".join(f"{key} is {a!r} there, {b!r} here" + (_VOCAB_HINT if key == "model.vocab_size" else "")
                          for key, a, b in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        raise ConfigError("ckpt_path", str(ckpt), f"it was trained with another model: {shown}{more}; resume with "
                                                  "the model and neuron settings it was trained with")


_ABSENT = "(absent)"
_VOCAB_HINT = " (the tokenizer's size, data.vocab_size by default: another tokenizer)"


def _differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, a's value, b's value)`` wherever two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for identity in ("name", "_target_"):  # another kind of thing altogether: say only that
            if identity in a and identity in b and a[identity] != b[identity]:
                return [(f"{prefix}.{identity}" if prefix else identity, a[identity], b[identity])]
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            out += _differences(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [(prefix, a, b)]


def refuse_overwrite(output_dir: Path, ckpt: Path | None) -> None:
    """A run writes ``<output_dir>/checkpoints/last.ckpt``: refuse when it holds another run's
    checkpoint that this run does not continue."""
    last = output_dir / "checkpoints" / "last.ckpt"
    if last.exists() and (ckpt is None or ckpt.resolve() != last.resolve()):
        raise ConfigError("hydra.run.dir", str(output_dir),
                          f"already holds a run ({last}) that this run would overwrite; resume it with ckpt_path=last, "
                          "or choose another hydra.run.dir")
