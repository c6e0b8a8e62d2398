"""Compression detection by magic and streaming decompression: ``detect`` and ``open_stream``.

``detect`` names the compression whose magic starts at ``offset`` (the table
of the kernel's ``decompress_method``, lib/decompress.c, compared on longer
magics); ``open_stream`` returns a ``DecompressedStream`` that decompresses
about ``chunk`` bytes of input at a time, never holds the whole output, and
sets ``compressed_end`` where the kernel's walk goes on.  One stream per
``open_stream`` (what follows is the caller's walk); LZ4 legacy is read as the
kernel reads it; LZO is detected, not decompressed.  Output is bounded by
``limit`` (``DEFAULT_LIMIT``, 1 GiB) and decoder memory by ``DECODER_MEMORY``
(128 MiB), both ``LimitError``; corrupt input is a ``FormatError`` at the
offset of the chunk at fault.  The design (the decoders, the kernel rules, the
limits and the errors) is in docs/formats.md, section Compression.
"""

from __future__ import annotations

import bz2
import enum
import io
import lzma
import struct
import zlib
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Protocol, cast

import lz4.block
import lz4.frame
import zstandard

from xenlab.errors import FormatError, TruncatedError
from xenlab.formats.buffer import Buffer, LimitError, as_bytes_buffer, size_text

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "DECODER_MEMORY",
    "DEFAULT_LIMIT",
    "Compression",
    "DecompressedStream",
    "LimitError",
    "detect",
    "open_stream",
]

# What one stream may decompress to unless the caller says otherwise: far more
# than any initramfs, far less than the gigabytes a few KB of zstd can claim.
DEFAULT_LIMIT = 1 << 30
# The most memory a decoder may use for its history (an lzma dictionary, a
# zstd window): zstd's own default cap, and twice what xz -9 needs.
DECODER_MEMORY = 128 << 20


class Compression(enum.Enum):
    """A compression format the kernel's initramfs unpacker knows (plus LZ4 frames)."""

    GZIP = "gzip"
    BZIP2 = "bzip2"
    LZMA = "lzma"
    XZ = "xz"
    LZO = "lzo"
    LZ4_LEGACY = "lz4-legacy"
    LZ4_FRAME = "lz4-frame"
    ZSTD = "zstd"

    @property
    def in_kernel_table(self) -> bool:
        """Whether the kernel's ``decompress_method`` recognises this format."""
        return self is not Compression.LZ4_FRAME


# (magic, format), longest first where one could be a prefix of another.
# 1f 9e is "old gzip" (pack): the kernel's table lists it under gzip, and its
# gunzip then rejects it; so does ours.
_MAGICS: tuple[tuple[bytes, Compression], ...] = (
    (bytes.fromhex("fd377a585a00"), Compression.XZ),
    (bytes.fromhex("894c5a4f"), Compression.LZO),
    (bytes.fromhex("02214c18"), Compression.LZ4_LEGACY),
    (bytes.fromhex("04224d18"), Compression.LZ4_FRAME),
    (bytes.fromhex("28b52ffd"), Compression.ZSTD),
    (b"BZh", Compression.BZIP2),
    (bytes.fromhex("5d0000"), Compression.LZMA),
    (bytes.fromhex("1f8b"), Compression.GZIP),
    (bytes.fromhex("1f9e"), Compression.GZIP),
)
_MAGIC_PEEK = max(len(m) for m, _ in _MAGICS)

# liblzma counts a little more than the dictionary (probability tables, the
# range decoder); the margin keeps a DECODER_MEMORY dictionary accepted.
_LZMA_MEMLIMIT = DECODER_MEMORY + (16 << 20)

_LZ4_LEGACY_MAGIC = 0x184C2102
# The legacy format does not record block sizes; the kernel (and lz4) use 8 MiB.
_LZ4_LEGACY_BLOCK = 8 << 20
_LZ4_LEGACY_BOUND = _LZ4_LEGACY_BLOCK + _LZ4_LEGACY_BLOCK // 255 + 16

# Exceptions the decompression libraries raise on bad data.  MemoryError is
# among them because a corrupt header can ask a library for a huge buffer.
_LIB_ERRORS: tuple[type[BaseException], ...] = (
    zlib.error,
    lzma.LZMAError,
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    MemoryError,
    zstandard.ZstdError,
    lz4.block.LZ4BlockError,
)


