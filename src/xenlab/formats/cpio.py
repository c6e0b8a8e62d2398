"""cpio archives as the kernel reads them: ``iter_archive`` walks one archive in a buffer.

Also ``read_entry``, ``next_segment`` (the kernel's top-level initramfs walk),
``iter_stream``, ``find_early`` (the early loader's lookup),
``cpio_checksum``, ``safe_member_path`` and the newc writer ``write_newc``.
The readers read newc, crc and odc and follow the kernel's rules
(init/initramfs.c, lib/earlycpio.c, Xen's xen/lib/earlycpio.c): alignment from
the archive's start, NULs skipped at the top level, a name up to its first
NUL, an entry whose namesize is over ``PATH_MAX`` skipped (``name_too_long``).
Errors name the offset of the field at fault.  A buffer walk copies at most a
header and ``PATH_MAX`` bytes per entry, and ``iter_stream`` holds only the
data ``want`` asks for.  The design (the formats, the kernel rules, the errors
and the bounds) is in docs/formats.md, section cpio.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Protocol

import numpy as np

from xenlab.errors import FormatError, TruncatedError
from xenlab.formats.buffer import Buffer, as_bytes_buffer, require, skip_zeros
from xenlab.formats.compress import Compression, detect

__all__ = [
    "PATH_MAX",
    "TRAILER",
    "CpioEntry",
    "CpioFormat",
    "CpioMember",
    "ReadableStream",
    "Segment",
    "SegmentKind",
    "cpio_checksum",
    "entry_data",
    "find_early",
    "iter_archive",
    "iter_stream",
    "next_segment",
    "read_entry",
    "safe_member_path",
    "write_newc",
]

TRAILER = "TRAILER!!!"
# Linux's PATH_MAX, which init/initramfs.c compares namesize with.
PATH_MAX = 4096

S_IFMT = 0o170000
S_IFREG = 0o100000
S_IFDIR = 0o040000
S_IFLNK = 0o120000


class CpioFormat(enum.Enum):
    """The three cpio header formats, by magic."""

    NEWC = "070701"
    CRC = "070702"
    ODC = "070707"


NEWC_HEADER_SIZE = 110
ODC_HEADER_SIZE = 76
MAGIC_SIZE = 6

_NEWC_FIELDS = (
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
)
_NEWC_NAMESIZE_AT = MAGIC_SIZE + 8 * _NEWC_FIELDS.index("namesize")
_NEWC_STRUCT = struct.Struct(">13I")

# (name, start, width) in the odc header.
_ODC_FIELDS = (
    ("dev", 6, 6),
    ("ino", 12, 6),
    ("mode", 18, 6),
    ("uid", 24, 6),
    ("gid", 30, 6),
    ("nlink", 36, 6),
    ("rdev", 42, 6),
    ("mtime", 48, 11),
    ("namesize", 59, 6),
    ("filesize", 65, 11),
)
_ODC_NAMESIZE_AT = 59

_HEX = b"0123456789abcdefABCDEF"
_OCT = b"01234567"
_MAGICS = {f.value.encode(): f for f in CpioFormat}
_EXPECTED_MAGIC = "b'070701', b'070702' or b'070707'"

# How much iter_stream reads at a time when it skips data or looks for headers.
_STREAM_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One cpio header with its name, and where its data and the next header are.

    Offsets are in the buffer (or stream positions, from ``iter_stream``).
    For odc, ``dev`` and ``rdev`` are in ``devmajor`` and ``rdevmajor`` and
    the minors are 0.  ``check`` is the crc format's data checksum, not
    verified here (compare ``cpio_checksum`` of the data), and 0 otherwise.
    ``namesize`` is the header's field; over ``PATH_MAX`` the kernel skips
    the entry (``name_too_long``) and ``name`` is only its first bytes.
    """

    format: CpioFormat
    offset: int
    name: str
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    ino: int
    devmajor: int
    devminor: int
    rdevmajor: int
    rdevminor: int
    filesize: int
    check: int
    data_offset: int
    end: int
    namesize: int

    @property
    def name_too_long(self) -> bool:
        """namesize is over ``PATH_MAX``: the kernel's unpacker skips this entry."""
        return self.namesize > PATH_MAX

    @property
    def is_regular(self) -> bool:
        """A regular file (the early loader's test)."""
        return self.mode & S_IFMT == S_IFREG

    @property
    def is_dir(self) -> bool:
        """A directory."""
        return self.mode & S_IFMT == S_IFDIR

    @property
    def is_symlink(self) -> bool:
        """A symbolic link; its data is the target."""
        return self.mode & S_IFMT == S_IFLNK

    @property
    def is_trailer(self) -> bool:
        """The entry that ends an archive (one with a name too long is skipped, never one)."""
        return self.name == TRAILER and not self.name_too_long


