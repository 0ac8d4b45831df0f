"""Exceptions that the entry points turn into one clear line for the user."""


class SpikeLLMError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""


class ConfigError(SpikeLLMError, ValueError):
    """A configuration value is invalid.

    ``key`` is the config key relative to the object that raised it (``bits``); the entry
    point prefixes the group it instantiated (``neuron.encoder``) so the user sees the full
    override to change.
    """

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")

    def with_prefix(self, prefix: str) -> "ConfigError":
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.key}", self.value, self.allowed)


class OverrideError(ConfigError):
    """A command line Hydra cannot compose (a mistyped key or group option, bad override syntax,
    a value left unset); ``message`` is the whole line, naming the override and its fix."""

    def __init__(self, key: str, value, message: str):
        self.key, self.value, self.allowed = key, value, message
        SpikeLLMError.__init__(self, message)

    def with_prefix(self, prefix: str) -> "OverrideError":
        return self


class DataError(SpikeLLMError):
    """A file could not be read or written: a corpus, tokenizer or checkpoint that is missing,
    corrupt or untrusted, or an output that does not fit where it goes (no space, read-only)."""


class Interrupted(SpikeLLMError):
    """Ctrl-C: the message says what was kept and how to go on (the entry points exit with 130)."""


def first_line(error: BaseException | str, empty: str | None = None) -> str:
    """The first non-blank line of an error's message, stripped: what a one-line report quotes
    of a library's several lines; ``empty`` (the error's type name by default) when it has none."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else (type(error).__name__ if empty is None else empty)
