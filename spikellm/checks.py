"""Argument checks shared by every configurable object: each raises a :class:`ConfigError` whose
message names the key and what is allowed, so a wrong override reads as one clear line."""
from __future__ import annotations

from spikellm.errors import ConfigError


def check_int(key: str, value, low: int, high: int | None = None) -> int:
    """An integer in ``[low, high]`` (no upper bound when ``high`` is None); bools are refused."""
    allowed = f"must be an integer in [{low}, {high}]" if high is not None else f"must be an integer >= {low}"
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ConfigError(key, value, allowed)
    return value


def check_float(key: str, value, low: float, high: float, low_open: bool = False) -> float:
    """A real number in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    bracket = "(" if low_open else "["
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value <= high
    ok = ok and (value > low if low_open else value >= low)
    if not ok:
        raise ConfigError(key, value, f"must be a number in {bracket}{low}, {high}]")
    return float(value)


def check_bool(key: str, value) -> bool:
    """A real bool: a string such as "false" would otherwise be truthy."""
    if not isinstance(value, bool):
        raise ConfigError(key, value, "must be true or false")
    return value


def check_device(value, key: str = "device") -> str:
    """The device ``value`` names (``auto``: CUDA when there is one, else the CPU), refused in one
    line when it is no device or names CUDA on a machine without it."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if value == "auto" else str(value)
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ConfigError(key, value, "is not a device: give auto, cpu or cuda[:<index>]") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(key, value, "CUDA is not available on this machine: use device=cpu (or auto)")
    return device
