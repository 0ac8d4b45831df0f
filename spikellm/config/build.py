"""Turning Hydra config groups into objects, with errors that name the override to change.

:func:`build` instantiates a config node; a bad value or an unknown argument is a
:class:`ConfigError` naming its full key (``neuron.encoder.bitz=3``), before anything runs.
:func:`build_model` is the one place a model is made from its ``model`` and ``neuron`` groups.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import re
from typing import Any, Iterator

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from spikellm.errors import ConfigError, first_line


def _run_config_dir(ckpt_path, stamp) -> str:
    """Hydra's ``output_subdir``: ``.hydra`` for a new run; a resumed run (``ckpt_path`` set) keeps
    the interrupted run's ``.hydra/`` files and writes its own beside them."""
    return ".hydra" if ckpt_path in (None, "") else f".hydra/resumed-{stamp}"


# used by conf/hydra/default.yaml; registered on import, since train.py imports this module first
OmegaConf.register_new_resolver("spikellm_run_config_dir", _run_config_dir, replace=True)

# keys of a config node that Hydra's instantiate reads itself, not the target
_HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")


def build(node: Any, key: str, **kwargs) -> Any:
    """``hydra.utils.instantiate(node)``; a :class:`ConfigError` raised by the target (or by the
    first call of a ``_partial_`` factory, which is made here to validate it) comes out with its
    key prefixed by ``key``, the group's place in the config (``neuron.encoder.bits=1 ...``).
    An argument the target does not take (``+neuron.encoder.bitz=3``) is refused by name first."""
    if node is None:
        return None
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    check_arguments(node, key)
    target = node.get("_target_") if isinstance(node, dict) else None
    try:
        built = instantiate(node, **kwargs)
        if isinstance(built, functools.partial):
            built()
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ConfigError):
            raise cause.with_prefix(key) from None
        if isinstance(cause, TypeError):
            raise _argument_error(cause, node, key) from None
        raise ConfigError(key, target, f"could not be built: {first_line(cause or error)}") from error
    except ConfigError as error:
        raise error.with_prefix(key) from None
    except TypeError as error:  # the factory's first call: a signature that hides its arguments (**kwargs)
        raise _argument_error(error, node, key) from None
    return built


def _argument_error(error: TypeError, node, key: str) -> ConfigError:
    target = node.get("_target_") if isinstance(node, dict) else None
    unexpected = re.search(r"unexpected keyword argument '([^']+)'", str(error))
    if unexpected and isinstance(node, dict) and unexpected.group(1) in node:
        name = unexpected.group(1)
        return ConfigError(f"{key}.{name}", node[name], f"{_short(target)} takes no argument {name!r}")
    return ConfigError(key, target, f"could not be built: {first_line(error)}")


def check_arguments(node: Any, key: str) -> None:
    """Every argument a ``_target_`` node (and each node nested in it) sets must be one its target
    takes: ``neuron.encoder.bitz=3 is invalid: TernaryEncoder has no argument 'bitz' (did you mean
    bits?)``. Targets that cannot be located or inspected, or take ``**kwargs``, are left to
    :func:`build`'s own errors."""
    for path, value in _target_nodes(node, key):
        target = value["_target_"]
        try:
            from hydra.utils import get_object

            parameters = inspect.signature(get_object(target)).parameters.values()
        except Exception:  # noqa: BLE001 - not locatable or not inspectable: instantiate reports it
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            continue
        names = [p.name for p in parameters
                 if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        for name in value:
            if name in _HYDRA_KEYS or name in names:
                continue
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            listed = ", ".join(names) if names else "none"
            raise ConfigError(f"{path}.{name}" if path else str(name), value[name],
                              f"{_short(target)} has no argument {name!r}{hint}; its arguments: {listed}")


def _target_nodes(node: Any, path: str) -> Iterator[tuple[str, dict]]:
    """``(key, node)`` of every dict holding a ``_target_`` in a tree of dicts and lists."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for name, value in node.items():
            yield from _target_nodes(value, f"{path}.{name}" if path else str(name))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _target_nodes(value, f"{path}.{index}" if path else str(index))


def _short(target) -> str:
    return str(target).rsplit(".", 1)[-1]


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


def build_model(model: dict | DictConfig, neuron: dict | DictConfig | None, key: str = "model"):
    """The model a ``model`` group (a config with ``.build``) and a ``neuron`` group describe:
    what train.py trains and every loader rebuilds."""
    encoder, weight_quantizer = build_neuron(neuron)
    options = neuron or {}
    config = build(model, key)
    if not callable(getattr(config, "build", None)):
        target = model.get("_target_") if isinstance(model, (dict, DictConfig)) else model
        raise ConfigError(f"{key}._target_", target, "is not a model config (LlamaConfig, MatMulFreeConfig)")
    return config.build(encoder, weight_quantizer, unroll=bool(options.get("unroll", False)),
                        attention_encoder=build_attention_encoder(neuron), rotate=bool(options.get("rotate", False)))