def detect(buf: Buffer, offset: int = 0) -> Compression | None:
    """Return the compression whose magic starts at ``offset``, or None."""
    buf = as_bytes_buffer(buf)
    head = bytes(buf[offset : offset + _MAGIC_PEEK])
    for magic, compression in _MAGICS:
        if head.startswith(magic):
            return compression
    return None


class _Decoder(Protocol):
    """One compressed stream being decoded; ``end`` is valid once ``eof``."""

    eof: bool
    end: int

    def step(self, max_out: int) -> bytes:
        """Return more output, at most about ``max_out`` bytes; ``b""`` only at the end."""
        ...


class _LibObject(Protocol):
    """The shape shared by bz2/lzma/lz4.frame decompressor objects."""

    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    @property
    def unused_data(self) -> bytes | None: ...

    def decompress(self, data: bytes | memoryview, max_length: int = -1) -> bytes: ...


class _LibDecoder:
    """bzip2, lzma, xz and LZ4 frames: a library object that takes ``max_length``."""

    def __init__(
        self,
        buf: Buffer,
        offset: int,
        name: str,
        make: Callable[[], _LibObject],
        source: str,
        chunk: int,
    ) -> None:
        self._buf = buf
        self._name = name
        self._obj = make()
        self._source = source
        self._chunk = chunk
        self._fed = offset  # input offset up to which the object has been fed
        self._last = offset  # start of the chunk fed last (for errors)
        self.eof = False
        self.end = offset

    def _pending(self) -> bytes | memoryview | None:
        """Input to feed again before new input (None: the object wants more)."""
        return None if self._obj.needs_input else b""

    def _unused(self) -> int:
        return len(self._obj.unused_data or b"")

    def step(self, max_out: int) -> bytes:
        obj = self._obj
        while True:
            if obj.eof:
                self.eof = True
                self.end = self._fed - self._unused()
                return b""
            data = self._pending()
            if data is None:
                if self._fed >= len(self._buf):
                    raise FormatError(
                        self._source,
                        len(self._buf),
                        self._name,
                        "the data ends before the end of the compressed stream",
                    )
                data = _slice(self._buf, self._fed, self._chunk)
                self._last = self._fed
                self._fed += len(data)
            try:
                out = obj.decompress(data, max_out)
            except lzma.LZMAError as err:
                # liblzma reports LZMA_MEMLIMIT_ERROR only through this text.
                if "Memory usage limit" in str(err):
                    raise LimitError(
                        self._source, self._last, self._name,
                        f"the stream needs more than {size_text(_LZMA_MEMLIMIT)} of decoder "
                        "memory (its dictionary); not decompressed",
                        _LZMA_MEMLIMIT,
                    ) from err
                raise _corrupt(self._source, self._name, self._last, self._fed, err) from err
            except _LIB_ERRORS as err:
                raise _corrupt(self._source, self._name, self._last, self._fed, err) from err
            if out:
                return out


class _GzipDecoder(_LibDecoder):
    """gzip through zlib, whose ``max_length`` leaves unread input in ``unconsumed_tail``.

    The kernel's gunzip stops after the member's 8-byte trailer and leaves
    what follows to the walk; so does zlib.  At the end, zlib copies the rest
    of the last input into ``unused_data`` (``unconsumed_tail`` may still hold
    the same bytes: not counted).
    """

    def __init__(self, buf: Buffer, offset: int, source: str, chunk: int) -> None:
        super().__init__(buf, offset, "gzip", _gzip_object, source, chunk)
        self._zobj = cast("zlib._Decompress", self._obj)

    def _pending(self) -> bytes | memoryview | None:
        return self._zobj.unconsumed_tail or None


def _gzip_object() -> _LibObject:
    # zlib's object has everything _LibObject needs but needs_input, which
    # _GzipDecoder does not ask for.
    return cast(_LibObject, zlib.decompressobj(wbits=16 + zlib.MAX_WBITS))


class _SliceReader:
    """A minimal file object over ``buf[start:end]`` that counts what was read."""

    def __init__(self, buf: Buffer, start: int, end: int) -> None:
        self._buf = buf
        self.pos = start
        self.last = start
        self._end = end

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self._end - self.pos
        data = bytes(self._buf[self.pos : min(self.pos + size, self._end)])
        self.last = self.pos
        self.pos += len(data)
        return data


