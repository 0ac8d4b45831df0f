"""Content digests of the data cache's files (token files, trained tokenizers).

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
from pathlib import Path

from spikellm.checkpoints.atomic import atomic_write

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


def record_digest(path: Path, sha256: str | None = None) -> None:
    """Write ``path``'s sidecar: ``sha256`` (computed while writing it), else hashed now."""
    record = {"sha256": sha256 or file_digest(path), "stamp": _stamp(path)}
    atomic_write(sidecar(path), lambda f: f.write(json.dumps(record)))


def check_file(path: Path) -> str | None:
    """None when ``path`` holds the bytes its digest was recorded for; else why not, in words."""
    try:
        record = json.loads(sidecar(path).read_text())
        expected, stamp = str(record["sha256"]), list(record["stamp"])
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
