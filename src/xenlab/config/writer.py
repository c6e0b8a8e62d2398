"""The writer of the xl configuration language: :func:`format_config` and helpers.

A canonical file has one ``name = value`` line per key, in the order the keys
first appeared, with each key's effective value (``+=`` applied, the last
assignment winning), so ``parse(format_config(c)).effective() ==
c.effective()`` for every parsed ``c``.  Comments are not kept.

Strings are written in double quotes with only the escapes libxlutil decodes
the same way everywhere: ``\\\\ \\" \\n \\r \\t``; other characters are
written as they are (libxlutil's quoted strings take any byte but the quote,
the backslash and a newline).  A string that lexes as a NUMBER is written
bare.  A list is written on one line when it is short and flat, otherwise one
item per line with a trailing comma.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Final

from xenlab.config.errors import config_error
from xenlab.config.values import ConfigFile, Value

__all__ = ["format_config", "format_settings", "format_value", "quote"]

_NUMBER_RE: Final = re.compile(r"[0-9][0-9a-fx]*")
_NAME_RE: Final = re.compile(r"[a-z][._0-9a-z]*")
_ESCAPES: Final = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NEEDS_ESCAPE_RE: Final = re.compile(r'[\\"\n\r\t]')
_INLINE_WIDTH: Final = 72
_INDENT: Final = "    "
_MAX_INDENT: Final = 64


def quote(text: str) -> str:
    """Return ``text`` as a double-quoted xl string literal.

    :raise ConfigError: if ``text`` holds a NUL, which no xl string can carry.
    """
    if "\0" in text:
        raise config_error("<writer>", 1, text.index("\0") + 1, "a NUL cannot be written in xl")
    if _NEEDS_ESCAPE_RE.search(text):
        text = _NEEDS_ESCAPE_RE.sub(lambda m: _ESCAPES[m.group()], text)
    return f'"{text}"'


def _atom(text: str) -> str:
    return text if _NUMBER_RE.fullmatch(text) else quote(text)


def _inline(value: tuple[Value, ...], indent: str) -> str | None:
    """Return a flat, short list on one line, or None if it must be spread out."""
    if not all(isinstance(item, str) for item in value):
        return None
    text = "[ " + ", ".join(_atom(item) for item in value) + " ]"  # type: ignore[arg-type]
    return text if len(text) + len(indent) <= _INLINE_WIDTH else None


def format_value(value: Value, *, indent: str = "") -> str:
    """Return the xl text of one value; nested lines are indented from ``indent``.

    Iterative, so lists nested as deep as libxlutil accepts (thousands of
    levels) cannot exhaust Python's recursion limit.
    """
    if isinstance(value, str):
        return _atom(value)
    out: list[str] = []
    # Each frame: the list's remaining items, the indent of its items and of
    # its closing bracket.  Indentation stops growing past _MAX_INDENT so that
    # pathological nesting gives linear, not quadratic, output.
    stack: list[tuple[Iterator[Value], str, str]] = []

    def open_list(items: tuple[Value, ...], at: str) -> None:
        if not items:
            out.append("[]")
        elif (flat := _inline(items, at)) is not None:
            out.append(flat)
        else:
            out.append("[\n")
            inner = at + _INDENT if len(at) < _MAX_INDENT else at
            stack.append((iter(items), inner, at))

    open_list(value, indent)
    while stack:
        items, inner, outer = stack[-1]
        item = next(items, None)
        if item is None:
            stack.pop()
            out.append(f"{outer}]")
            if stack:
                out.append(",\n")
            continue
        out.append(inner)
        if isinstance(item, str):
            out.append(_atom(item) + ",\n")
        else:
            open_list(item, inner)
            if out[-1] != "[\n":
                out.append(",\n")
    return "".join(out)


def format_settings(items: Iterable[tuple[str, Value]]) -> str:
    """Return a file of ``name = value`` lines, one per item, in the given order.

    :raise ConfigError: if a name is not an xl identifier.
    """
    out: list[str] = []
    for name, value in items:
        if not _NAME_RE.fullmatch(name):
            raise config_error(
                "<writer>", len(out) + 1, 1, f"`{name}' is not an xl name ([a-z][._0-9a-z]*)"
            )
        out.append(f"{name} = {format_value(value)}\n")
    return "".join(out)


def format_config(config: ConfigFile) -> str:
    """Return the canonical text of a parsed file (effective values, first-seen order)."""
    return format_settings(config.effective().items())