@dataclass(frozen=True, slots=True)
class _Header:
    """A decoded header before its name is read."""

    format: CpioFormat
    offset: int
    size: int
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    filesize: int
    devmajor: int
    devminor: int
    rdevmajor: int
    rdevminor: int
    namesize: int
    check: int

    def data_offset(self) -> int:
        rel = self.size + self.namesize
        if self.format is not CpioFormat.ODC:
            rel = _align4(rel)
        return self.offset + rel

    def end(self) -> int:
        rel = self.data_offset() - self.offset + self.filesize
        if self.format is not CpioFormat.ODC:
            rel = _align4(rel)
        return self.offset + rel

    def entry(self, name: str) -> CpioEntry:
        return CpioEntry(
            format=self.format,
            offset=self.offset,
            name=name,
            mode=self.mode,
            uid=self.uid,
            gid=self.gid,
            nlink=self.nlink,
            mtime=self.mtime,
            ino=self.ino,
            devmajor=self.devmajor,
            devminor=self.devminor,
            rdevmajor=self.rdevmajor,
            rdevminor=self.rdevminor,
            filesize=self.filesize,
            check=self.check,
            data_offset=self.data_offset(),
            end=self.end(),
            namesize=self.namesize,
        )


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _header_size(magic: bytes, offset: int, source: str) -> tuple[CpioFormat, int]:
    fmt = _MAGICS.get(magic)
    if fmt is None:
        raise FormatError(source, offset, "magic", f"{magic!r}, expected {_EXPECTED_MAGIC}")
    return fmt, ODC_HEADER_SIZE if fmt is CpioFormat.ODC else NEWC_HEADER_SIZE


def _check_digits(
    hdr: bytes, start: int, width: int, field: str, allowed: bytes, kind: str,
    offset: int, source: str,
) -> None:
    """Raise at the first byte of ``hdr[start:start+width]`` not in ``allowed``."""
    text = hdr[start : start + width]
    bad = text.translate(None, allowed)
    if bad:
        raise FormatError(
            source,
            offset + start + text.index(bad[0]),
            field,
            f"{text!r} has a non-{kind} digit {bad[:1]!r}, expected {width} {kind} digits",
        )


def _decode_header(fmt: CpioFormat, hdr: bytes, offset: int, source: str) -> _Header:
    """Decode a whole header (magic included) whose format is known."""
    if fmt is CpioFormat.ODC:
        return _decode_odc(hdr, offset, source)
    digits = hdr[MAGIC_SIZE:NEWC_HEADER_SIZE]
    if digits.translate(None, _HEX):
        # Only on the error path: find the field.  int(x, 16) alone would
        # accept "0x", "+", "_" and spaces, hence the check above.
        for i, field in enumerate(_NEWC_FIELDS):
            _check_digits(hdr, MAGIC_SIZE + 8 * i, 8, field, _HEX, "hex", offset, source)
    v = _NEWC_STRUCT.unpack(bytes.fromhex(digits.decode("ascii")))
    if v[11] == 0:
        raise FormatError(
            source,
            offset + _NEWC_NAMESIZE_AT,
            "namesize",
            "0, expected at least 1 (the name's NUL)",
        )
    return _Header(
        fmt, offset, NEWC_HEADER_SIZE,
        ino=v[0], mode=v[1], uid=v[2], gid=v[3], nlink=v[4], mtime=v[5], filesize=v[6],
        devmajor=v[7], devminor=v[8], rdevmajor=v[9], rdevminor=v[10], namesize=v[11],
        check=v[12] if fmt is CpioFormat.CRC else 0,
    )  # fmt: skip


