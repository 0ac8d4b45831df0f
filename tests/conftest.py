import os
import sys
import tempfile
from pathlib import Path

# Triton kernels run on CPU tensors only in its interpreter, which must be chosen before any
# @triton.jit decoration executes (DESIGN.md §7).
os.environ.setdefault("TRITON_INTERPRET", "1")
# One tokenizer/token cache for the whole session: the tests share the pydoc corpus.
os.environ.setdefault("SPIKELLM_CACHE", tempfile.mkdtemp(prefix="spikellm-test-cache-"))
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose(overrides: list[str], output_dir: Path):
    """The training config as ``python train.py *overrides`` would see it, writing to output_dir."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def run_script(script: str, *args: str, cwd: Path = ROOT, timeout: int = 300):
    """Run an entry point as a user would, returning the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def one_line(raised) -> str:
    """The message of a ``pytest.raises`` result, checked to be one line."""
    message = str(raised.value)
    assert "\n" not in message
    return message


@pytest.fixture
def config_factory(tmp_path):
    return lambda *overrides: compose(list(overrides), tmp_path / "run")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and a busy second core stalls OpenMP barriers."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
