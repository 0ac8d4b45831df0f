"""Hydra's composition as the command-line check runs it, and its errors as one line each.

:class:`Composer` composes a config the way ``@hydra.main`` does (the one call tests pin in
``tests/project/test_config.py``, so a Hydra upgrade that changes it fails there first) and
translates what Hydra would print as several lines: a mistyped key (with the closest key: the
same name one group down, or a near spelling), a group option that does not exist, ``+`` on an
existing key, ``~`` on a missing one, an ambiguous value, a config file that is not YAML.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from spikellm.errors import OverrideError, first_line

_SYNTAX = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def parse_overrides(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


class Composer:
    """Composes a config as ``@hydra.main`` will, and turns a failure into one :class:`OverrideError`."""

    def __init__(self, config_dir: Path, config_name: str):
        self.config_dir, self.config_name = config_dir, config_name

    def _compose(self, overrides: list[str]):
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from hydra.types import RunMode

        # not hydra.compose(): it parses the overrides as if typed in Python (from_shell=False) and
        # without a run mode, so quoting, hydra.run.dir and ${hydra:...} would differ from what
        # @hydra.main composes; this is the call it makes (hydra.core.global_hydra is public)
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
                translated = self._translate(error, overrides, parse_overrides(overrides))
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
            return syntax_error(error)
        if isinstance(error, MissingConfigException):
            return self._missing_option(error, parsed)
        message = str(error)
        if match := re.match(r"Could not override '([^']+)'", message):
            key = match.group(1)
            text, value = _given(key, overrides, parsed)
            closest = self._closest(key, overrides, text)
            add = f"to add a new key use +{key}={value}"
            if closest and closest.endswith("." + key):  # the key one group down: adding would be wrong
                hint = f"did you mean {closest}={value}?"
            else:
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
        keys = config_keys(cfg)
        keys |= {str(group) for group in (OmegaConf.select(cfg, "hydra.runtime.choices") or {})}
        parent, _, name = key.rpartition(".")
        # the same name one group down: `lr` is task.lr, `max_steps` is trainer.max_steps
        same_name = sorted((k for k in keys if k.rpartition(".")[2] == name and k != key and not k.startswith("hydra.")),
                           key=lambda k: (k.count("."), k))
        if same_name:
            return same_name[0]
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


def nodes(node, prefix: str = "", hydra: bool = False, lists: bool = True) -> Iterator[tuple[str, Any, Any]]:
    """``(dotted key, parent, name)`` of every node of a config, parents before children, without
    resolving anything; Hydra's own node only with ``hydra``, lists entered only with ``lists``."""
    names = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for name in names:
        if not prefix and name == "hydra" and not hydra:
            continue
        key = f"{prefix}.{name}" if prefix else str(name)
        yield key, node, name
        if _plain_container(node, name) and (lists or isinstance(node[name], DictConfig)):
            yield from nodes(node[name], key, hydra, lists)


def config_keys(cfg) -> set[str]:
    """Every dotted key of a config's mappings, Hydra's included."""
    return {key for key, _, _ in nodes(cfg, hydra=True, lists=False)}


def _plain_container(parent, name) -> bool:
    """Whether ``parent[name]`` is a mapping or list that is set and no interpolation, so that
    reading it resolves nothing (OmegaConf's public predicates; the node itself is not read)."""
    if OmegaConf.is_missing(parent, name) or OmegaConf.is_interpolation(parent, name):
        return False
    return isinstance(parent[name], (DictConfig, ListConfig))


def _yaml_error(error) -> OverrideError:
    mark = getattr(error, "problem_mark", None)
    where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else "a config file"
    detail = ", ".join(str(part) for part in (getattr(error, "context", None), getattr(error, "problem", None))
                       if part) or first_line(error)
    return OverrideError(where, None, f"{where} is not valid YAML: {detail}")


def syntax_error(error) -> OverrideError:
    override = getattr(error, "override", "") or ""
    detail = first_line(getattr(error, "message", None) or error)
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
