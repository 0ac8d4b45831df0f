"""Progress bars for work that takes minutes: a rich bar with the time left, on stderr.

Every long stage (a perplexity pass, each conversion stage) shows one, advanced often enough to
move every few seconds: per calibration batch, per layer inside a block, per block inside a
forward (:func:`per_block`). Rich draws one live
display at a time, so a bar opened while another is showing advances nothing and draws nothing.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

Advance = Callable[[float], None]
PROGRESS_MIN_BYTES = 8 << 20  # less text than this takes about a second: no byte bar


def _nothing(amount: float = 1.0) -> None:
    return None


@contextmanager
def progress_bar(description: str, total: float, enabled: bool = True) -> Iterator[Advance]:
    """``with progress_bar("GPTQ", total=n) as advance: ... advance(1)``: done/total, elapsed, time left."""
    if not enabled or total <= 0:
        yield _nothing
        return
    from rich.console import Console
    from rich.errors import LiveError
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=Console(file=sys.stderr),
                   refresh_per_second=2, transient=True)
    try:
        bar.start()
    except LiveError:  # another bar is showing: this one stays silent
        yield _nothing
        return
    try:
        task = bar.add_task(description, total=total)
        yield lambda amount=1.0: bar.update(task, advance=amount)
    finally:
        bar.stop()


@contextmanager
def per_block(blocks, advance: Advance, amount: float = 1.0) -> Iterator[None]:
    """``advance(amount)`` each time one of ``blocks`` (decoder blocks) finishes a forward: a bar
    over a billion-parameter forward moves every block, not once per batch."""
    def hook(module, args, output) -> None:  # returns None: the block's output stays as it is
        advance(amount)

    handles = [block.register_forward_hook(hook) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def is_local_rank_zero() -> bool:
    """Whether this is the process that shows progress bars (a DDP job's other processes wait on
    the cache's locks, silently)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


@contextmanager
def byte_progress(description: str, total_bytes: int):
    """A rich progress bar over ``total_bytes`` of text, with tokens/s; yields ``advance(bytes, tokens_so_far)``."""
    if total_bytes < PROGRESS_MIN_BYTES or not is_local_rank_zero():
        yield lambda done, tokens=None: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    start = time.monotonic()
    with Progress(*columns, console=Console(file=sys.stderr), refresh_per_second=2) as bar:
        task = bar.add_task(description, total=total_bytes, rate="")

        def advance(done: int, tokens: int | None = None):
            rate = "" if tokens is None else f"{tokens / max(time.monotonic() - start, 1e-9):,.0f} tokens/s"
            bar.update(task, advance=done, rate=rate)

        yield advance
