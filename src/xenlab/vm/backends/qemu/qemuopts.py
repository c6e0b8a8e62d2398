"""QEMU option strings: :func:`qemu_opts`, :func:`qemu_json`, :func:`qemu_arg`, checked values.

The one way a value reaches QEMU's command line (and QMP's ``key=value``
fallback).  QEMU reads ``-name``, ``-vnc``, ``-chardev``, ``-numa``... as
``key=value,...``: a comma ends a value, ``,,`` is a comma inside one, and a
bare first part is the implied key (a path with ``=`` would split).
:func:`qemu_opts` builds every such string from (key, value) pairs, keys
spelled out, values doubled by :func:`qemu_opt_value`.  ``-blockdev``,
``-device`` and ``-netdev`` are JSON (:func:`qemu_json`): no escaping; only a
value that is not UTF-8 (raw file-name bytes, which QEMU's JSON parser
refuses) falls back to ``key=value``.  Plain arguments (``-kernel``,
``-append``...) are never split (:func:`qemu_arg`).  :class:`QemuOptionError`
names the key of a NUL (C strings end there), a control character (no path,
name or address needs one; QEMU's log, HMP answers and ``ps`` are read by
lines; ``-append`` takes them) or an unencodable character.  Pure: strings in,
strings out.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Final

from xenlab.errors import XenlabError

__all__ = ["QemuOptionError", "qemu_arg", "qemu_json", "qemu_opt_value", "qemu_opts"]


class QemuOptionError(XenlabError):
    """A value cannot go on QEMU's command line; ``key`` names the xl key (or the path's role)."""

    def __init__(self, key: str, value: str, reason: str) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        super().__init__(f"{key}: {value!r} {reason}")


_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_OPT_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def qemu_arg(value: str | os.PathLike[str], *, key: str, controls: bool = False) -> str:
    """``value`` as a plain argv element (``-kernel``, ``-append``...), checked (module notes).

    ``controls`` lets control characters other than NUL through (``-append``).

    :raise QemuOptionError: a NUL, a control character, or text no file name
        can encode (a lone surrogate that is not an undecodable byte).
    """
    text = os.fspath(value)
    if "\0" in text:
        raise QemuOptionError(key, text, "contains a NUL byte: QEMU would see the value cut there")
    bad = None if controls else _CONTROL.search(text)
    if bad is not None:
        raise QemuOptionError(key, text, f"contains the control character {bad.group()!r}, "
                              "which QEMU's command line does not take here")
    try:
        os.fsencode(text)
    except UnicodeEncodeError as err:
        raise QemuOptionError(key, text, "holds characters that cannot be encoded") from err
    return text


def _text(value: object, key: str) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return qemu_arg(value if isinstance(value, os.PathLike) else str(value), key=key)


def qemu_opt_value(value: object, *, key: str) -> str:
    """``value`` as one value inside a QEMU ``key=value,...`` string: commas doubled.

    Booleans are ``on``/``off``; other values are checked as :func:`qemu_arg`.
    """
    return _text(value, key).replace(",", ",,")


def qemu_opts(pairs: Iterable[tuple[str, object]], *, key: str) -> str:
    """The one way a ``key=value,...`` option string is made: ``path=/a,,b,server=on``.

    Every key is spelled out (no implied first key, which a value with ``=``
    would break) and every value goes through :func:`qemu_opt_value`; ``key``
    names the xl key in errors.
    """
    parts = []
    for name, value in pairs:
        if not _OPT_NAME.fullmatch(name):
            raise QemuOptionError(key, name, "is not a QEMU option name")
        parts.append(f"{name}={qemu_opt_value(value, key=key)}")
    return ",".join(parts)


def qemu_json(opts: Mapping[str, object], *, key: str) -> str:
    """``opts`` as the JSON QEMU takes for ``-blockdev``, ``-device`` and ``-netdev``.

    Strings are checked as :func:`qemu_arg`.  QEMU's JSON parser takes UTF-8
    only: when a value carries other bytes (surrogate-escaped), the option
    is made by :func:`qemu_opts` instead, which passes bytes through.
    """
    for value in opts.values():
        if isinstance(value, str):
            qemu_arg(value, key=key)
    text = json.dumps(dict(opts), ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return qemu_opts(opts.items(), key=key)
    return text
