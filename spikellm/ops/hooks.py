"""Module hooks that are registered together and removed together: the base of what observes a
model's forwards (the operation counter, the saliency accumulator)."""
from __future__ import annotations

from torch.utils.hooks import RemovableHandle


class HookSet:
    """Holds the handles in ``self._handles``; :meth:`remove` takes every hook off, and so does
    leaving a ``with`` block (so an exception never leaves a model hooked)."""

    def __init__(self):
        self._handles: list[RemovableHandle] = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