def _decode_odc(hdr: bytes, offset: int, source: str) -> _Header:
    values = []
    for field, start, width in _ODC_FIELDS:
        _check_digits(hdr, start, width, field, _OCT, "octal", offset, source)
        values.append(int(hdr[start : start + width], 8))
    dev, ino, mode, uid, gid, nlink, rdev, mtime, namesize, filesize = values
    if namesize == 0:
        raise FormatError(
            source,
            offset + _ODC_NAMESIZE_AT,
            "namesize",
            "0, expected at least 1 (the name's NUL)",
        )
    return _Header(
        CpioFormat.ODC, offset, ODC_HEADER_SIZE,
        ino=ino, mode=mode, uid=uid, gid=gid, nlink=nlink, mtime=mtime, filesize=filesize,
        devmajor=dev, devminor=0, rdevmajor=rdev, rdevminor=0, namesize=namesize, check=0,
    )  # fmt: skip


def _decode_name(raw: bytes, offset: int, source: str, namesize: int) -> str:
    """The name: bytes up to the first NUL; the last byte must be a NUL.

    ``raw`` is the whole name, or its first ``PATH_MAX`` bytes when
    ``namesize`` is larger: the kernel skips such an entry without reading
    its name, so there is nothing to check, only something to show.
    """
    if namesize > PATH_MAX:
        return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if raw[-1] != 0:
        raise FormatError(
            source,
            offset + len(raw) - 1,
            "name",
            f"{raw[-1:]!r} ends the name, expected a NUL (namesize counts it)",
        )
    return raw[: raw.index(0)].decode("utf-8", "surrogateescape")


def read_entry(buf: Buffer, offset: int = 0, source: str = "<data>") -> CpioEntry:
    """Read the header and name at ``offset``; the data must be in ``buf`` too.

    :raise FormatError: bad magic, a non-digit in a field, namesize 0, a name
        that is not NUL-terminated.
    :raise TruncatedError: the header, name (``namesize``) or data with its
        padding (``filesize``) runs past the end of ``buf``.
    """
    buf = as_bytes_buffer(buf)
    return _read_entry(buf, offset, source)


def _read_entry(buf: Buffer, offset: int, source: str) -> CpioEntry:
    n = len(buf)
    require(buf, offset, MAGIC_SIZE, "magic", source)
    fmt, size = _header_size(bytes(buf[offset : offset + MAGIC_SIZE]), offset, source)
    require(buf, offset, size, "header", source)
    head = _decode_header(fmt, bytes(buf[offset : offset + size]), offset, source)
    name_at = offset + size
    data_at = head.data_offset()
    if data_at > n:
        raise TruncatedError(source, name_at, "namesize", data_at - name_at, n - name_at)
    end = head.end()
    if end > n:
        raise TruncatedError(source, data_at, "filesize", end - data_at, n - data_at)
    raw = bytes(buf[name_at : name_at + min(head.namesize, PATH_MAX)])
    return head.entry(_decode_name(raw, name_at, source, head.namesize))


def iter_archive(buf: Buffer, offset: int = 0, source: str = "<data>") -> Iterator[CpioEntry]:
    """Yield the entries of the archive at ``offset``, up to and including its trailer.

    :raise FormatError: as ``read_entry``.
    :raise TruncatedError: the data ends before the trailer (field ``trailer``
        when it ends between entries).
    """
    buf = as_bytes_buffer(buf)
    n = len(buf)
    while True:
        if offset >= n:
            raise TruncatedError(source, offset, "trailer", MAGIC_SIZE, 0)
        entry = _read_entry(buf, offset, source)
        yield entry
        if entry.is_trailer:
            return
        offset = entry.end


def entry_data(buf: Buffer, entry: CpioEntry) -> memoryview:
    """A view of an entry's data in the buffer it was read from (no copy)."""
    return memoryview(as_bytes_buffer(buf))[entry.data_offset : entry.data_offset + entry.filesize]


def cpio_checksum(data: Buffer) -> int:
    """The crc format's checksum: the sum of the data's bytes, mod 2**32."""
    data = as_bytes_buffer(data)
    if len(data) == 0:
        return 0
    # A uint64 sum cannot overflow below 2**56 bytes.
    return int(np.frombuffer(data, dtype=np.uint8).sum(dtype=np.uint64)) & 0xFFFFFFFF


def safe_member_path(name: str) -> PurePosixPath | None:
    """The relative path to extract ``name`` to, or None if it must not be written.

    None for empty names, names with a NUL, absolute names, names with a
    ``..`` component, and names that are only the archive's root (``.``),
    so that joining the result to a target directory stays inside it.
    """
    if not name or "\0" in name or name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return PurePosixPath(*parts)


# ---------------------------------------------------------------- the kernel's walk


