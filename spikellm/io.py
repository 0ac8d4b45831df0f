"""Writing what a user keeps without ever leaving it half-written."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from spikellm.errors import ConfigError


@contextmanager
def atomic_directory(directory, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``directory``; on success rename it into place.

    If the body raises, the temporary directory is removed and ``directory`` is untouched. An
    existing ``directory`` is refused unless ``overwrite`` (then it is replaced only once the new
    one is complete).
    """
    target = Path(directory).expanduser()
    if target.exists() and not overwrite:
        raise ConfigError("output directory", str(target), "already exists; choose another path or delete it first "
                                                           "(nothing is overwritten)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_json(path, data) -> Path:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename: a reader (or a
    kill) never sees half a file."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(f.name, path)
    return path
