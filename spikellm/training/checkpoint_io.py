"""Checkpoints a killed run resumes from: written often, and never half-written.

Lightning's own save writes the whole checkpoint to a temporary file in ``$TMPDIR`` and moves it
into place: across file systems that move is a copy, which a kill can cut short, and nothing is
synced to disk. :class:`AtomicCheckpointIO` writes beside the target, syncs, and renames: the
target is the old checkpoint or the new one, never a mix. :class:`PeriodicCheckpoint` writes
``last.ckpt`` every few steps, mid-epoch too.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from spikellm.errors import DataError
from spikellm.io import write_failure

log = logging.getLogger(__name__)

# .<name>.<random>.<pid>.tmp: the writer's pid tells a killed writer's leftover from a live one's
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")


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


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint(save_top_k=0, save_last=True, every_n_train_steps=n)``: ``last.ckpt``
    every ``n`` training steps, except that on a step that validates it saves after the
    validation. A checkpoint from between that step and its validation would lose the validation:
    Lightning, resuming from it, skips ahead to the next step.
    """

    def __init__(self, every_n_train_steps: int, **kwargs):
        kwargs = {"save_top_k": 0, "save_last": True, "save_on_train_epoch_end": False, **kwargs}
        super().__init__(every_n_train_steps=every_n_train_steps, **kwargs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self._every_n_train_steps
        if every >= 1 and trainer.global_step % every == 0 and _validates_next(trainer):
            self._defer_save_until_validation = True  # ModelCheckpoint.on_validation_end saves then
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def _validates_next(trainer) -> bool:
    """Whether Lightning runs validation right after the current training batch (asked at its end)."""
    loop, fetcher = trainer.fit_loop.epoch_loop, trainer.fit_loop._data_fetcher
    if fetcher is None or getattr(loop, "_skip_next_val", False):
        return False
    try:
        return bool(loop._should_check_val_fx(fetcher))
    except Exception:  # noqa: BLE001  (a Lightning internal: if it changes, save now rather than never)
        return False


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save(obj, path)`` through a temporary file in ``path``'s directory: flushed, fsynced,
    then renamed over ``path`` (and the directory synced), so after a crash at any point ``path``
    holds either its previous content or ``obj``. The temporary file is removed if the write fails;
    one left by a killed process is removed by the next save into that directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files of :func:`atomic_torch_save` whose writing process is gone
    (killed mid-save); returns them."""
    removed = []
    for entry in directory.iterdir() if directory.is_dir() else ():
        match = _TEMPORARY.match(entry.name)
        if match and entry.is_file() and not _alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
                log.info("removed %s, left by a save that was killed", entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # ours: a save in progress (a thread), or cleaned up by its own failure
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