class _ZstdDecoder:
    """One zstd frame, read through ``zstandard``'s bounded stream reader."""

    def __init__(self, buf: Buffer, offset: int, source: str, chunk: int) -> None:
        self._source = source
        self._frame_end = _zstd_frame_end(buf, offset, source)
        # Giving the reader exactly one frame means no input is read ahead
        # past it, so the frame's end is the stream's compressed end.
        self._src = _SliceReader(buf, offset, self._frame_end)
        # zstandard only calls read() on its source; the stub asks for IO[bytes].
        self._reader = zstandard.ZstdDecompressor(max_window_size=DECODER_MEMORY).stream_reader(
            cast("IO[bytes]", self._src), read_size=chunk, read_across_frames=False
        )
        self.eof = False
        self.end = offset

    def step(self, max_out: int) -> bytes:
        if self.eof:
            return b""
        try:
            out = self._reader.read(max_out)
        except _LIB_ERRORS as err:
            raise _corrupt(self._source, "zstd", self._src.last, self._src.pos, err) from err
        if not out:
            self.eof = True
            self.end = self._frame_end
        return out


def _zstd_frame_end(buf: Buffer, offset: int, source: str) -> int:
    """Walk a zstd frame's header and block headers (RFC 8878, 3.1.1) to its end."""
    n = len(buf)
    pos = offset + 4
    if pos >= n:
        raise TruncatedError(source, pos, "zstd frame header", 1, max(n - pos, 0))
    fhd = buf[pos]
    if fhd & 0x08:
        raise FormatError(
            source, pos, "zstd frame header", f"{fhd:#04x} has the reserved bit 3 set"
        )
    single_segment = (fhd >> 5) & 1
    did_size = (0, 1, 2, 4)[fhd & 3]  # dictionary id
    fcs_size = (single_segment, 2, 4, 8)[fhd >> 6]  # frame content size
    size = 1 + (0 if single_segment else 1) + did_size + fcs_size
    if pos + size > n:
        raise TruncatedError(source, pos, "zstd frame header", size, n - pos)
    if single_segment:
        # The window is the whole content (RFC 8878, 3.1.1.1.2); 2-byte sizes
        # count from 256.
        at = pos + 1 + did_size
        window = int.from_bytes(bytes(buf[at : at + fcs_size]), "little")
        window += 256 if fcs_size == 2 else 0
    else:
        descriptor = buf[pos + 1]
        base = 1 << (10 + (descriptor >> 3))
        window = base + (base >> 3) * (descriptor & 7)
    if window > DECODER_MEMORY:
        raise LimitError(
            source, offset, "zstd window",
            f"{window:#x} bytes, more than the {size_text(DECODER_MEMORY)} a decoder may use; "
            "not decompressed",
            DECODER_MEMORY,
        )
    pos += size
    while True:
        if pos + 3 > n:
            raise TruncatedError(source, pos, "zstd block header", 3, max(n - pos, 0))
        header = int.from_bytes(bytes(buf[pos : pos + 3]), "little")
        kind = (header >> 1) & 3
        if kind == 3:
            raise FormatError(
                source, pos, "zstd block header", "reserved block type 3, expected 0, 1 or 2"
            )
        content = 1 if kind == 1 else header >> 3  # an RLE block stores one byte
        if pos + 3 + content > n:
            raise TruncatedError(source, pos + 3, "zstd block", content, n - pos - 3)
        pos += 3 + content
        if header & 1:
            break
    if fhd & 0x04:
        if pos + 4 > n:
            raise TruncatedError(source, pos, "zstd checksum", 4, n - pos)
        pos += 4
    return pos


