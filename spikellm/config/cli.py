"""The command line, checked before ``@hydra.main``: :func:`check_command_line` composes the entry
point's config (:mod:`~spikellm.config.overrides`) and checks it (:mod:`~spikellm.config.run_checks`),
turning what Hydra would print as several lines into one :class:`OverrideError`; :func:`run` is
the wrapper every entry point shares."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from spikellm.config.overrides import Composer, parse_overrides, syntax_error
from spikellm.config.run_checks import check_composed

# flags after which Hydra composes nothing (or prints without running), and those that change
# where configs come from: the check steps aside and Hydra does what it does
_NO_CHECK_FLAGS = ("help", "hydra_help", "shell_completion", "experimental_rerun", "info", "config_path", "config_dir")
_MAX_COMPOSES = 16


def check_command_line(config_dir, config_name: str, argv: list[str]) -> None:
    """Compose ``config_name`` from ``config_dir`` with the command line ``argv`` (``sys.argv[1:]``)
    as ``@hydra.main`` will, and raise an :class:`OverrideError` whose message is one line naming
    the override and its fix when it would fail (``trainer.max_step is not a key of the config
    (did you mean trainer.max_steps? ...)``, ``neuron=lif_typo is not an option of the neuron
    group ...``, bad syntax, a value left ``???``, a run directory that cannot be made; docs/bad_inputs.md).

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
        parsed = parse_overrides(args.overrides)
    except OverrideParseException as error:
        raise syntax_error(error) from None
    composer = Composer(Path(config_dir), args.config_name or config_name)
    for overrides in _variants(list(args.overrides), parsed, bool(args.multirun)):
        cfg = composer.compose(overrides)
        if cfg is None:
            return
        check_composed(cfg, parsed, args.overrides, args.config_name or config_name, bool(args.cfg),
                       bool(args.multirun))


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
