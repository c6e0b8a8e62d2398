"""The root of xenlab's error tree; every error xenlab raises on purpose.

::

    XenlabError
     +-- ParseError (also ValueError)   text with a place: source:line:col
     |    +-- (config.ConfigError)      xl configuration files and specs
     +-- FormatError (also ValueError)  binary data with a place: source+0xOFFSET
     |    +-- TruncatedError            need more bytes than there are
     +-- (files.FileError)              a user-named path could not be read or written:
     |    +-- FileReadError (files), FileWriteError (atomic)
     +-- (files.InputTooLargeError)     a file holds more than its reader takes
     +-- StateError                     an object is not in the state a call needs
     |    +-- (vm.store.StoreError)     SQLite could not read or write the state store
     +-- BackendError                   QEMU, QMP, netlink; root cause in __cause__
     +-- SimError                       a place in simulated time

This module imports nothing from the rooms, so every room can import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self


class XenlabError(Exception):
    """Root of every error xenlab raises on purpose."""

    def within(self, where: str) -> Self:
        """This error, its message prefixed with ``where`` (the verb and the object it
        was working on); its class and fields stay, so callers can still tell it apart.

        Only a message made from ``args`` is prefixed (a class with its own ``__str__``
        keeps its words), and only once.
        """
        text = str(self)
        if type(self).__str__ is BaseException.__str__ and not text.startswith(f"{where}: "):
            self.args = (f"{where}: {text}",)
        return self


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a text, at a place a person can find.

    ``line`` and ``col`` count from 1; ``col`` counts characters.
    """

    source: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}:{self.col}: {self.message}"


class ParseError(XenlabError, ValueError):
    """A text could not be parsed; ``problems`` lists every problem found, in order.

    ``str(err)`` is one ``source:line:col: message`` line per problem.  The
    first problem is also available as ``source``, ``line``, ``col`` and
    ``message`` for callers that only want one place.
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        if not problems:
            raise ValueError("ParseError needs at least one problem")
        self.problems: tuple[Problem, ...] = tuple(problems)
        first = self.problems[0]
        self.source = first.source
        self.line = first.line
        self.col = first.col
        self.message = first.message
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def at(cls, source: str, line: int, col: int, message: str) -> ParseError:
        """Build an error with a single problem."""
        return cls([Problem(source, line, col, message)])


class FormatError(XenlabError, ValueError):
    """Binary data is not in the format expected, at ``source+0xOFFSET``."""

    def __init__(self, source: str, offset: int, field: str, message: str) -> None:
        self.source = source
        self.offset = offset
        self.field = field
        self.detail = message
        super().__init__(f"{source}+{offset:#x}: {field}: {message}")


class TruncatedError(FormatError):
    """A field needs more bytes than the data has."""

    def __init__(self, source: str, offset: int, field: str, need: int, have: int) -> None:
        self.need = need
        self.have = have
        super().__init__(source, offset, field, f"needs {need} bytes, only {have} left")


class StateError(XenlabError):
    """An object is not in the state an operation requires."""


class UsageError(XenlabError, ValueError):
    """A value given to a command is refused (a name, a size, a format, a flag pair)."""


class NotRunnable(UsageError):
    """A config asks for what the backend cannot run; ``key`` names where (``disk xvdb``,
    ``vif 0``, ``vga``...), and the message says what instead."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


class NotFoundError(XenlabError, LookupError):
    """There is no ``kind`` (domain, snapshot, disk, vif, vCPU...) called ``name``."""

    def __init__(self, kind: str, name: str, message: str) -> None:
        self.kind = kind
        self.name = name
        super().__init__(message)


class ConflictError(StateError):
    """A ``kind`` called ``name`` exists already, or its name or id is taken."""

    def __init__(self, kind: str, name: str, message: str) -> None:
        self.kind = kind
        self.name = name
        super().__init__(message)


class BackendError(XenlabError):
    """An external backend (QEMU, QMP, netlink) failed; the cause is chained."""


class Refused(BackendError):
    """The hypervisor refused ``command``; ``reason`` is its own words (nothing changed)."""

    def __init__(self, command: str, reason: str, message: str) -> None:
        self.command = command
        self.reason = reason
        super().__init__(message)


class DeviceNotReleased(BackendError):
    """The guest did not let device ``device_id`` go within ``timeout`` seconds."""

    def __init__(self, device_id: str, timeout: float) -> None:
        self.device_id = device_id
        self.timeout = timeout
        super().__init__(f"the guest did not release device {device_id} within {timeout:g} s")


class SimError(XenlabError):
    """The simulator reached an impossible state, at a place in simulated time."""
