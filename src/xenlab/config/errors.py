"""Errors and warnings of the xl configuration language: ConfigError, ConfigWarning."""

from __future__ import annotations

from dataclasses import dataclass

from xenlab.errors import ParseError, Problem


class ConfigError(ParseError):
    """An xl configuration file or device spec is invalid.

    Raised by every parser in :mod:`xenlab.config` and nothing else: random
    input gives this error with a place, never another exception.
    """

    #: True when the text looks like an xm-era Python config (libxlutil's
    #: "likely python" verdict); ``xenlab config from-xm`` can convert it.
    likely_python: bool = False


def config_error(source: str, line: int, col: int, message: str) -> ConfigError:
    """Build a ConfigError with a single problem."""
    return ConfigError([Problem(source, line, col, message)])


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """Something xl would warn about but accept (an unknown key, say)."""

    source: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: warning: {self.message}"
