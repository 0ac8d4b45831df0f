"""A wheel built with ``pip wheel .`` carries the configs (``spikellm.conf``) and the
kernels, and its ``spikellm-train`` runs from an empty directory (Hydra finds the configs as
``pkg://spikellm.conf``, not beside a source checkout)."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


def test_the_configs_are_package_data_hydra_finds():
    from spikellm.config.cli import conf_dir
    from spikellm.entry_points import CONFIG_PATH

    assert CONFIG_PATH == "pkg://spikellm.conf"
    assert (conf_dir() / "train.yaml").is_file() and (conf_dir() / "neuron" / "ternary.yaml").is_file()


@pytest.mark.slow
def test_a_built_wheel_trains_from_an_empty_directory(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(wheels)], check=True, cwd=tmp_path, timeout=600)
    wheel = next(wheels.glob("spikellm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "spikellm/conf/train.yaml" in names and "spikellm/kernels/__init__.py" in names
    assert "spikellm/ops/cpu_encode.c" in names  # the fused CPU encoder's source, compiled on first use
    # a fresh venv: spikellm from the wheel only; its dependencies from this environment's site-packages
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    code = "import sys; from spikellm.entry_points import train; sys.argv[0] = 'spikellm-train'; train()"
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code, "trainer.max_steps=2", "model=llama_micro",
                           "validate_at_start=false"], cwd=empty, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import spikellm; print(spikellm.__file__); "
                            "from spikellm.ops import cpu_encode; print(cpu_encode.unavailable_reason())"],
                           cwd=empty, capture_output=True, text=True, check=True,
                           env={**os.environ, "SPIKELLM_CACHE": str(tmp_path / "compiled")})
    assert str(site) in check.stdout
    assert check.stdout.splitlines()[-1] == "None" or not any(shutil.which(c) for c in ("cc", "gcc", "clang"))
    assert list(empty.glob("outputs/train/*/checkpoints/last.ckpt"))
