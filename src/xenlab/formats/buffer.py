"""The ``Buffer`` type every reader in ``xenlab.formats`` takes, helpers on it, and ``LimitError``.

A buffer is anything that holds bytes in memory and can be sliced:
``bytes``, ``bytearray``, a one-dimensional byte ``memoryview`` or an
``mmap``.  Slicing any of them with ``buf[a:b]`` yields something ``bytes()``
accepts, so readers copy only the small pieces they decode (a header, a
name), never the whole buffer.

Readers never let a field of the data decide how much they allocate or how
long they work beyond a bound proportional to the data itself: where a
format allows more (a decompressed stream, a count of table entries, a
recover-mode search over overlapping candidates), they stop at a limit and
raise ``LimitError``, which names the place and the limit.
"""

from __future__ import annotations

import mmap
from typing import TypeAlias

from xenlab.errors import FormatError, TruncatedError

Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap



class LimitError(FormatError):
    """Reading stopped at ``source+0xOFFSET`` because a limit was reached; ``limit`` is it.

    The data need not be broken: it asks for more memory or work than a
    reader spends on it (a decompression bomb, a table with a million
    entries).  It is a ``FormatError`` so that every caller that stops at bad
    data stops here too; callers that can go on (the microcode scan) catch it
    first and report what they skipped.
    """

    def __init__(self, source: str, offset: int, field: str, message: str, limit: int) -> None:
        self.limit = limit
        super().__init__(source, offset, field, message)


# How much ``skip_zeros`` copies at a time: big enough that the loop runs in C,
# small enough to stay in cache.
_ZERO_SCAN_CHUNK = 1 << 16


def size_text(n: int) -> str:
    """``n`` bytes as a person reads it: ``"1 GiB"``, ``"32 MiB"``, ``"4096 bytes"``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


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
