"""Reading files a user names, with a bound: :func:`read_bounded`.

A path on a command line may be ``/dev/zero``, a FIFO, ``/proc/kcore`` or a
10 GB log: xenlab never reads "the whole file" without a limit.  Readers ask
for at most ``limit + 1`` bytes and refuse with :class:`InputTooLargeError`
(naming the file and the limit) when there is more, so memory and time stay
bounded whatever the file is.  Text files (configs, scenarios) have small
limits; binary inputs that can be large are read by their own modules with
mmap or streams, each with its own budget.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from xenlab.errors import XenlabError

__all__ = ["CONFIG_LIMIT", "InputTooLargeError", "read_bounded", "read_text_bounded"]

# An xl config, a scenario, an xm file: real ones are a few KB; 16 MiB leaves
# room for generated ones and is still nothing to hold in memory.
CONFIG_LIMIT: Final = 16 << 20
_CHUNK: Final = 1 << 20


class InputTooLargeError(XenlabError):
    """A file holds more than a reader takes; ``path`` and ``limit`` (bytes) say which."""

    def __init__(self, path: str, limit: int, what: str = "file") -> None:
        self.path = path
        self.limit = limit
        super().__init__(f"{path}: {what} larger than {_size(limit)}: not read")


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def read_bounded(path: str | Path, limit: int, *, what: str = "file") -> bytes:
    """At most ``limit`` bytes of ``path``; :class:`InputTooLargeError` when there is more.

    Directories and unreadable paths are :class:`XenlabError` naming the path.
    """
    name = str(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise XenlabError(f"{name}: cannot read: {err.strerror or err}") from err
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise XenlabError(f"{name}: is a directory")
        # One buffer, grown as data comes: the peak stays near the limit
        # (a list of chunks joined at the end would need twice that).
        buf = bytearray()
        while len(buf) <= limit:
            try:
                chunk = os.read(fd, min(_CHUNK, limit + 1 - len(buf)))
            except OSError as err:
                raise XenlabError(f"{name}: cannot read: {err.strerror or err}") from err
            if not chunk:
                break
            buf += chunk
        if len(buf) > limit:
            raise InputTooLargeError(name, limit, what)
        return bytes(buf)
    finally:
        os.close(fd)


def read_text_bounded(path: str | Path, limit: int = CONFIG_LIMIT, *,
                      what: str = "file") -> str:
    """:func:`read_bounded` as text: UTF-8, undecodable bytes kept as surrogates."""
    return read_bounded(path, limit, what=what).decode("utf-8", "surrogateescape")
