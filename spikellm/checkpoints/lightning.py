"""Lightning checkpoints (``.ckpt``) that train.py writes and resumes from, and eval.py reads.

Lightning's own save writes the whole checkpoint to a temporary file in ``$TMPDIR`` and moves it
into place: across file systems that move is a copy, which a kill can cut short, and nothing is
synced to disk. :class:`AtomicCheckpointIO` writes beside the target, syncs, and renames: the
target is the old checkpoint or the new one, never a mix. :func:`read_training_checkpoint` is the
one reader: it loads without running code, checks the structure, and refuses any ``_target_``
that is not spikellm's own, once, before anything is built.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from spikellm.io import atomic_torch_save, write_failure
from spikellm.errors import DataError


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose saves are atomic on local disks (see the module docstring);
    other file systems (``s3://`` and the like) keep Lightning's transactional save."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            atomic_torch_save(checkpoint, Path(path))
        except OSError as error:  # no space, read-only: one line (the previous checkpoint is intact)
            reason = write_failure(error)
            if reason is None:
                raise
            raise DataError(f"cannot write the checkpoint {path}: {reason}; the previous one is kept") from None


def read_training_checkpoint(path: Path, key: str = "ckpt", resumable: bool = False) -> dict:
    """The state dict of a Lightning checkpoint written by train.py, loaded as data (never code),
    checked for the parts train.py writes (``resumable``: the optimizer and loop state too), and
    with every ``_target_`` of its hyperparameters checked against spikellm's own classes: the one
    place a ``.ckpt`` is read and trusted. ``key`` names the setting in errors."""
    import torch

    from spikellm.config.trust import check_trusted

    try:  # memory-mapped: a model reads its weights from the file, never from a second copy in memory
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, KeyError,
            OSError, AttributeError, TypeError) as error:  # a file that is not a zip goes to the unpickler
        reason = (str(error).splitlines() or [""])[0].split(". ")[0][:160]
        raise DataError(f"{key}={path} is not a readable checkpoint ({type(error).__name__}: {reason}); it may be "
                        "truncated or not written by train.py") from None
    if not isinstance(state, dict) or "state_dict" not in state or "hyper_parameters" not in state:
        raise DataError(f"{key}={path} is not a train.py checkpoint: it has no state_dict and hyper_parameters")
    if not isinstance(state["hyper_parameters"], dict) or not isinstance(state["state_dict"], dict):
        raise DataError(f"{key}={path} is not a train.py checkpoint: its hyper_parameters or state_dict is not a "
                        "mapping")
    if resumable and ("optimizer_states" not in state or "loops" not in state):
        raise DataError(f"{key}={path} holds weights only (no optimizer and loop state), so it cannot resume a "
                        "run; resume from <run>/checkpoints/last.ckpt")
    check_trusted(state["hyper_parameters"], path, "hyper_parameters")  # what loading it will build
    return state


def datamodule_state(state: dict) -> dict:
    """What the data module saved in a checkpoint (its tokenizer, split, stream position), or {}."""
    return next((v for k, v in state.items() if k.endswith("DataModule") and isinstance(v, dict)), {})


HPARAMS_DIGEST = "spikellm_model_digest"  # the checkpoint's key binding its model hyper-parameters


def model_digest(model: dict, neuron: dict | None) -> str:
    """SHA-256 of a model's config and neuron groups as a checkpoint stores them: an edit of the
    hyper-parameters that changes no weight's shape (``max_seq_len``, ``n_heads``) is caught too."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps({"model": model, "neuron": neuron}, sort_keys=True, default=str).encode()
                          ).hexdigest()


def load_training_checkpoint(path: Path, neuron: dict | None = None, dtype=None):
    """``(model, tokenizer, record)`` of a train.py checkpoint, in ``dtype`` (None: as stored);
    ``neuron`` (a neuron group as a dict) replaces the encoders it was trained with."""
    from spikellm.config import build_model
    from spikellm.data.tokenizer import Tokenizer
    from spikellm.nn.storage import assign_parameters, empty_parameters

    state = read_training_checkpoint(path)
    hparams = dict(state["hyper_parameters"])
    recorded = state.get(HPARAMS_DIGEST)  # checkpoints written before it have none
    if recorded is not None and recorded != model_digest(hparams.get("model"), hparams.get("neuron")):
        raise DataError(f"{path}: its hyper_parameters (model or neuron) are not those its weights were trained "
                        "with (they were edited); use the checkpoint as train.py wrote it, or train again")
    if neuron is not None:
        hparams["neuron"] = neuron
    if not isinstance(hparams.get("model"), dict):
        raise DataError(f"{path}: its hyper_parameters do not describe a train.py model (no model group)")
    with empty_parameters():
        model = build_model(hparams["model"], hparams.get("neuron"))
    parameters = dict(model.named_parameters())
    expected = set(model.state_dict())
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    from spikellm.checkpoints.shards import all_finite

    broken = next((name for name, value in weights.items() if isinstance(value, torch.Tensor)
                   and value.is_floating_point() and value.numel() and not all_finite(value)), None)
    if broken is not None:  # it would evaluate to a NaN perplexity, or sample from NaN probabilities
        raise DataError(f"{path}: tensor {broken} holds non-finite values (inf or nan), which no trained model has; "
                        "use an earlier checkpoint of the run")
    try:
        unexpected = assign_parameters(model, weights.items(), dtype=dtype)
    except ValueError as error:
        raise DataError(f"{path}: weights do not match the model its config describes ({error})") from None
    tied = {"lm_head.weight"} if getattr(model.config, "tie_embeddings", False) else set()
    missing = sorted(k for k in expected - set(weights) - tied if k in parameters)
    if missing or unexpected:
        raise DataError(f"{path}: weights do not match the model its config describes "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    tokenizer_state = datamodule_state(state).get("tokenizer")
    if tokenizer_state is None:
        raise DataError(f"{path} carries no tokenizer (written before checkpoints stored one); retrain, "
                        "or evaluate a Hugging Face model directory that has its tokenizer")
    try:
        tokenizer = Tokenizer.from_state(tokenizer_state)
    except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception on a corrupt JSON
        raise DataError(f"{path}: the tokenizer it carries cannot be read ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:160] if str(error) else ''})") from None
    if tokenizer.vocab_size > model.config.vocab_size:  # ids the embedding has no row for
        raise DataError(f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.config.vocab_size}")
    data = datamodule_state(state)
    split = data.get("split")
    if split is None and "seed" in (data.get("train_position") or {}):  # written before the split was recorded
        split = {"seed": data["train_position"]["seed"]}
    return model, tokenizer, {"model": hparams["model"], "neuron": hparams.get("neuron"), "split": split}


def read_model(path: Path, *, neuron=None, device="cpu", backend: str = "auto", dtype=None, key: str = "ckpt"):
    """:func:`load_training_checkpoint` as :func:`~spikellm.checkpoints.load_model` reads every format."""
    from spikellm.checkpoints.loaded import LoadedModel

    model, tokenizer, record = load_training_checkpoint(path, neuron, dtype=dtype)
    return LoadedModel(model, tokenizer, str(path), record)
