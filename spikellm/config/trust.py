"""What a file may name: :func:`check_trusted` refuses a ``_target_`` read from a checkpoint that
is not one of spikellm's own model and neuron classes, so loading a file never runs code it names.
Your own encoder package joins them explicitly: :func:`trust_modules` or ``$SPIKELLM_TRUSTED_MODULES``."""
from __future__ import annotations

import inspect
import re
from typing import Any

from spikellm.errors import DataError


# A checkpoint records the model and neuron groups it was built from; their ``_target_`` values
# name spikellm's model configs, encoders and weight quantizers: classes that live here, whose
# constructors only build modules in memory. Anything else (another package, a function such as
# spikellm.io.atomic_write_json that writes files, a path through an imported module such as
# ``spikellm.models.llama.torch.save``) is refused before anything is built.
TRUSTED_MODULES = ("spikellm.models", "spikellm.neurons", "spikellm.quant", "spikellm.nn")
_TARGET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*")
TRUST_VARIABLE = "SPIKELLM_TRUSTED_MODULES"  # comma-separated modules whose classes files may name
_added: list[str] = []


def trust_modules(*modules: str) -> None:
    """Let files name the classes of ``modules`` too (your own encoder or weight quantizer
    package, e.g. ``trust_modules("my_encoders")``): their constructors will run when a checkpoint
    that names them is loaded, so list only code you trust. On the command line (eval.py,
    generate.py) set ``SPIKELLM_TRUSTED_MODULES=my_encoders`` instead."""
    for module in modules:
        if not isinstance(module, str) or not _TARGET_NAME.fullmatch(module):
            raise ValueError(f"trust_modules({module!r}): give a dotted module name such as 'my_encoders'")
        if module not in _added:
            _added.append(module)


def trusted_modules() -> tuple[str, ...]:
    """spikellm's own modules, those given to :func:`trust_modules` and those in ``$SPIKELLM_TRUSTED_MODULES``."""
    import os

    listed = [m.strip() for m in os.environ.get(TRUST_VARIABLE, "").split(",") if m.strip()]
    return (*TRUSTED_MODULES, *_added, *(m for m in listed if _TARGET_NAME.fullmatch(m)))


def check_trusted(tree: Any, source, path: str = "") -> None:
    """Refuse, with a :class:`DataError` naming ``source`` (the file) and the target, any
    ``_target_`` in ``tree`` (dicts and lists, walked to the leaves: ``_args_``, ``_partial_``
    and non-recursive nodes included) that is not a class defined in one of
    :data:`TRUSTED_MODULES` (named ``<module>.<Class>``, nothing reached through it), and any
    ``${...}`` interpolation (a checkpoint stores resolved values; an interpolation would run a
    resolver). ``path``: where ``tree`` sits in the file (``hyper_parameters``), for the message.
    Call it on everything read from a file before it reaches :func:`build`; configs the user
    writes are not restricted."""
    if isinstance(tree, dict):
        for name, value in tree.items():
            key = f"{path}.{name}" if path else str(name)
            if name == "_target_":
                reason = _untrusted_target(value)
                if reason:
                    raise DataError(f"{source}: {key}={value!r} is refused: {reason}; a checkpoint may only name "
                                    f"classes of {', '.join(trusted_modules())}, and nothing it names is run "
                                    f"(your own encoder package: {TRUST_VARIABLE}=<module> or "
                                    "spikellm.config.trust.trust_modules('<module>'))")
                continue
            if not isinstance(name, (str, int)) or (isinstance(name, str) and "${" in name):
                raise DataError(f"{source}: the key {name!r} in {path or 'the config'} is refused: a checkpoint "
                                "holds plain keys and resolved values")
            check_trusted(value, source, key)
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            check_trusted(value, source, f"{path}.{index}" if path else str(index))
    elif isinstance(tree, str) and "${" in tree:
        raise DataError(f"{source}: {path or 'a value'}={tree!r} is refused: a checkpoint holds resolved values, "
                        "not interpolations")


def _untrusted_target(target) -> str | None:
    """Why ``target`` may not be built from a file, or None when it names a trusted class."""
    import importlib

    if not isinstance(target, str) or not _TARGET_NAME.fullmatch(target):
        return "not a dotted name of public attributes"
    trusted = trusted_modules()
    if not any(target == module or target.startswith(module + ".") for module in trusted):
        return "outside the trusted modules"
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module, then ONE attribute
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if cut != len(parts) - 1:
            return "not a class of a spikellm module"
        obj = getattr(module, parts[-1], None)
        defined_in = getattr(obj, "__module__", None) or ""
        if not inspect.isclass(obj):  # a function may do anything with its arguments (write files...)
            return "not a class"
        if not any(defined_in == m or defined_in.startswith(m + ".") for m in trusted):
            return f"it is {defined_in or 'a builtin'}.{getattr(obj, '__qualname__', parts[-1])}, not spikellm's"
        return None
    return "no such module"
