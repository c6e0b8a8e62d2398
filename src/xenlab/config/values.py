"""The values of the xl configuration language: Value, Setting, ConfigFile.

A parsed file is the list of its statements in file order (``settings``).
libxlutil keeps every statement too and answers a lookup with the last one of
that name, so :meth:`ConfigFile.get` does the same.  ``+=`` is applied at parse
time, exactly as libxlutil does: the statement's value is the concatenation of
the previous effective value and the right-hand side.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

#: A value is a string (numbers are kept as their text) or a list of values.
Value = str | tuple["Value", ...]


class Op(enum.Enum):
    """The operator of a statement."""

    ASSIGN = "="
    ADD = "+="


@dataclass(frozen=True, slots=True)
class Setting:
    """One statement ``name op value``.

    ``value`` is the effective value after ``+=`` was applied.  ``line`` is the
    line of the value's first token (what libxlutil records); ``col`` is its
    column.  ``name_line``/``name_col`` place the identifier.
    """

    name: str
    op: Op
    value: Value
    line: int
    col: int
    name_line: int
    name_col: int


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """A parsed xl configuration file: every statement, in file order."""

    source: str
    settings: tuple[Setting, ...]

    def get(self, name: str) -> Setting | None:
        """Return the last statement that sets ``name`` (libxlutil's lookup), or None."""
        for setting in reversed(self.settings):
            if setting.name == name:
                return setting
        return None

    def names(self) -> Iterator[str]:
        """Yield each name once, in the order of first appearance."""
        seen: set[str] = set()
        for setting in self.settings:
            if setting.name not in seen:
                seen.add(setting.name)
                yield setting.name

    def effective(self) -> dict[str, Value]:
        """Map each name to its effective value (last assignment wins, ``+=`` applied)."""
        result: dict[str, Value] = {}
        for setting in self.settings:
            result[setting.name] = setting.value
        # Keep first-appearance order: a re-assigned key does not move.
        return {name: result[name] for name in self.names()}

    def latest(self) -> dict[str, Setting]:
        """Map each name to its effective statement, in first-appearance order."""
        result: dict[str, Setting] = {}
        for setting in self.settings:
            result[setting.name] = setting
        return {name: result[name] for name in self.names()}


def value_to_json(value: Value) -> str | list[object]:
    """Return a value as JSON-ready data: strings stay, tuples become lists.

    Iterative, so the deepest lists libxlutil accepts convert too.
    """
    if isinstance(value, str):
        return value
    root: list[object] = []
    stack: list[tuple[Iterator[Value], list[object]]] = [(iter(value), root)]
    while stack:
        items, out = stack[-1]
        item = next(items, None)
        if item is None:
            stack.pop()
        elif isinstance(item, str):
            out.append(item)
        else:
            child: list[object] = []
            out.append(child)
            stack.append((iter(item), child))
    return root
