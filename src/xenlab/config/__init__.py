"""The xl domain-configuration language: parse, check and write xl config files.

Entry points: :func:`parse` (text to :class:`ConfigFile`), :func:`format_config`
(a canonical file back), and the device-spec parsers in :mod:`xenlab.config.specs`.
"""

from xenlab.config.errors import ConfigError, ConfigWarning
from xenlab.config.parser import parse
from xenlab.config.values import ConfigFile, Op, Setting, Value

__all__ = [
    "ConfigError",
    "ConfigFile",
    "ConfigWarning",
    "Op",
    "Setting",
    "Value",
    "parse",
]
