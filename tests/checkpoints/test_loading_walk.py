"""A ``ckpt=`` path reaches a model through few modules: the loader, one format reader, and what
that format reads (shards, the tokenizer, the trust check of a pickle). Counted at run time, by
the spikellm functions that are handed the path itself, on the fixture of every format."""
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from spikellm.checkpoints.loader import load_model

FORMATS = ROOT / "tests" / "fixtures" / "formats"
MOST_MODULES = 6


def modules_handling(path: Path) -> list[str]:
    names = {str(path), str(path.resolve())}
    seen: list[str] = []

    def watch(frame, event, arg):
        source = frame.f_code.co_filename
        if event == "call" and f"{Path('spikellm')}" in source and "site-packages" not in source:
            if any(isinstance(v, (str, Path)) and str(v) in names for v in frame.f_locals.values()):
                module = source[source.rindex("spikellm"):]
                if module not in seen:
                    seen.append(module)

    sys.setprofile(watch)
    try:
        load_model(path)
    finally:
        sys.setprofile(None)
    return seen


@pytest.fixture(scope="module")
def imported():
    load_model(FORMATS / "hf")  # the libraries imported once, outside the (slow) profiled call


@pytest.mark.parametrize("fmt", ["spiking", "converted", "hf", "lightning/last.ckpt"])
def test_the_path_to_a_model_touches_at_most_six_modules(imported, fmt):
    seen = modules_handling(FORMATS / fmt)
    assert "spikellm/checkpoints/loader.py" in seen and len(seen) >= 2, seen  # the walk is seen at all
    assert len(seen) <= MOST_MODULES, seen
