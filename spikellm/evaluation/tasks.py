"""Zero-shot tasks through lm-evaluation-harness: find them (local YAML tasks beside the bundled
ones, hub names that fail fast offline), run them on an LM (:class:`~spikellm.evaluation.harness.SpikeLLMEvalLM`)
and summarise their metrics. lm-eval 0.4.13 offers no public API for part of the discovery, so
the private pieces used are named where they are used."""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from spikellm.errors import ConfigError, DataError, SpikeLLMError

log = logging.getLogger(__name__)

HUB_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq")
# accuracy of choice tasks; perplexity of rolling-loglikelihood ones (tiny_ppl, wikitext)
METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "word_perplexity", "byte_perplexity", "bits_per_byte")


def run_tasks(lm, tasks: Sequence[str] | str, include_path: str | os.PathLike | Sequence | None = None,
              limit: int | float | None = None, num_fewshot: int | None = 0, *,
              bootstrap_iters: int = 100000) -> dict[str, dict[str, float]]:
    """Evaluate ``lm`` (an lm-eval ``LM``, e.g. :class:`SpikeLLMEvalLM`) on ``tasks``.

    Task names found under ``include_path`` (directories of task YAML files, e.g.
    ``examples/lm_eval_tasks``) run offline with ``TaskManager(include_defaults=False)``: no
    index of lm-eval's ~15k built-in tasks, no hub. Relative ``data_files`` in those YAMLs are
    resolved against the YAML's directory or the nearest parent holding them (lm-eval's CLI uses
    the working directory), so any working directory works. Other names (piqa, arc_easy, arc_challenge, hellaswag,
    winogrande, boolq, or any lm-eval task) go through lm-eval's full task index (built once per
    process) and need the Hugging Face Hub for their data; without it they raise
    :class:`DataError` at once (after a probe of at most a few seconds, before any indexing for
    those six names). A local task shadows a built-in one of the same name.

    Returns ``{task: {metric: value}}`` for the :data:`METRICS` each task reports (``acc``,
    ``acc_norm`` and their stderr; ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``). Raises :class:`ConfigError` for a name that is no task at all.
    """
    from lm_eval import simple_evaluate

    names = _task_names(tasks)
    paths = _include_paths(include_path)
    local = _local_manager(paths)  # include_defaults=False: no index of lm-eval's built-in tasks
    local_names = set(local.all_tasks)
    remote = [name for name in names if name not in local_names and not _is_yaml_file(name)]
    unchecked = [name for name in remote if name not in HUB_TASKS]
    if unchecked:  # only lm-eval's full index (several seconds to build) knows every task name
        known = set(_default_manager().all_tasks)
        for name in unchecked:
            if name not in known:
                raise ConfigError("tasks", name, _unknown_task_hint(paths, sorted(local_names)))
    if remote:
        _require_hub(remote)
    loaded = {}
    try:
        local_specs = [_anchored_spec(local, name) for name in names if name not in remote]
        if local_specs:
            loaded.update(local.load(local_specs)["tasks"])
        if remote:
            loaded.update(_default_manager().load(remote)["tasks"])
    except SpikeLLMError:
        raise
    except Exception as e:  # datasets / hub / YAML errors: say which tasks, in one line
        detail = (str(e).strip().splitlines() or [""])[0]
        hint = (f"; tasks {remote} read their data from the Hugging Face Hub: evaluate offline with local "
                f"task files via include_path (see examples/lm_eval_tasks)") if remote else ""
        raise DataError(f"cannot load the data of tasks {names} ({type(e).__name__}: {detail}){hint}") from e
    # Task objects are built already: simple_evaluate's manager only passes them through
    results = simple_evaluate(model=lm, tasks=list(loaded.values()), num_fewshot=num_fewshot,
                              limit=limit, task_manager=local, log_samples=False,
                              bootstrap_iters=bootstrap_iters)
    return summarize(results) if results is not None else {}


