"""The registration of spikellm's model directories with ``transformers``' Auto classes.

``import spikellm`` calls :func:`register_when_imported`, which registers
:class:`~spikellm.checkpoints.hub_config.SpikellmConfig` with ``AutoConfig`` and
:class:`~spikellm.checkpoints.hub.SpikellmForCausalLM` with ``AutoModelForCausalLM`` once
``transformers``' Auto modules load (at once if they already have): importing ``transformers``'
model classes takes seconds, so ``import spikellm`` stays fast and a process that never touches
``transformers`` never pays for it. This module imports nothing heavy.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

from spikellm.checkpoints.auto import MODEL_TYPE


def register_config() -> None:
    """Register :class:`~spikellm.checkpoints.hub_config.SpikellmConfig` with ``AutoConfig`` (idempotent)."""
    from transformers.models.auto.configuration_auto import AutoConfig

    from spikellm.checkpoints.hub_config import SpikellmConfig

    AutoConfig.register(MODEL_TYPE, SpikellmConfig, exist_ok=True)


def register_model() -> None:
    """Register :class:`~spikellm.checkpoints.hub.SpikellmForCausalLM` with ``AutoModelForCausalLM``."""
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from spikellm.checkpoints.hub import SpikellmConfig, SpikellmForCausalLM

    AutoModelForCausalLM.register(SpikellmConfig, SpikellmForCausalLM, exist_ok=True)


# each runs once its module has executed: the config's with only configuration_utils loaded (the
# module may be loading as part of modeling_utils' imports), the model's after the Auto models
_REGISTRARS = {"transformers.models.auto.configuration_auto": register_config,
               "transformers.models.auto.modeling_auto": register_model}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of each module of :data:`_REGISTRARS` so its registrar runs right after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _REGISTRARS or fullname in _pending_done:
            return None
        _pending_done.add(fullname)  # find the real spec without finding ourselves again
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader, _REGISTRARS[fullname])
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner, registrar):
        self.inner, self.registrar = inner, registrar

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            self.registrar()
        except Exception as error:  # noqa: BLE001 - our registration must never break transformers' import
            logging.getLogger(__name__).warning("spikellm could not register its classes with transformers "
                                                "(%s: %s): load spikellm models with spikellm.checkpoints.load_model",
                                                type(error).__name__, error)


_pending_done: set[str] = set()


def register_when_imported() -> None:
    """Register the classes with ``transformers``' Auto classes now for the Auto modules already
    loaded, and as soon as each of the others loads."""
    for name, registrar in _REGISTRARS.items():
        if name in sys.modules:
            registrar()
    if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
