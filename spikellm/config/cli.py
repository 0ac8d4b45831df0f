"""The command line, checked before ``@hydra.main``: :func:`check_command_line` composes the entry
point's config once and turns what Hydra would print as several lines (a mistyped key, a group
option that does not exist, bad override syntax, a value left ``???``) into one
:class:`OverrideError`; :func:`run` is the wrapper every entry point shares."""
from __future__ import annotations

import contextlib
import difflib
import re
import sys
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from spikellm.errors import OverrideError, first_line


# flags after which Hydra composes nothing (or prints without running), and those that change
# where configs come from: the check steps aside and Hydra does what it does
_NO_CHECK_FLAGS = ("help", "hydra_help", "shell_completion", "experimental_rerun", "info", "config_path", "config_dir")
_MAX_COMPOSES = 16
_SYNTAX = "https://hydra.cc/docs/advanced/override_grammar/basic/"
MISSING_HINTS = {
    "ckpt": "a train.py checkpoint (.ckpt), a spiking checkpoint directory or a local Hugging Face model directory",
    "model.hf_path": "a local Hugging Face model directory, e.g. /models/Llama-2-7b-hf",
    "model.checkpoint": "a spiking checkpoint directory, e.g. outputs/train/<time>/spiking_checkpoint",
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
        _check_additions(cfg, parsed)
        if not args.cfg:  # --cfg prints the config as it is, ??? included
            _check_values(cfg)
            if not args.multirun:
                _check_sweep_needs_multirun(cfg, args.overrides)
                _check_run_dir(cfg, args.config_name or config_name)


def _check_additions(cfg: DictConfig, parsed) -> None:
    """``+precision=bf16-true`` adds a top-level key nothing reads, and the run would go on in fp32
    without a word: a ``+key`` whose name is that of a key deeper in the config is refused with
    that key (``trainer.precision``). A ``+key`` that matches nothing is the user's own addition."""
    added = [o for o in parsed if o.is_add() and "." not in o.key_or_group and "/" not in o.key_or_group]
    keys = set(_flat_keys(cfg, "")) if added else set()  # walked only when there is a top-level +key
    for override in added:
        key = override.key_or_group
        deeper = sorted(k for k in keys if k.rpartition(".")[2] == key and "." in k and not k.startswith("hydra."))
        if deeper:
            value = override.value()
            raise OverrideError(key, value, f"+{key}={value} adds a top-level key that nothing reads; did you mean "
                                            f"{deeper[0]}={value}?")


def _parse_args(argv: list[str]):
    import contextlib
    import io

    try:
        # Hydra has no public API for its command-line parser; this is the one @hydra.main uses, so
        # the check reads -m, --cfg, --config-name and the overrides exactly as the run will
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
        keys = set(_flat_keys(cfg, ""))
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


def _flat_keys(node, prefix: str) -> Iterator[str]:
    """Every dotted key of a config's mappings (lists not entered), without resolving anything."""
    if isinstance(node, DictConfig):
        for name in node.keys():
            key = f"{prefix}.{name}" if prefix else str(name)
            yield key
            if _plain_container(node, name):
                yield from _flat_keys(node[name], key)


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


def _syntax_error(error) -> OverrideError:
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


def _check_values(cfg: DictConfig) -> None:
    """Every value the run will read is set and every interpolation resolves (Hydra's own node,
    and what needs Hydra's runtime, excepted)."""
    from omegaconf.errors import OmegaConfBaseException

    for key, parent, name in _nodes(cfg, ""):
        if OmegaConf.is_missing(parent, name):
            hint = MISSING_HINTS.get(key, "a value")
            raise OverrideError(key, "???", f"{key}=??? is not set: add {key}=<{hint}> to the command line")
        if OmegaConf.is_interpolation(parent, name):
            try:
                parent[name]
            except OmegaConfBaseException as error:
                text = str(error)
                if "HydraConfig was not set" in text or "Missing mandatory value" in text:
                    continue  # ${hydra:...} is set when the run starts; a ??? is reported at its own key
                raw = OmegaConf.to_container(parent, resolve=False)[name]  # the ${...} as written
                raise OverrideError(key, raw, f"{key}={raw} cannot be resolved: {first_line(error)}") from None


def _nodes(node, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """``(full key, parent, name)`` of every node but Hydra's own, parents before children."""
    names = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for name in names:
        if not prefix and name == "hydra":
            continue
        key = f"{prefix}.{name}" if prefix else str(name)
        yield key, node, name
        if _plain_container(node, name):
            yield from _nodes(node[name], key)


def _check_sweep_needs_multirun(cfg: DictConfig, overrides: list[str]) -> None:
    """A config that declares a sweep (``hydra.sweeper.params``, as ``experiment=spike_sweep`` does)
    trains one default run without ``-m``, with no word: refuse it."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
    if params:
        where = next((o for o in overrides if o.startswith("experiment=")), "the config")
        raise OverrideError("", None, f"{where} is a sweep over {', '.join(params)} "
                                      f"({len(str(next(iter(params.values()))).split(','))} runs): run it with -m "
                                      "(python train.py -m ...)")


# what an eval.py or generate.py run leaves in its directory: another run there would replace its
# record (Hydra rewrites .hydra/ before the job refuses to overwrite the results themselves)
_RUN_OUTPUTS = {"eval": "results.json", "generate": "generations.jsonl"}


def _check_run_dir(cfg: DictConfig, config_name: str = "") -> None:
    """The directory Hydra is about to create for the run (``hydra.run.dir``) can be: the nearest
    part of it that exists is a writable directory (probed with an empty directory, removed at
    once; the run directory itself is left for Hydra to create), and it holds no earlier
    evaluation's or generation's outputs."""
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
    earlier = path / _RUN_OUTPUTS.get(config_name, "\0")
    if config_name in _RUN_OUTPUTS and earlier.exists():
        raise OverrideError("hydra.run.dir", str(run_dir), f"hydra.run.dir={run_dir} already holds an earlier run "
                                                           f"({earlier.name}); choose another hydra.run.dir "
                                                           "(nothing is overwritten)")
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


def run_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job (``hydra.*`` ones left out), or none
    when it was not launched by Hydra (a test, a notebook)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.")]
    except ValueError:  # HydraConfig was not set
        return []


def run_command(script: str) -> str | None:
    """``python <script> <overrides>`` of the running Hydra job: how a model card says it was made."""
    from shlex import quote

    overrides = run_overrides()
    return " ".join(["python", script, *map(quote, overrides)]) if overrides else None


def conf_dir() -> Path:
    """The config tree (the repository's top-level ``conf/``, installed as the ``spikellm.conf``
    package data): the same directory whether spikellm runs from a checkout or from a wheel."""
    from importlib.resources import files

    return Path(str(files("spikellm.conf")))


@contextlib.contextmanager
def one_line_errors():
    """A :class:`~spikellm.errors.SpikeLLMError` (a bad setting, an unreadable file) ends the
    command with its one line on stderr and exit status 2, not a traceback; Ctrl-C with one line
    (what was saved, for a conversion) and status 130."""
    from spikellm.errors import Interrupted, SpikeLLMError

    try:
        yield
    except Interrupted as error:  # Ctrl-C: what was kept, and how to go on
        print(f"interrupted: {error}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SpikeLLMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def run(main, config_name: str) -> None:
    """What every entry point does: check the command line against ``conf/<config_name>.yaml``
    (one line and exit 2 on a mistake, before Hydra prints its several), then run the
    ``@hydra.main`` function ``main``."""
    with one_line_errors():
        check_command_line(conf_dir(), config_name, sys.argv[1:])
    main()