class _Lz4LegacyDecoder:
    """The LZ4 legacy format (``lz4 -l``), block by block, as lib/decompress_unlz4.c reads it."""

    def __init__(self, buf: Buffer, offset: int, source: str) -> None:
        self._buf = buf
        self._source = source
        self._pos = offset + 4
        self.eof = False
        self.end = offset

    def step(self, max_out: int) -> bytes:
        buf = self._buf
        n = len(buf)
        while not self.eof:
            pos = self._pos
            if n - pos < 4:
                self._finish(pos)
                break
            (size,) = struct.unpack("<I", bytes(buf[pos : pos + 4]))
            if size == _LZ4_LEGACY_MAGIC:
                self._pos = pos + 4
                continue
            if size == 0:
                self._finish(pos)
                break
            if size > _LZ4_LEGACY_BOUND:
                raise FormatError(
                    self._source,
                    pos,
                    "lz4 block size",
                    f"{size:#x}, expected at most {_LZ4_LEGACY_BOUND:#x} "
                    "(the bound for an 8 MiB block)",
                )
            if pos + 4 + size > n:
                raise TruncatedError(self._source, pos + 4, "lz4 block", size, n - pos - 4)
            block = memoryview(bytes(buf[pos + 4 : pos + 4 + size]))
            try:
                out: bytes = lz4.block.decompress(block, uncompressed_size=_LZ4_LEGACY_BLOCK)
            except _LIB_ERRORS as err:
                raise FormatError(
                    self._source, pos, "lz4 block", f"corrupt block of {size:#x} bytes: {err}"
                ) from err
            self._pos = pos + 4 + size
            if out:
                return out
        return b""

    def _finish(self, pos: int) -> None:
        self.eof = True
        self.end = pos


def _slice(buf: Buffer, start: int, size: int) -> bytes | memoryview:
    """A slice to feed a decompressor: a view where the buffer type allows one."""
    piece = buf[start : start + size]
    return piece if isinstance(piece, (bytes, memoryview)) else bytes(piece)


def _corrupt(source: str, name: str, start: int, stop: int, err: BaseException) -> FormatError:
    detail = str(err) or type(err).__name__
    return FormatError(
        source,
        start,
        name,
        f"corrupt compressed data in the input {start:#x}..{stop:#x}: {detail}",
    )


class DecompressedStream(io.RawIOBase):
    """A readable stream of one decompressed stream found in a buffer.

    Reads return the size asked for, fewer bytes only at the end; apart from
    what a read returns, memory stays bounded by about
    ``chunk`` bytes of input and output (8 MiB for LZ4 legacy blocks) plus
    the decoder's history (at most ``DECODER_MEMORY``), whatever the size of
    the output.  ``compressed_end`` is None until the end of the stream has
    been read, then the offset in the buffer just past the compressed stream.
    Reading raises ``FormatError`` on corrupt or truncated input, and
    ``LimitError`` once the decoder would produce more than ``limit`` bytes
    (None: no limit).  ``decompressed`` is how many bytes the decoder has
    produced, read or not.
    """

    def __init__(
        self,
        buf: Buffer,
        offset: int,
        compression: Compression,
        decoder: _Decoder,
        *,
        source: str,
        chunk: int,
        limit: int | None = DEFAULT_LIMIT,
    ) -> None:
        super().__init__()
        self.compression = compression
        self.offset = offset
        self.source = source
        self.limit = limit
        self.compressed_end: int | None = None
        self.decompressed = 0
        self._over: LimitError | None = None
        self._decoder: _Decoder | None = decoder
        self._chunk = chunk
        self._pending = b""
        self._ppos = 0
        self._position = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        """The number of decompressed bytes read so far."""
        return self._position

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view) and (data := self._take(len(view) - filled)):
            view[filled : filled + len(data)] = data
            filled += len(data)
        return filled

    def read(self, size: int | None = -1, /) -> bytes:
        """Read ``size`` bytes (fewer only at the end), or everything left if negative."""
        if size is None or size < 0:
            return self.readall()
        data = self._take(size)
        if len(data) == size or not data:
            return data
        parts = [data]
        left = size - len(data)
        while left and (data := self._take(left)):
            parts.append(data)
            left -= len(data)
        return b"".join(parts)

    def readall(self) -> bytes:
        parts = []
        while data := self._take(self._chunk):
            parts.append(data)
        return b"".join(parts)

    def _take(self, size: int) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed stream")
        if size <= 0:
            return b""
        while self._ppos >= len(self._pending):
            if self._over is not None:
                raise self._over
            decoder = self._decoder
            if decoder is None:
                return b""
            self._pending = b""  # let the spent output go before making more
            out = decoder.step(self._next_size())
            self.decompressed += len(out)
            if self.limit is not None and self.decompressed > self.limit:
                # The output up to the limit is still handed out; after it,
                # every read fails the same way: a stream over its limit must
                # not look like one that ended.
                out = out[: len(out) - (self.decompressed - self.limit)]
                self._decoder = None
                self._over = LimitError(
                    self.source, self.offset, self.compression.value,
                    f"decompresses to more than {size_text(self.limit)} (the limit); "
                    f"stopped after {self.limit:#x} bytes of output",
                    self.limit,
                )
                if not out:
                    raise self._over
            if not out:
                self.compressed_end = decoder.end
                self._decoder = None
                self._pending = b""
                self._ppos = 0
                return b""
            self._pending = out
            self._ppos = 0
        start = self._ppos
        if start == 0 and size >= len(self._pending):
            data = self._pending
        else:
            data = self._pending[start : start + size]
        self._ppos = start + len(data)
        self._position += len(data)
        return data

    def _next_size(self) -> int:
        """How much output to ask the decoder for: a chunk, or one byte past the limit."""
        if self.limit is None:
            return self._chunk
        return max(1, min(self._chunk, self.limit - self.decompressed + 1))

    def close(self) -> None:
        self._decoder = None
        self._pending = b""
        super().close()


