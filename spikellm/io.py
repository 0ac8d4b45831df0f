"""Writing what a user keeps without ever leaving it half-written, and saying in one line why a
write failed (no space, read-only, permission) instead of a traceback."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from spikellm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# .<name>.<random>.<pid>.tmp: the writer's pid tells a killed writer's leftover from a live one's
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")

# the OS errors that mean "this place cannot take the output", with what to do about them
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device; free some space or choose another directory",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another directory",
    errno.EFBIG: "file too large for the file system; choose another directory",
    errno.EROFS: "read-only file system; choose a writable directory",
    errno.EACCES: "permission denied; choose a directory you can write to",
    errno.EPERM: "operation not permitted; choose a directory you can write to",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "a file of that name is in the way",
    errno.ENAMETOOLONG: "the path is too long",
    errno.EIO: "input/output error on the device",
}
# how Rust libraries (safetensors, tokenizers) report an OS error in their messages
_RUST_OS_ERROR = re.compile(r"os error (\d+)|Os \{ code: (\d+)")


def write_failure(error: BaseException) -> str | None:
    """Why a write failed, as a phrase (``no space left on the device; ...``), when ``error`` is an
    OS error about the place written to (an ``OSError``, or a Rust library's error carrying an OS
    error code, among :data:`_WRITE_ERRORS`); None for anything else (a missing input, a bug, an
    interrupt), which the callers re-raise as it is."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None and not isinstance(error, (KeyboardInterrupt, SystemExit)):
        match = _RUST_OS_ERROR.search(str(error))
        code = int(match.group(1) or match.group(2)) if match else None
    if code in _WRITE_ERRORS:
        return f"{_WRITE_ERRORS[code]} [{errno.errorcode.get(code, code)}]"
    return None


def check_writable(directory, key: str = "paths.output_dir") -> Path:
    """``directory``, created if needed and probed (a small file written and removed), else a
    :class:`ConfigError` on ``key`` with the reason: not a directory, read-only, no space,
    permission. Call it before a run's work so that it fails in seconds, not at the end."""
    path = Path(str(directory)).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(key, str(directory), "is a file, not a directory; choose a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(key, str(directory), f"cannot be created: {write_failure(error) or error}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".spikellm-write-probe-", dir=path)
        try:
            os.write(fd, b"spikellm write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as error:
        raise ConfigError(key, str(directory), f"is not writable: {write_failure(error) or error}") from None
    return path


def _refused(target: Path, error: BaseException, kept: bool) -> DataError:
    state = f"the previous {target.name} is intact" if kept else "nothing was written"
    return DataError(f"cannot write {target}: {write_failure(error)}; {state}")


@contextmanager
def atomic_directory(directory, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``directory``; on success rename it into place.

    If the body raises, the temporary directory is removed and ``directory`` is untouched. An
    existing ``directory`` is refused unless ``overwrite`` (then it is replaced only once the new
    one is complete). A write the disk refuses (no space, read-only, permission), in the body or
    in the rename, is a :class:`DataError` naming ``directory``, with the same guarantees.
    """
    target = Path(directory).expanduser()
    if target.exists() and not overwrite:
        raise ConfigError("output directory", str(target), "already exists; choose another path or delete it first "
                                                           "(nothing is overwritten)")
    existed = target.exists()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700: the mode a plain mkdir gives
    except OSError as error:
        raise _refused(target, error, existed) from None
    try:
        yield tmp
        _plain_modes(tmp)  # what other writers (safetensors, transformers) created 0600 inside
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # the previous one back in place
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if write_failure(error) is not None:
            raise _refused(target, error, existed) from None
        raise


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask (read by setting it back: under a lock, as no other thread may see 0)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _plain_mode(fd: int) -> None:
    """Give a temporary file (created 0600 by ``tempfile``) the mode a plain ``open()`` would:
    0644 under umask 022, so a group sharing a run directory can read what a run wrote."""
    os.fchmod(fd, 0o666 & ~_umask())


def _plain_modes(directory: Path) -> None:
    """Files and directories under ``directory`` get the modes a plain ``open()`` / ``mkdir`` gives."""
    mask = _umask()
    for path in directory.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_json(path, data) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (see :func:`atomic_write_text`)."""
    import json

    return atomic_write(path, lambda f: json.dump(data, f, indent=2, default=str))


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (or a kill)
    never sees half a file. A write the disk refuses is a :class:`DataError` naming ``path``; the
    temporary file is removed and a previous ``path`` is left as it was."""
    return atomic_write(path, lambda f: f.write(text))


def atomic_write(path, write, binary: bool = False) -> Path:
    """Create ``path`` by ``write(file)`` on a temporary file beside it (opened in text mode, or
    binary), then a rename: a reader, or a run after a kill, sees the whole file or none of it.
    A write the disk refuses is a :class:`DataError` naming ``path``; the temporary file is removed
    and a previous ``path`` is left as it was."""
    path = Path(path)
    existed = path.exists()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        _plain_mode(fd)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if write_failure(error) is not None:
            raise _refused(path, error, existed) from None
        raise
    return path


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save(obj, path)`` through a temporary file in ``path``'s directory: flushed, fsynced,
    then renamed over ``path`` (and the directory synced), so after a crash at any point ``path``
    holds either its previous content or ``obj``. The temporary file is removed if the write fails;
    one left by a killed process is removed by the next save into that directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp")
    try:
        _plain_mode(fd)
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
