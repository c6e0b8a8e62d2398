"""The ``Buffer`` type every reader in ``xenlab.formats`` takes, and helpers on it.

A buffer is anything that holds bytes in memory and can be sliced:
``bytes``, ``bytearray``, a one-dimensional byte ``memoryview`` or an
``mmap``.  Slicing any of them with ``buf[a:b]`` yields something ``bytes()``
accepts, so readers copy only the small pieces they decode (a header, a
name), never the whole buffer.
"""

from __future__ import annotations

import mmap
from typing import TypeAlias

from xenlab.errors import TruncatedError

Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap

# How much ``skip_zeros`` copies at a time: big enough that the loop runs in C,
# small enough to stay in cache.
_ZERO_SCAN_CHUNK = 1 << 16


def as_bytes_buffer(buf: Buffer) -> Buffer:
    """Return ``buf``, or a flat byte view of it if it is a memoryview of another shape.

    ``memoryview(array('I', ...))`` indexes and measures items, not bytes;
    every reader calls this first so offsets always count bytes.
    """
    if isinstance(buf, memoryview) and (buf.ndim != 1 or buf.format != "B"):
        return buf.cast("B")
    return buf


def skip_zeros(buf: Buffer, start: int, end: int | None = None) -> int:
    """Return the offset of the first non-NUL byte in ``buf[start:end]``, or ``end``."""
    stop = len(buf) if end is None else min(end, len(buf))
    pos = start
    while pos < stop:
        chunk = bytes(buf[pos : min(pos + _ZERO_SCAN_CHUNK, stop)])
        rest = chunk.lstrip(b"\0")
        if rest:
            return pos + len(chunk) - len(rest)
        pos += len(chunk)
    return max(stop, start)


def require(buf: Buffer, offset: int, need: int, field: str, source: str) -> None:
    """Raise ``TruncatedError`` unless ``buf`` holds ``need`` bytes at ``offset``."""
    have = len(buf) - offset
    if have < need:
        raise TruncatedError(source, offset, field, need, max(have, 0))