def open_stream(
    buf: Buffer,
    offset: int,
    compression: Compression,
    source: str = "<data>",
    chunk: int = 1 << 20,
    *,
    limit: int | None = DEFAULT_LIMIT,
) -> DecompressedStream:
    """Open the compressed stream at ``offset`` for streaming reads of at most ``limit`` bytes.

    :raise FormatError: the magic at ``offset`` is not ``compression``'s, or
        the format is LZO (not supported); corrupt data is reported by reads.
    :raise LimitError: the header asks for a decoder history (lzma
        dictionary, zstd window) over ``DECODER_MEMORY``; output past
        ``limit`` is reported by reads.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must not be negative, not {limit}")
    buf = as_bytes_buffer(buf)
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, not {chunk}")
    found = detect(buf, offset)
    if found is not compression:
        head = bytes(buf[offset : offset + 6])
        raise FormatError(
            source,
            offset,
            "magic",
            f"{head.hex(' ')} is {found.value if found else 'no known'} magic, "
            f"expected {compression.value}'s",
        )
    decoder: _Decoder
    if compression is Compression.GZIP:
        decoder = _GzipDecoder(buf, offset, source, chunk)
    elif compression is Compression.BZIP2:
        decoder = _LibDecoder(buf, offset, "bzip2", bz2.BZ2Decompressor, source, chunk)
    elif compression is Compression.LZMA:
        _check_lzma_dictionary(buf, offset, source)
        decoder = _LibDecoder(buf, offset, "lzma", _lzma_alone, source, chunk)
    elif compression is Compression.XZ:
        decoder = _LibDecoder(buf, offset, "xz", _lzma_xz, source, chunk)
    elif compression is Compression.LZ4_FRAME:
        decoder = _LibDecoder(
            buf, offset, "lz4 frame", lz4.frame.LZ4FrameDecompressor, source, chunk
        )
    elif compression is Compression.LZ4_LEGACY:
        decoder = _Lz4LegacyDecoder(buf, offset, source)
    elif compression is Compression.ZSTD:
        decoder = _ZstdDecoder(buf, offset, source, chunk)
    else:
        raise FormatError(
            source,
            offset,
            "lzo",
            "lzo-compressed data is not supported (no LZO library is a dependency)",
        )
    return DecompressedStream(
        buf, offset, compression, decoder, source=source, chunk=chunk, limit=limit
    )


def _check_lzma_dictionary(buf: Buffer, offset: int, source: str) -> None:
    """Refuse an .lzma header whose dictionary (le32 at +1) is over ``DECODER_MEMORY``.

    liblzma would refuse it too (memlimit), but only once fed; this names the field.
    """
    raw = bytes(buf[offset + 1 : offset + 5])
    if len(raw) == 4 and (dict_size := int.from_bytes(raw, "little")) > DECODER_MEMORY:
        raise LimitError(
            source, offset + 1, "lzma dictionary",
            f"{dict_size:#x} bytes, more than the {size_text(DECODER_MEMORY)} a decoder may "
            "use; not decompressed",
            DECODER_MEMORY,
        )


def _lzma_alone() -> lzma.LZMADecompressor:
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=_LZMA_MEMLIMIT)


def _lzma_xz() -> lzma.LZMADecompressor:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_LZMA_MEMLIMIT)
