"""No module of spikellm imports a layer above its own.

The layers, bottom to top, are data below (docs/architecture.md describes them).
A module may import its own package and anything in a lower layer; packages that share a layer
are peers and import neither each other nor anything above. Every import counts, also one
inside a function (a lazy import is still a dependency); ``importlib`` calls are not seen (only
config.py makes them, to build ``_target_`` names, which is what lets it sit so low).
"""
import ast

from conftest import ROOT

# Bottom to top; each entry names a package or module and everything under it that no more
# specific entry names.
LAYERS = [
    ("spikellm.errors", "spikellm.version"),
    ("spikellm.checks", "spikellm.io", "spikellm.progress"),  # argument checks, atomic writes, progress bars
    ("spikellm.config", "spikellm.ops"),  # config builds what it names by importlib, not by import
    ("spikellm.neurons", "spikellm.quant", "spikellm.kernels"),
    ("spikellm.nn",),
    ("spikellm.sparsity",),  # activation thresholds on nn layers
    ("spikellm.models",),  # models declare their matmul work in nn.work, so they import no energy
    ("spikellm.energy",),  # the counter reads nn layers and declarations; the 7B estimator a LlamaConfig
    ("spikellm.data",),
    ("spikellm.checkpoints",),  # every model file: one module per format, and load_model
    ("spikellm.generation",),
    ("spikellm.training", "spikellm.evaluation"),
    ("spikellm.posttrain",),  # conversion runs QAT, so it sits on training
    ("spikellm.entry_points",),  # the console scripts: compose, build, run any pipeline
]

# Upward (or peer) imports in files whose owners are changing them now. This set may only shrink:
# a new violation fails, and so does an entry that no longer occurs (delete it).
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()  # none left; a new one fails the test


def _modules() -> dict[str, tuple]:
    """``{module name: (path, is_package)}`` of spikellm, with kernels/ as spikellm.kernels (it
    installs there; a source checkout may also hold a spikellm/kernels link, skipped)."""
    found = {}
    trees = [(ROOT / "spikellm", "spikellm"), (ROOT / "kernels", "spikellm.kernels")]
    for top, name in trees:
        for path in sorted(top.rglob("*.py")):
            parts = path.relative_to(top).with_suffix("").parts
            if name == "spikellm" and parts[0] == "kernels":
                continue
            package = parts[-1] == "__init__"
            found[".".join((name, *(parts[:-1] if package else parts)))] = (path, package)
    return found


MODULES = _modules()


def _imports(module: str):
    """``(line, imported module)`` of every import in ``module`` that names spikellm."""
    path, is_package = MODULES[module]
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([source] if source else []))
            # ``from package import submodule`` imports the submodule; anything else the module
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        else:
            continue
        yield from ((node.lineno, name) for name in names if name.startswith("spikellm."))


def _place(module: str) -> tuple[int, str] | None:
    """``(layer index, entry)`` of the most specific entry that holds ``module``, or None."""
    holding = [(len(entry), index, entry) for index, entries in enumerate(LAYERS) for entry in entries
               if module == entry or module.startswith(entry + ".")]
    return max(holding)[1:] if holding else None


def _violations() -> dict[tuple[str, str], str]:
    found = {}
    for module in MODULES:
        if module == "spikellm":
            continue  # the root package names the version and registers with transformers
        layer, entry = _place(module)
        for line, target in _imports(module):
            placed = _place(target)
            if placed is None:
                continue  # reported by test_every_module_has_a_layer when it is a module of ours
            if placed[0] > layer or (placed[0] == layer and placed[1] != entry):
                where = "a peer" if placed[0] == layer else f"layer {placed[0]} ({placed[1]})"
                found[module, target] = (f"{module} (layer {layer}, {entry}) imports {target} from {where}, "
                                         f"{MODULES[module][0].relative_to(ROOT)}:{line}")
    return found


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if m != "spikellm" and _place(m) is None)
    assert not unplaced, f"add these to LAYERS in tests/project/test_layering.py (and docs/architecture.md): {unplaced}"


def test_layers_name_each_entry_once():
    entries = [entry for layer in LAYERS for entry in layer]
    assert len(entries) == len(set(entries))


def test_no_module_imports_a_higher_layer():
    new = [text for pair, text in sorted(_violations().items()) if pair not in KNOWN_VIOLATIONS]
    assert not new, "imports against the layer order (move the shared piece down instead):\n" + "\n".join(new)


def test_known_violations_only_shrink():
    gone = sorted(KNOWN_VIOLATIONS - set(_violations()))
    assert not gone, f"fixed, so delete from KNOWN_VIOLATIONS in tests/project/test_layering.py: {gone}"


def test_the_walker_sees_what_it_must():
    """An import inside a function counts (quant.gptq imports the Hadamard transform lazily), and
    kernels/ is read as spikellm.kernels."""
    assert "spikellm.ops.hadamard" in {target for _, target in _imports("spikellm.quant.gptq")}
    assert {"spikellm.kernels", "spikellm.kernels.packing", "spikellm.kernels.spike_linear"} <= set(MODULES)