class SegmentKind(enum.Enum):
    """What the kernel's initramfs walk finds at an offset."""

    CPIO = "cpio"
    PADDING = "padding"
    COMPRESSED = "compressed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of an initramfs: ``buf[offset:end]``, of one kind.

    ``end`` is None for a compressed stream (only decompression finds its
    end: see ``compress.open_stream(...).compressed_end``).  ``entries`` are
    a cpio segment's entries, trailer included when there is one.
    """

    kind: SegmentKind
    offset: int
    end: int | None
    compression: Compression | None
    entries: tuple[CpioEntry, ...]


def next_segment(buf: Buffer, offset: int, source: str = "<data>") -> Segment | None:
    """Return what the kernel's ``unpack_to_rootfs`` finds at ``offset``; None at the end.

    - ``0`` at a 4-byte aligned offset: an uncompressed archive, read up to
      its trailer.  As in the kernel, an archive may also end without a
      trailer where the next entry would start with something other than
      ``0`` (NULs, compressed data) or where the buffer ends.
    - NULs: padding, up to the next non-NUL byte.
    - a compression magic: a compressed stream (end None).
    - anything else (including ``0`` at an unaligned offset): unknown, to the
      end of the buffer; the kernel stops there with an error.

    :raise FormatError: a broken archive (as ``read_entry``).
    """
    buf = as_bytes_buffer(buf)
    n = len(buf)
    if offset >= n:
        return None
    first = buf[offset]
    if first == 0:
        return Segment(SegmentKind.PADDING, offset, skip_zeros(buf, offset), None, ())
    if first == 0x30 and offset % 4 == 0:
        entries = []
        at = offset
        while True:
            entry = _read_entry(buf, at, source)
            entries.append(entry)
            at = entry.end
            if entry.is_trailer or at >= n or buf[at] != 0x30:
                break
        return Segment(SegmentKind.CPIO, offset, at, None, tuple(entries))
    compression = detect(buf, offset)
    if compression is not None:
        return Segment(SegmentKind.COMPRESSED, offset, None, compression, ())
    return Segment(SegmentKind.UNKNOWN, offset, n, None, ())


def find_early(buf: Buffer, path: str, offset: int = 0, source: str = "<data>") -> CpioEntry | None:
    """Find a file the way the kernel's and Xen's ``find_cpio_data`` does; None if not found.

    From ``offset``: a NUL byte skips a 4-byte word; a newc/crc header is
    read and its entry skipped; anything else (odc, compressed data, a
    broken header, an entry running past the end) ends the search quietly.
    Trailers do not stop it.  The first regular file whose name *starts
    with* ``path`` is returned: pass a directory with a trailing ``/``, or a
    full name and check ``entry.name == path`` (``...bin.old`` also matches).
    """
    buf = as_bytes_buffer(buf)
    n = len(buf)
    want = path.encode("utf-8", "surrogateescape")
    at = offset
    # The C loop runs while more than a header's worth of bytes is left.
    while n - at > NEWC_HEADER_SIZE:
        if buf[at] == 0:
            # The C loop steps one NUL word at a time; jumping to the word
            # holding the next non-NUL byte lands on the same place, fast.
            nz = skip_zeros(buf, at, n)
            at += max(4, (nz - at) & ~3)
            continue
        magic = bytes(buf[at : at + MAGIC_SIZE])
        fmt = _MAGICS.get(magic)
        if fmt is None or fmt is CpioFormat.ODC:
            return None
        try:
            head = _decode_header(fmt, bytes(buf[at : at + NEWC_HEADER_SIZE]), at, source)
        except FormatError:
            return None
        end = head.end()
        if end > n:
            return None
        name_at = at + NEWC_HEADER_SIZE
        if head.mode & S_IFMT == S_IFREG and head.namesize >= len(want):
            # earlycpio compares only the prefix and has no PATH_MAX rule; the
            # name shown is read no further than PATH_MAX bytes.
            raw = bytes(buf[name_at : name_at + min(head.namesize, PATH_MAX)])
            if raw.startswith(want):
                name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                return head.entry(name)
        at = end
    return None


# ---------------------------------------------------------------- streams


class ReadableStream(Protocol):
    """What ``iter_stream`` needs: a binary ``read(size)`` (a file, ``BytesIO``,
    a ``compress.DecompressedStream``), returning ``b""`` only at the end."""

    def read(self, size: int, /) -> bytes:
        """Read up to ``size`` bytes."""
        ...


class _StreamReader:
    """Buffered reads from a binary stream, tracking the stream position."""

    def __init__(self, stream: ReadableStream, source: str) -> None:
        self._stream = stream
        self._source = source
        self._buf = b""
        self._i = 0
        self.pos = 0  # stream position of self._buf[self._i]
        self._eof = False

    def _fill(self, need: int) -> int:
        """Make ``need`` bytes available if the stream has them; return how many are."""
        have = len(self._buf) - self._i
        if have >= need or self._eof:
            return have
        parts = [self._buf[self._i :]]
        while have < need:
            data = self._stream.read(max(need - have, 1 << 16))
            if not data:
                self._eof = True
                break
            parts.append(data)
            have += len(data)
        self._buf = b"".join(parts)
        self._i = 0
        return have

    def take(self, n: int, field: str) -> bytes:
        have = self._fill(n)
        if have < n:
            raise TruncatedError(self._source, self.pos, field, n, have)
        data = self._buf[self._i : self._i + n]
        self._i += n
        self.pos += n
        return data

    def read_data(self, n: int, field: str) -> bytes:
        """Read ``n`` bytes in pieces (``n`` may be larger than any buffer we keep)."""
        if n <= len(self._buf) - self._i:
            return self.take(n, field)
        start = self.pos
        parts = []
        left = n
        while left:
            piece = min(left, _STREAM_CHUNK)
            have = self._fill(piece)
            if have == 0:
                raise TruncatedError(self._source, start, field, n, n - left)
            piece = min(piece, have)
            parts.append(self.take(piece, field))
            left -= piece
        return b"".join(parts)

    def skip(self, n: int, field: str) -> None:
        start = self.pos
        left = n
        while left:
            have = self._fill(min(left, _STREAM_CHUNK))
            if have == 0:
                raise TruncatedError(self._source, start, field, n, n - left)
            step = min(left, have)
            self._i += step
            self.pos += step
            left -= step

    def skip_zeros(self) -> bool:
        """Skip NULs; return whether any data follows."""
        while True:
            have = self._fill(1)
            if have == 0:
                return False
            rest = self._buf[self._i :].lstrip(b"\0")
            skipped = have - len(rest)
            self._i += skipped
            self.pos += skipped
            if rest:
                return True


def _never(entry: CpioEntry) -> bool:
    return False


def iter_stream(
    stream: ReadableStream,
    source: str = "<stream>",
    want: Callable[[CpioEntry], bool] = _never,
) -> Iterator[tuple[CpioEntry, bytes | None]]:
    """Yield ``(entry, data)`` for the archives in ``stream``, data None unless wanted.

    Archives may follow each other, with NUL padding between them, as in a
    decompressed initramfs; a following archive must start on a 4-byte
    aligned stream position (the kernel's "broken padding" otherwise).
    Data is read whole only for entries where ``want(entry)`` is true (so
    ``want`` must bound ``entry.filesize``); any other entry is yielded
    *before* its data is skipped in bounded chunks, so a caller hears of a
    member that claims gigabytes before the stream is read through it.  An
    entry whose name is over ``PATH_MAX`` is never wanted (the kernel skips
    it); only ``PATH_MAX`` bytes of its name are read.  An empty (or
    all-NUL) stream yields nothing.  Offsets are stream positions counted
    from the first read.

    :raise FormatError: as ``read_entry``; junk between archives; a stream
        that ends within an archive (``TruncatedError``, field ``trailer``
        when it ends between entries).
    """
    reader = _StreamReader(stream, source)
    in_archive = False
    while True:
        if not in_archive:
            if not reader.skip_zeros():
                return
            if reader.pos % 4:
                raise FormatError(
                    source,
                    reader.pos,
                    "padding",
                    f"an archive starts at {reader.pos:#x}, expected a 4-byte aligned offset",
                )
            in_archive = True
        at = reader.pos
        if reader._fill(1) == 0:
            raise TruncatedError(source, at, "trailer", MAGIC_SIZE, 0)
        magic = reader.take(MAGIC_SIZE, "magic")
        fmt, size = _header_size(magic, at, source)
        head = _decode_header(fmt, magic + reader.take(size - MAGIC_SIZE, "header"), at, source)
        name_at = reader.pos
        data_at = head.data_offset()
        if head.namesize > PATH_MAX:
            raw = reader.take(PATH_MAX, "namesize")
        else:
            raw = reader.take(data_at - name_at, "namesize")[: head.namesize]
        entry = head.entry(_decode_name(raw, name_at, source, head.namesize))
        if not entry.name_too_long and want(entry):
            reader.skip(data_at - reader.pos, "namesize")
            data = reader.read_data(head.filesize, "filesize")
            reader.skip(entry.end - reader.pos, "filesize")
            yield entry, data
        else:
            yield entry, None
            reader.skip(entry.end - reader.pos, "filesize")
        if entry.is_trailer:
            in_archive = False


# ---------------------------------------------------------------- writer


@dataclass(frozen=True, slots=True)
class CpioMember:
    """One member to write: a regular file unless ``mode`` says otherwise.

    A mode without file-type bits is taken as a regular file's permission
    bits.  ``nlink`` defaults to 2 for directories and 1 otherwise; ``ino``
    to the writer's own numbering.  Use ``directory`` and ``symlink`` for
    the other common kinds.
    """

    name: str
    data: bytes = b""
    mode: int = 0o100644
    mtime: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int | None = None
    ino: int | None = None

    @classmethod
    def directory(cls, name: str, *, mode: int = 0o755, mtime: int = 0) -> CpioMember:
        """A directory (mode ``0o040755`` by default)."""
        return cls(name, b"", S_IFDIR | (mode & 0o7777), mtime)

    @classmethod
    def symlink(cls, name: str, target: str, *, mtime: int = 0) -> CpioMember:
        """A symbolic link to ``target`` (mode ``0o120777``)."""
        return cls(name, target.encode("utf-8", "surrogateescape"), S_IFLNK | 0o777, mtime)


def write_newc(members: Iterable[CpioMember], *, trailer: bool = True, align: int = 4) -> bytes:
    """Write a newc archive of ``members``, then its trailer, padded to ``align`` bytes.

    Inodes are numbered from 1 for members without one.  ``align`` pads the
    whole archive with NULs to a multiple of it (512 as iucode_tool and
    dracut do, or 4, the format's own alignment).

    :raise ValueError: a name that is empty, has a NUL or is the trailer's;
        a directory with data; a field that does not fit in 32 bits.
    """
    if align < 1:
        raise ValueError(f"align must be at least 1, not {align}")
    parts: list[bytes] = []
    size = 0
    next_ino = 1
    for member in members:
        if not member.name or "\0" in member.name or member.name == TRAILER:
            raise ValueError(f"cpio member name {member.name!r} cannot be written")
        mode = member.mode if member.mode & S_IFMT else member.mode | S_IFREG
        if mode & S_IFMT == S_IFDIR and member.data:
            raise ValueError(f"cpio member {member.name!r} is a directory with data")
        ino = member.ino
        if ino is None:
            ino, next_ino = next_ino, next_ino + 1
        nlink = member.nlink
        if nlink is None:
            nlink = 2 if mode & S_IFMT == S_IFDIR else 1
        name = member.name.encode("utf-8", "surrogateescape") + b"\0"
        size = _emit(parts, size, name, member.data, ino=ino, mode=mode, uid=member.uid,
                     gid=member.gid, nlink=nlink, mtime=member.mtime)  # fmt: skip
    if trailer:
        size = _emit(parts, size, TRAILER.encode() + b"\0", b"", ino=0, mode=0, uid=0,
                     gid=0, nlink=1, mtime=0)  # fmt: skip
    if size % align:
        parts.append(bytes(align - size % align))
    return b"".join(parts)


def _emit(
    parts: list[bytes],
    size: int,
    name: bytes,
    data: bytes,
    *,
    ino: int,
    mode: int,
    uid: int,
    gid: int,
    nlink: int,
    mtime: int,
) -> int:
    values = {
        "ino": ino,
        "mode": mode,
        "uid": uid,
        "gid": gid,
        "nlink": nlink,
        "mtime": mtime,
        "filesize": len(data),
        "devmajor": 0,
        "devminor": 0,
        "rdevmajor": 0,
        "rdevminor": 0,
        "namesize": len(name),
        "check": 0,
    }
    for field, value in values.items():
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(
                f"cpio member {name[:-1]!r}: {field} {value} does not fit in 8 hex digits"
            )
    header = b"070701" + "".join(f"{values[f]:08X}" for f in _NEWC_FIELDS).encode("ascii")
    name_end = NEWC_HEADER_SIZE + len(name)
    parts += (header, name, bytes(_align4(name_end) - name_end), data)
    parts.append(bytes(_align4(len(data)) - len(data)))
    return size + _align4(name_end) + _align4(len(data))