def summarize(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for :data:`METRICS` from ``simple_evaluate``'s output (the
    unfiltered ``"none"`` filter; numeric values only, a stderr lm-eval could not compute is left out)."""
    summary = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            name, _, filter_name = key.partition(",")
            if name in METRICS and filter_name in ("none", "") and isinstance(value, (int, float)):
                row[name] = float(value)
        if row:
            summary[task] = row
    return summary


def _task_names(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [str(name).strip() for name in tasks]
    names = [name for name in names if name]
    if not names:
        raise ConfigError("tasks", tasks, "give at least one task name")
    return list(dict.fromkeys(names))


def _include_paths(include_path) -> tuple[str, ...]:
    if include_path is None:
        return ()
    items = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    paths = []
    for item in items:
        path = Path(item).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError("include_path", str(item), "no such directory; give a directory of lm-eval task "
                                                         "YAML files (e.g. examples/lm_eval_tasks)")
        paths.append(str(path))
    return tuple(paths)


def _is_yaml_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


@lru_cache(maxsize=8)
def _local_manager(paths: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=False)


@lru_cache(maxsize=1)
def _default_manager():
    """lm-eval's built-in tasks (indexing them takes several seconds; built once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=True)


def _unknown_task_hint(paths: tuple[str, ...], local_names: list[str]) -> str:
    if not paths:
        return ("not an lm-eval task, and no include_path was given: pass include_path=<directory of task "
                "YAML files> (e.g. examples/lm_eval_tasks) to run local tasks")
    available = ", ".join(local_names) if local_names else "none"
    return (f"neither a local task under include_path={', '.join(paths)} (available local tasks: {available}) "
            f"nor an lm-eval task")


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _hub_reachable() -> bool:
    # the same fast probe the corpora use: offline, ``datasets`` would retry for about a minute
    from spikellm.data.corpus import hub_reachable

    return hub_reachable()


def _require_hub(names: Sequence[str]) -> None:
    """Raise DataError now if the tasks' hub data cannot be fetched (unless offline mode was asked
    for, where ``datasets`` reads its cache and fails fast by itself)."""
    from spikellm.data.corpus import hub_offline_requested

    if hub_offline_requested() or _hub_reachable():
        return
    raise DataError(f"tasks {list(names)} download their data from the Hugging Face Hub ({_hub_endpoint()}), "
                    f"which cannot be reached: evaluate offline with local task files via include_path "
                    f"(e.g. run_tasks(..., include_path='examples/lm_eval_tasks') or lm_eval --include_path DIR), "
                    f"or set HF_DATASETS_OFFLINE=1 if these datasets are already in the local cache")


def _anchored_spec(manager, name: str):
    """``name``, or its full config with relative ``data_files``/``dataset_path`` resolved against
    the directory of its YAML file or the nearest parent where they exist (lm-eval itself would
    resolve them against the working directory)."""
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None or entry.kind is not Kind.TASK or not entry.cfg:
        return name
    base = Path(entry.yaml_path).parent
    kwargs = dict(entry.cfg.get("dataset_kwargs") or {})
    data_files = _anchor(kwargs.get("data_files"), base)
    dataset_path = entry.cfg.get("dataset_path")
    anchored_path = _anchor(dataset_path, base, directory=True)
    if data_files == kwargs.get("data_files") and anchored_path == dataset_path:
        return name
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    if data_files is not None:
        cfg["dataset_kwargs"] = {**(cfg.get("dataset_kwargs") or {}), "data_files": data_files}
    cfg["dataset_path"] = anchored_path
    return cfg


def _anchor(value, base: Path, directory: bool = False):
    """Relative paths in ``value`` made absolute against ``base`` or the nearest of its parents
    where they exist (so a path written relative to the repository root works too); others kept."""
    if isinstance(value, str):
        path = Path(value).expanduser()
        if path.is_absolute():
            return value
        for root in (base, *base.parents):
            candidate = root / path
            if candidate.is_dir() if directory else candidate.is_file():
                return str(candidate)
        return value
    if isinstance(value, list):
        return [_anchor(item, base, directory) for item in value]
    if isinstance(value, dict):
        return {key: _anchor(item, base, directory) for key, item in value.items()}
    return value


# ====================================================================== command line
