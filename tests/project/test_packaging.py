"""pyproject lists packages by hand (kernels/ maps to spikellm.kernels): keep the list complete."""
import tomllib

from conftest import ROOT


def test_every_subpackage_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "spikellm").rglob("__init__.py")}
    assert on_disk | {"spikellm.kernels", "spikellm.conf"} == listed  # the two top-level trees mapped in
