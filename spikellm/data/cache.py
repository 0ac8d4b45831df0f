"""The data cache's files (token files, trained tokenizers): built once under a lock, written
whole or not at all, and checked by content digest before they are read.

Each cached file ``F`` has a sidecar ``F.sha256.json``: the SHA-256 of its bytes, computed as it
was written, and the file's stamp (size, modification time, inode) when that digest was last
checked. :func:`check_file` trusts a file whose stamp is unchanged (a stat: what a cached start
pays), hashes it in full when the stamp changed (then records the new stamp if the bytes still
match), and says why a file cannot be trusted: edited, truncated, or written without a digest.
The caller rebuilds such a file with one warning; it is never used.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable

from filelock import FileLock

from spikellm.errors import ConfigError
from spikellm.io import atomic_write

@contextmanager
def cache_lock(path: Path):
    """Hold ``path``'s lock; clear the temporaries a killed writer left (whoever wrote them held the lock)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{path}.lock")
        lock.acquire()
    except OSError as e:
        raise ConfigError("cache_dir", str(path.parent), f"cannot write there ({e.strerror or e}); set "
                          "data.cache_dir or SPIKELLM_CACHE to a writable directory") from e
    try:
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        yield
    finally:
        lock.release()


def write_cache_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """A cache file written whole or not at all (:func:`spikellm.io.atomic_write`,
    binary); a cache directory that cannot be created names ``data.cache_dir``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("cache_dir", str(path.parent), f"cannot write there ({e.strerror or e}); set "
                          "data.cache_dir or SPIKELLM_CACHE to a writable directory") from e
    atomic_write(path, write, binary=True)


_BLOCK = 8 << 20


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _stamp(path: Path) -> list[int]:
    status = path.stat()
    return [status.st_size, status.st_mtime_ns, status.st_ino]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def discard(path: Path) -> None:
    """Remove a cached file that cannot be trusted (a directory left in its place too) and its sidecar."""
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)


def record_digest(path: Path, sha256: str | None = None) -> None:
    """Write ``path``'s sidecar: ``sha256`` (computed while writing it), else hashed now."""
    record = {"sha256": sha256 or file_digest(path), "stamp": _stamp(path)}
    atomic_write(sidecar(path), lambda f: f.write(json.dumps(record)))


def check_file(path: Path) -> str | None:
    """None when ``path`` holds the bytes its digest was recorded for; else why not, in words."""
    if not path.is_file():
        return "is not a file"
    try:
        record = json.loads(sidecar(path).read_text())
        expected, stamp = record["sha256"], record["stamp"]
        if not isinstance(expected, str) or not isinstance(stamp, list) or len(stamp) != 3 or not all(
                isinstance(v, int) for v in stamp):
            raise TypeError("not a digest and a stamp")
    except FileNotFoundError:
        return "has no digest (an earlier spikellm wrote it, or writing it was interrupted)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"has an unreadable digest ({type(error).__name__})"
    current = _stamp(path)
    if current == stamp:
        return None
    if current[0] != stamp[0]:
        return f"holds {current[0]:,} bytes, not the {stamp[0]:,} it was written with (truncated or edited)"
    if file_digest(path) != expected:
        return "does not hold the bytes it was written with (edited or corrupted)"
    record_digest(path, expected)  # same bytes, touched: checked once, not at every start
    return None
