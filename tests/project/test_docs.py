"""Every link of the README and of the docs resolves inside the repository (the science
the code cites is docs/DESIGN.md, not a file beside the clone)."""
import re

from conftest import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_local_link_resolves():
    broken = []
    for page in [ROOT / "README.md", ROOT / "bench" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists() or ROOT.resolve() not in path.parents:
                broken.append(f"{page.name}: {target}")
    assert not broken, broken


def test_eval_help_lists_only_the_groups_eval_takes():
    """``eval.py --help`` listed training-only groups (budget, trainer...) that eval.py then rejects."""
    from conftest import run_script

    done = run_script("eval.py", "--help")
    assert done.returncode == 0
    assert "neuron, energy, hardware, paths" in done.stdout
    assert "budget" not in done.stdout and "trainer" not in done.stdout
