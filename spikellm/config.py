"""Turning Hydra config groups into objects, with errors that name the override to change.

- :func:`build`: instantiate a config node; a bad value or an unknown argument is a
  :class:`ConfigError` naming its full key (``neuron.encoder.bitz=3``), before anything runs.
- :func:`check_command_line`: compose the entry point's config once, before ``@hydra.main``,
  and turn what Hydra would print as several lines (a mistyped key, a group option that does not
  exist, bad override syntax, a value left ``???``) into one :class:`OverrideError`.
- :func:`check_trusted`: refuse a ``_target_`` read from a checkpoint that is not one of
  spikellm's own model and neuron classes, so loading a file never runs code it names.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import re
from pathlib import Path
from typing import Any, Iterator

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from spikellm.errors import ConfigError, DataError, OverrideError


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
        raise ConfigError(key, target, f"could not be built: {_first_line(cause or error)}") from error
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
    return ConfigError(key, target, f"could not be built: {_first_line(error)}")


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


def _first_line(error) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


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


# --------------------------------------------------------------------------------------------
# What a checkpoint may name

# A checkpoint records the model and neuron groups it was built from; their ``_target_`` values
# name spikellm's model configs, encoders and weight quantizers: classes that live here, whose
# constructors only build modules in memory. Anything else (another package, a function such as
# spikellm.io.atomic_write_json that writes files, a path through an imported module such as
# ``spikellm.models.hf.Path.touch``) is refused before anything is built.
TRUSTED_MODULES = ("spikellm.models", "spikellm.neurons", "spikellm.quant", "spikellm.nn")
_TARGET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*")


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
                                    f"spikellm's model and neuron classes ({', '.join(TRUSTED_MODULES)}), "
                                    "and nothing it names is run")
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
    if not any(target == module or target.startswith(module + ".") for module in TRUSTED_MODULES):
        return "outside spikellm's model and neuron modules"
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
        if not any(defined_in == m or defined_in.startswith(m + ".") for m in TRUSTED_MODULES):
            return f"it is {defined_in or 'a builtin'}.{getattr(obj, '__qualname__', parts[-1])}, not spikellm's"
        return None
    return "no such module"


# --------------------------------------------------------------------------------------------
# The command line, checked before @hydra.main

# flags after which Hydra composes nothing (or prints without running), and those that change
# where configs come from: the check steps aside and Hydra does what it does
_NO_CHECK_FLAGS = ("help", "hydra_help", "shell_completion", "experimental_rerun", "info", "config_path", "config_dir")
_MAX_COMPOSES = 16
_SYNTAX = "https://hydra.cc/docs/advanced/override_grammar/basic/"
MISSING_HINTS = {
    "ckpt": "a train.py checkpoint (.ckpt), a spiking checkpoint directory or a local Hugging Face model directory",
    "model.hf_path": "a local Hugging Face model directory, e.g. /models/Llama-2-7b-hf",
    "model.checkpoint": "a spiking checkpoint directory, e.g. outputs/train/<time>/spiking_checkpoint",
    "data.path": "a local text, JSON or JSONL file, or a directory of them",
}


def check_command_line(config_dir, config_name: str, argv: list[str]) -> None:
    """Compose ``config_name`` from ``config_dir`` with the command line ``argv`` (``sys.argv[1:]``)
    as ``@hydra.main`` will, and raise an :class:`OverrideError` whose message is one line naming
    the override and its fix when it would fail:

    - a key not in the config: ``trainer.max_step is not a key of the config (did you mean
      trainer.max_steps? to add a new key use +trainer.max_step=5)``;
    - a group option that does not exist: ``neuron=lif_typo is not an option of the neuron group
      (no neuron/lif_typo.yaml in conf/); one of: bitnet, ...``;
    - override syntax, ``+`` on an existing key, ``~`` on a missing one, a sweep without ``-m``;
    - a value left ``???`` or an interpolation that does not resolve;
    - a ``hydra.run.dir`` that cannot be created or written.

    With ``-m`` each value of each sweep is composed in turn. Help, ``--info``, shell completion,
    ``--config-path``/``--config-dir`` and ``HYDRA_FULL_ERROR=1`` are left to Hydra, as is anything
    this check does not understand: it never stops a command line that Hydra would run.
    """
    import os

    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for Hydra's full traces
        return
    args = _parse_args(list(argv))
    if args is None:
        return
    from hydra.errors import OverrideParseException

    try:
        parsed = _parse_overrides(args.overrides)
    except OverrideParseException as error:
        raise _syntax_error(error) from None
    composer = _Composer(Path(config_dir), args.config_name or config_name)
    for overrides in _variants(list(args.overrides), parsed, bool(args.multirun)):
        cfg = composer.compose(overrides)
        if cfg is None:
            return
        if not args.cfg:  # --cfg prints the config as it is, ??? included
            _check_values(cfg)
            if not args.multirun:
                _check_run_dir(cfg)


def _parse_args(argv: list[str]):
    import contextlib
    import io

    try:
        from hydra._internal.utils import get_args_parser

        parser = get_args_parser()
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args, unknown = parser.parse_known_args(argv)
    except (SystemExit, Exception):  # noqa: BLE001 - --version, a bad flag: Hydra's own parser answers
        return None
    if unknown or any(getattr(args, flag, None) for flag in _NO_CHECK_FLAGS):
        return None
    return args


def _parse_overrides(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def _variants(overrides: list[str], parsed, multirun: bool) -> list[list[str]]:
    """The override lists to compose: the command line itself, or with ``-m`` each sweep's values
    in turn (the other sweeps at their first), at most :data:`_MAX_COMPOSES` of them. A sweep
    that cannot be enumerated (an interval) is left to the sweeper."""
    choices = []
    for text, override in zip(overrides, parsed):
        if not (multirun and override.is_sweep_override()):
            choices.append([text])
            continue
        try:
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        except Exception:  # noqa: BLE001
            choices.append([])
    choices = [options for options in choices if options]
    base = [options[0] for options in choices]
    variants = [base]
    for position, options in enumerate(choices):
        for option in options[1:]:
            if len(variants) >= _MAX_COMPOSES:
                return variants
            variants.append(base[:position] + [option] + base[position + 1:])
    return variants


class _Composer:
    def __init__(self, config_dir: Path, config_name: str):
        self.config_dir, self.config_name = config_dir, config_name

    def _compose(self, overrides: list[str]):
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from hydra.types import RunMode

        with initialize_config_dir(config_dir=str(self.config_dir.resolve()), version_base="1.3"):
            return GlobalHydra.instance().hydra.compose_config(
                self.config_name, overrides, run_mode=RunMode.RUN, from_shell=True, with_log_configuration=False)

    def compose(self, overrides: list[str]):
        """The composed config (Hydra's node included); an OverrideError; or None when the failure
        is not one this check explains (Hydra then reports it as it always has)."""
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from yaml import YAMLError

        try:
            return self._compose(overrides)
        except YAMLError as error:  # a config file the user wrote (an experiment) that does not parse
            raise _yaml_error(error) from None
        except (HydraException, OmegaConfBaseException) as error:
            try:
                translated = self._translate(error, overrides, _parse_overrides(overrides))
            except Exception:  # noqa: BLE001 - a bug here must not hide Hydra's own message
                return None
        except Exception:  # noqa: BLE001 - not a composition problem: leave it to Hydra
            return None
        if translated is None:
            return None
        raise translated from None

    def _translate(self, error, overrides: list[str], parsed) -> OverrideError | None:
        from hydra.errors import MissingConfigException, OverrideParseException

        if isinstance(error, OverrideParseException):
            return _syntax_error(error)
        if isinstance(error, MissingConfigException):
            return self._missing_option(error, parsed)
        message = str(error)
        if match := re.match(r"Could not override '([^']+)'", message):
            key = match.group(1)
            text, value = _given(key, overrides, parsed)
            closest = self._closest(key, overrides, text)
            add = f"to add a new key use +{key}={value}"
            hint = f"did you mean {closest}? {add}" if closest else add
            return OverrideError(key, value, f"{key} is not a key of the config ({hint})")
        if match := re.search(r"An item is already at '([^']+)'", message):
            key = match.group(1)
            value = _given(key, overrides, parsed)[1]
            return OverrideError(key, value, f"+{key}={value} adds a key, and {key} is already a key of the config: "
                                             f"drop the + ({key}={value}), or use ++{key}={value}")
        if match := re.search(r"Could not delete from config\. '([^']+)' does not exist", message):
            key = match.group(1)
            closest = self._closest(key, overrides, _given(key, overrides, parsed)[0])
            hint = f" (did you mean ~{closest}?)" if closest else ""
            return OverrideError(key, None, f"~{key} deletes a key, and {key} is not a key of the config{hint}")
        if match := re.search(r"Ambiguous value for argument '([^']+)'", message):
            text = match.group(1)
            key, _, value = text.partition("=")
            return OverrideError(key, value, f"{text} is ambiguous: write {key}=[{value}] for a list, "
                                             f"{key}='{value}' for a string, or add --multirun to sweep over it")
        return OverrideError("", None, _one_line(message))

    def _missing_option(self, error, parsed) -> OverrideError:
        missing = str(getattr(error, "missing_cfg_file", "") or "")
        group, _, option = missing.rpartition("/")
        options = list(getattr(error, "options", None) or [])
        if not group:  # the primary config itself (--config-name)
            return OverrideError("", missing, _one_line(str(error)))
        folder = "Hydra's own configs" if group.startswith("hydra/") else f"{self.config_dir.name}/"
        if not options:
            return OverrideError(group, option, f"{group}={option}: {group} is not a config group "
                                                f"(no {group}/ in {folder})")
        where = re.match(r"In '([^']+)'", str(error))
        given = any(o.key_or_group == group and str(o.value()) == option for o in parsed)
        asked = f"{group}={option}" if given or where is None else f"In '{where.group(1)}': {group}={option}"
        close = difflib.get_close_matches(option, options, n=1)
        hint = f"; did you mean {group}={close[0]}?" if close else ""
        return OverrideError(group, option, f"{asked} is not an option of the {group} group (no "
                                            f"{group}/{option}.yaml in {folder}{hint}); one of: {', '.join(options)}")

    def _closest(self, key: str, overrides: list[str], bad: str | None) -> str | None:
        """The key or group closest to ``key`` in the config composed without the override ``bad``."""
        rest = [o for o in overrides if o != bad]
        if bad is None or len(rest) == len(overrides):
            return None
        try:
            cfg = self._compose(rest)
        except Exception:  # noqa: BLE001 - another override is wrong too: no suggestion then
            return None
        keys = set(_flat_keys(cfg, ""))
        keys |= {str(group) for group in (OmegaConf.select(cfg, "hydra.runtime.choices") or {})}
        parent, _, name = key.rpartition(".")
        siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
        close = difflib.get_close_matches(name, sorted(siblings), n=1, cutoff=0.6)
        if close:
            return siblings[close[0]]
        close = difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.75)
        return close[0] if close else None


def _given(key: str, overrides: list[str], parsed) -> tuple[str | None, str]:
    """The override text that sets ``key`` and its value as typed."""
    for text, override in zip(overrides, parsed):
        if override.key_or_group == key:
            return text, text.partition("=")[2]
    return None, "..."


def _flat_keys(node, prefix: str) -> Iterator[str]:
    if isinstance(node, DictConfig):
        for name in node.keys():
            key = f"{prefix}.{name}" if prefix else str(name)
            yield key
            child = node._get_node(name)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_interpolation():
                yield from _flat_keys(child, key)


def _yaml_error(error) -> OverrideError:
    mark = getattr(error, "problem_mark", None)
    where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else "a config file"
    detail = ", ".join(str(part) for part in (getattr(error, "context", None), getattr(error, "problem", None))
                       if part) or _first_line(error)
    return OverrideError(where, None, f"{where} is not valid YAML: {detail}")


def _syntax_error(error) -> OverrideError:
    override = getattr(error, "override", "") or ""
    detail = _first_line(getattr(error, "message", None) or error)
    return OverrideError(override, None, f"cannot parse the override {override!r}: {detail}; see {_SYNTAX}")


def _one_line(message: str) -> str:
    """Hydra's several lines as one: its hints kept, its search path and trace advice dropped."""
    lines = []
    for line in message.splitlines():
        line = line.strip()
        if not line or line.startswith(("Config search path", "provider=", "Set the environment variable")):
            continue
        lines.append(line.rstrip("."))
    return "; ".join(lines) or "the config cannot be composed"


def _check_values(cfg: DictConfig) -> None:
    """Every value the run will read is set and every interpolation resolves (Hydra's own node,
    and what needs Hydra's runtime, excepted)."""
    from omegaconf.errors import OmegaConfBaseException

    for key, parent, name in _nodes(cfg, ""):
        node = parent._get_node(name)
        if node._is_missing():
            hint = MISSING_HINTS.get(key, "a value")
            raise OverrideError(key, "???", f"{key}=??? is not set: add {key}=<{hint}> to the command line")
        if node._is_interpolation():
            try:
                parent[name]
            except OmegaConfBaseException as error:
                text = str(error)
                if "HydraConfig was not set" in text or "Missing mandatory value" in text:
                    continue  # ${hydra:...} is set when the run starts; a ??? is reported at its own key
                raise OverrideError(key, node._value(), f"{key}={node._value()} cannot be resolved: "
                                                        f"{_first_line(error)}") from None


def _nodes(node, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """``(full key, parent, name)`` of every node but Hydra's own, parents before children."""
    names = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for name in names:
        if not prefix and name == "hydra":
            continue
        key = f"{prefix}.{name}" if prefix else str(name)
        yield key, node, name
        child = node._get_node(name)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_missing() and not child._is_interpolation():
            yield from _nodes(child, key)


def _check_run_dir(cfg: DictConfig) -> None:
    """The directory Hydra is about to create for the run (``hydra.run.dir``) can be: the nearest
    part of it that exists is a writable directory (probed with an empty directory, removed at
    once; the run directory itself is left for Hydra to create)."""
    import tempfile

    try:
        from hydra.core.utils import setup_globals

        setup_globals()  # the ${now:...} resolver, as @hydra.main registers it
        run_dir = OmegaConf.select(cfg, "hydra.run.dir", throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - it needs Hydra's runtime: Hydra will create it, or report it
        return
    if not run_dir:
        return
    from spikellm.io import write_failure

    path = Path(str(run_dir)).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OverrideError("hydra.run.dir", str(run_dir), f"hydra.run.dir={run_dir} cannot be created: {existing} "
                                                           "is a file, not a directory; choose another hydra.run.dir")
    try:
        probe = tempfile.mkdtemp(prefix=".spikellm-write-probe-", dir=existing)
        Path(probe).rmdir()
    except OSError as error:
        raise OverrideError("hydra.run.dir", str(run_dir),
                            f"hydra.run.dir={run_dir} cannot be created in {existing}: "
                            f"{write_failure(error) or error.strerror or error}; "
                            "choose another hydra.run.dir") from None


__all__ = ["TRUSTED_MODULES", "build", "build_attention_encoder", "build_neuron", "check_arguments",
           "check_command_line", "check_trusted"]
