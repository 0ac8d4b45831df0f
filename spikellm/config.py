"""Turning Hydra config groups into objects, with errors that name the override to change."""
from __future__ import annotations

import functools
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from spikellm.errors import ConfigError


def build(node: Any, key: str, **kwargs) -> Any:
    """``hydra.utils.instantiate(node)``; a :class:`ConfigError` raised by the target (or by the
    first call of a ``_partial_`` factory, which is made here to validate it) comes out with its
    key prefixed by ``key``, the group's place in the config (``neuron.encoder.bits=1 ...``)."""
    if node is None:
        return None
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    try:
        built = instantiate(node, **kwargs)
        if isinstance(built, functools.partial):
            built()
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ConfigError):
            raise cause.with_prefix(key) from None
        target = node.get("_target_") if isinstance(node, dict) else None
        raise ConfigError(key, target, f"could not be built: {cause or error}") from error
    except ConfigError as error:
        raise error.with_prefix(key) from None
    return built


def build_neuron(neuron: dict | DictConfig | None, key: str = "neuron"):
    """The encoder and weight-quantizer factories of a ``neuron`` group (each may be None)."""
    if neuron is None:
        return None, None
    return (build(neuron.get("encoder"), f"{key}.encoder"),
            build(neuron.get("weight_quantizer"), f"{key}.weight_quantizer"))


def build_attention_encoder(neuron: dict | DictConfig | None, key: str = "neuron"):
    """The ``role -> encoder`` factory of a neuron group's ``attention: {key, value}``, or None
    (attention products stay in floating point)."""
    attention = None if neuron is None else neuron.get("attention")
    if attention is None:
        return None
    factories = {role: build(attention.get(role), f"{key}.attention.{role}") for role in ("key", "value")}
    if None in factories.values():
        raise ConfigError(f"{key}.attention", sorted(attention), "needs both a 'key' and a 'value' encoder")
    return lambda role: factories[role]()
