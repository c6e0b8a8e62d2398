"""The save image format: :func:`pack_header`, :func:`parse_header`, :class:`FrameWriter`,
:func:`iter_frames` and :func:`check_image`.

A save image is a JSON header (the domain's config and where its disks
are) followed by QEMU's migration stream.  Since version 4 every byte
xenlab writes is covered by an XXH64 checksum: the header has its own, and
QEMU's stream is cut into frames of at most :data:`FRAME_MAX` bytes, each
with the checksum of its length and data, closed by a trailer that says
how many frames and bytes the stream holds.  A reader verifies each frame
before it hands the frame's data on, so a damaged image is refused naming
the offset of the damaged frame, and a cut one naming where it ends.
Versions 1 to 3 (no checksums, QEMU's stream right after the header) are
still read.  The layout, byte by byte, is in docs/migration.md.

Rules: this module is the format only.  It reads and writes bytes through
file objects and descriptors its caller opens (:mod:`xenlab.vm.vmstate`
connects them to QEMU); it starts no process and speaks no QMP.  Errors are
:class:`~xenlab.errors.FormatError` subclasses at ``source+0xOFFSET``.
Frame seeds chain to the header's checksum, so frames cannot be moved
between images, reordered, dropped or repeated without a checksum failing.
"""

from __future__ import annotations

import json
import math
import os
import select
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import xxhash

from xenlab.config.specs.disk import DiskFormat
from xenlab.errors import FormatError, TruncatedError, XenlabError

__all__ = [
    "CHECKED_VERSION",
    "FRAME_MAX",
    "HEADER_MAX",
    "MAGIC",
    "QEMU_MAGIC",
    "READS",
    "SAVE_VERSION",
    "STREAM_MAGIC",
    "ChecksumError",
    "CutShortError",
    "DiskMove",
    "DiskSnapshot",
    "FrameWriter",
    "ImageLayout",
    "SaveHeader",
    "StreamSummary",
    "check_image",
    "check_stream",
    "check_stream_file",
    "header_from_json",
    "header_seed",
    "header_to_json",
    "iter_frames",
    "pack_header",
    "parse_header",
    "pump",
    "read_header",
    "read_image",
]

MAGIC: Final = b"XENLAB-SAVE\n"
#: What a bare framed stream (a snapshot's memory file) starts with.
STREAM_MAGIC: Final = b"XENLAB-STREAM\n"
SAVE_VERSION: Final = 4
#: The first version with checksums.
CHECKED_VERSION: Final = 4
#: Versions this xenlab reads (1: before disk_snapshots, 2: before disk_paths
#: and overlays, 3: before checksums).
READS: Final = (1, 2, 3, 4)
#: QEMU_VM_FILE_MAGIC: every migration stream starts with it.
QEMU_MAGIC: Final = b"QEVM"
#: The largest frame: big enough that the per-frame cost (two reads, a hash
#: setup) vanishes, small enough that a frame is one pipe's worth of data.
FRAME_MAX: Final = 1 << 20
#: A config is a few KiB; anything near this is not a header.
HEADER_MAX: Final = 16 << 20
_LEN: Final = struct.Struct(">I")
_SUM: Final = struct.Struct(">Q")
# u32 0 (an empty frame ends the stream), u64 frames, u64 data bytes.
_TRAILER: Final = struct.Struct(">IQQ")
_MASK: Final = (1 << 64) - 1


# --- the header -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiskSnapshot:
    """The internal snapshot ``save --snapshot`` took of one disk: vdev, image file, tag."""

    vdev: str
    file: str
    name: str


@dataclass(frozen=True, slots=True)
class DiskMove:
    """Where disk ``vdev`` really is, when that is not the file its config names.

    In ``SaveHeader.disk_paths``: the file a mirror pivoted it to (the
    record's ``extra["disk_paths"]``); in ``SaveHeader.overlays``: the
    external-snapshot overlay it runs on (``extra["overlays"]``, always
    qcow2).  ``format`` is a :class:`DiskFormat` value.
    """

    vdev: str
    file: str
    format: str


@dataclass(frozen=True, slots=True)
class SaveHeader:
    """What a save image records about its domain, ahead of QEMU's stream.

    ``state`` is the domain's run state when it was saved ("running" or
    "paused"); ``qemu_version`` the saving QEMU's ``major.minor.micro``;
    ``disk_snapshots`` the disks' internal snapshots taken with the memory
    (empty unless saved with ``snapshot``; always empty in version 1);
    ``disk_paths`` and ``overlays`` the disks that ran elsewhere than the
    config says (always empty before version 3).  The migration channel
    carries the same object.
    """

    name: str
    uuid: str
    config_text: str
    config_path: str
    qemu_version: str
    created: float
    state: str
    version: int = SAVE_VERSION
    disk_snapshots: tuple[DiskSnapshot, ...] = ()
    disk_paths: tuple[DiskMove, ...] = ()
    overlays: tuple[DiskMove, ...] = ()


_HEADER_FIELDS: Final[Mapping[str, type | tuple[type, ...]]] = {
    "version": int,
    "name": str,
    "uuid": str,
    "config_text": str,
    "config_path": str,
    "qemu_version": str,
    "created": (int, float),
    "state": str,
}


def header_to_json(h: SaveHeader) -> dict[str, object]:
    """The header as the JSON object a save image (or the migration channel) carries.

    Each version is written as it was: no field a version did not have.

    :raise ValueError: ``h`` has something its version cannot say.
    """
    if h.version not in READS or (h.version == 1 and h.disk_snapshots) or (
            h.version < 3 and (h.disk_paths or h.overlays)):
        raise ValueError(f"cannot write a version {h.version} header with "
                         f"{len(h.disk_snapshots)} disk snapshot(s), "
                         f"{len(h.disk_paths) + len(h.overlays)} moved disk(s)")
    obj: dict[str, object] = {k: getattr(h, k) for k in _HEADER_FIELDS}
    if h.version >= 2:
        obj["disk_snapshots"] = [
            {"vdev": d.vdev, "file": d.file, "name": d.name} for d in h.disk_snapshots
        ]
    if h.version >= 3:
        obj["disk_paths"] = {m.vdev: {"file": m.file, "format": m.format}
                             for m in h.disk_paths}
        obj["overlays"] = {m.vdev: {"file": m.file, "format": m.format} for m in h.overlays}
    return obj


def pack_header(h: SaveHeader) -> bytes:
    """The bytes ahead of QEMU's stream: magic, length, JSON and (version 4) its checksum.

    A header of an older version is written as that version wrote it.
    """
    body = json.dumps(header_to_json(h), sort_keys=True, ensure_ascii=False).encode(
        "utf-8", "surrogateescape")
    head = MAGIC + _LEN.pack(len(body)) + body
    if h.version < CHECKED_VERSION:
        return head
    return head + _SUM.pack(xxhash.xxh64_intdigest(head))


@dataclass(frozen=True, slots=True)
class ImageLayout:
    """Where the parts of a save image are: its header, where the stream starts, and the
    seed its frames chain to (the header's checksum; None: versions 1-3, no checksums)."""

    header: SaveHeader
    stream_offset: int
    seed: int | None


def parse_header(buf: bytes | bytearray | memoryview, source: str = "save image"
                 ) -> tuple[SaveHeader, int]:
    """Parse a save image's header; (header, offset of QEMU's stream or of the first frame).

    ``buf`` must hold at least the header and the start of the stream
    behind it (QEMU's magic; in version 4 the first frame's length and
    QEMU's magic), which are checked too, so an image cut right after its
    header is refused here rather than by QEMU.

    :raise TruncatedError: ``buf`` ends inside the header or the stream's start.
    :raise FormatError: wrong magic, an oversized length, a damaged header
        (version 4: its checksum), a header that is not the JSON object its
        version writes, or no QEMU stream behind it.
    """
    layout = _layout(buf, source)
    return layout.header, layout.stream_offset


def _layout(buf: bytes | bytearray | memoryview, source: str) -> ImageLayout:
    mv = memoryview(buf).cast("B")
    if len(mv) < len(MAGIC):
        if bytes(mv) != MAGIC[: len(mv)]:
            raise FormatError(source, 0, "magic",
                              f"found {bytes(mv)!r}, expected {MAGIC!r}: not a xenlab save image")
        raise TruncatedError(source, 0, "magic", len(MAGIC), len(mv))
    if bytes(mv[: len(MAGIC)]) != MAGIC:
        raise FormatError(source, 0, "magic",
                          f"found {bytes(mv[:len(MAGIC)])!r}, expected {MAGIC!r}: "
                          "not a xenlab save image")
    at = len(MAGIC)
    if len(mv) < at + _LEN.size:
        raise TruncatedError(source, at, "header length", _LEN.size, len(mv) - at)
    (n,) = _LEN.unpack_from(mv, at)
    if n > HEADER_MAX:
        raise FormatError(source, at, "header length",
                          f"{n} bytes, more than the {HEADER_MAX} a header may have")
    at += _LEN.size
    if len(mv) < at + n:
        raise TruncatedError(source, at, "header", n, len(mv) - at)
    body, end = mv[at: at + n], at + n
    # Versions 1-3 go straight on with QEMU's stream; version 4 with the
    # header's checksum, which is checked before the JSON is believed.
    if len(mv) < end + len(QEMU_MAGIC):
        raise TruncatedError(source, end, "stream magic", len(QEMU_MAGIC), len(mv) - end)
    if bytes(mv[end: end + len(QEMU_MAGIC)]) == QEMU_MAGIC:
        header = _decode(body, source, at)
        if header.version >= CHECKED_VERSION:
            raise FormatError(source, end, "header checksum",
                              f"a version {header.version} header is followed by its "
                              "checksum, not by QEMU's stream: the image is damaged")
        return ImageLayout(header, end, None)
    if len(mv) < end + _SUM.size:
        raise TruncatedError(source, end, "header checksum", _SUM.size, len(mv) - end)
    (stored,) = _SUM.unpack_from(mv, end)
    actual = xxhash.xxh64_intdigest(mv[:end])
    if stored != actual:
        raise ChecksumError(source, end, "header checksum", stored, actual, 0, end)
    header = _decode(body, source, at)
    if header.version < CHECKED_VERSION:
        raise FormatError(source, end, "stream magic",
                          f"found {bytes(mv[end:end + 4])!r}, expected QEMU's {QEMU_MAGIC!r} "
                          f"(a version {header.version} image has no checksums)")
    first = end + _SUM.size
    if len(mv) < first + _LEN.size + len(QEMU_MAGIC):
        raise TruncatedError(source, first, "frame 0", _LEN.size + len(QEMU_MAGIC),
                             len(mv) - first)
    (length,) = _LEN.unpack_from(mv, first)
    if not 0 < length <= FRAME_MAX:
        raise FormatError(source, first, "frame 0 length",
                          f"{length}, expected 1 to {FRAME_MAX}")
    found = bytes(mv[first + _LEN.size: first + _LEN.size + len(QEMU_MAGIC)])
    if found != QEMU_MAGIC:
        raise FormatError(source, first + _LEN.size, "stream magic",
                          f"found {found!r}, expected QEMU's {QEMU_MAGIC!r}")
    return ImageLayout(header, first, stored)


def _decode(body: memoryview, source: str, at: int) -> SaveHeader:
    try:
        obj = json.loads(bytes(body).decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError) as err:
        raise FormatError(source, at, "header", f"not JSON: {err}") from None
    return header_from_json(obj, source, at)


def header_from_json(obj: object, source: str = "header", at: int = 0) -> SaveHeader:
    """The :class:`SaveHeader` a decoded JSON value describes (versions 1 to 4).

    ``at`` is the offset reported in errors (where the JSON starts).

    :raise FormatError: ``obj`` is not a header of a version this xenlab reads.
    """
    if not isinstance(obj, dict):
        raise FormatError(source, at, "header",
                          f"a JSON {type(obj).__name__}, expected an object")
    version = obj.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SAVE_VERSION:
        raise FormatError(source, at, "header.version",
                          f"version {version} is newer than this xenlab reads ({SAVE_VERSION})")
    for key, kind in _HEADER_FIELDS.items():
        value = obj.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, kind):
            raise FormatError(source, at, f"header.{key}",
                              f"found {_describe(value)}, expected "
                              f"{'a number' if key == 'created' else 'a ' + _kind_name(kind)}")
    if version not in READS:
        raise FormatError(source, at, "header.version",
                          f"version {version}, expected one of {', '.join(map(str, READS))}")
    assert isinstance(version, int)
    created = float(obj["created"])
    if not math.isfinite(created):
        raise FormatError(source, at, "header.created", f"{created}, expected a time")
    return SaveHeader(
        name=obj["name"], uuid=obj["uuid"], config_text=obj["config_text"],
        config_path=obj["config_path"], qemu_version=obj["qemu_version"],
        created=created, state=obj["state"], version=version,
        disk_snapshots=_disk_snapshots(obj, source, at) if version >= 2 else (),
        disk_paths=_disk_moves(obj, "disk_paths", source, at) if version >= 3 else (),
        overlays=_disk_moves(obj, "overlays", source, at) if version >= 3 else (),
    )


def _disk_snapshots(obj: Mapping[str, Any], source: str, at: int) -> tuple[DiskSnapshot, ...]:
    items = obj.get("disk_snapshots")
    if not isinstance(items, list):
        raise FormatError(source, at, "header.disk_snapshots",
                          f"found {_describe(items)}, expected a list")
    out: list[DiskSnapshot] = []
    for i, item in enumerate(items):
        field = f"header.disk_snapshots[{i}]"
        if not isinstance(item, dict):
            raise FormatError(source, at, field, f"found {_describe(item)}, expected an object")
        for key in ("vdev", "file", "name"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise FormatError(source, at, f"{field}.{key}",
                                  f"found {_describe(item.get(key))}, expected a non-empty str")
        out.append(DiskSnapshot(item["vdev"], item["file"], item["name"]))
    if len({d.vdev for d in out}) != len(out):
        raise FormatError(source, at, "header.disk_snapshots", "a disk appears twice")
    return tuple(out)


def _disk_moves(obj: Mapping[str, Any], key: str, source: str, at: int
                ) -> tuple[DiskMove, ...]:
    items = obj.get(key)
    if not isinstance(items, dict):
        raise FormatError(source, at, f"header.{key}",
                          f"found {_describe(items)}, expected an object (vdev: place)")
    out: list[DiskMove] = []
    for vdev, item in sorted(items.items()):
        field = f"header.{key}.{vdev}"
        if not vdev:
            raise FormatError(source, at, f"header.{key}", "an empty vdev")
        if not isinstance(item, dict):
            raise FormatError(source, at, field, f"found {_describe(item)}, expected an object")
        for k in ("file", "format"):
            if not isinstance(item.get(k), str) or not item[k]:
                raise FormatError(source, at, f"{field}.{k}",
                                  f"found {_describe(item.get(k))}, expected a non-empty str")
        try:
            DiskFormat(item["format"])
        except ValueError:
            raise FormatError(source, at, f"{field}.format",
                              f"{item['format']!r}, expected a disk format "
                              f"({', '.join(f.value for f in DiskFormat)})") from None
        out.append(DiskMove(vdev, item["file"], item["format"]))
    return tuple(out)


def _describe(value: object) -> str:
    return "nothing" if value is None else f"a {type(value).__name__}"


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)


def read_image(path: Path) -> ImageLayout:
    """Read and parse the header of the save image at ``path``: its :class:`ImageLayout`.

    Only the header is read (and, in version 4, checked); :func:`check_image`
    checks the rest.

    :raise XenlabError: the file cannot be read.
    :raise FormatError: it is not a xenlab save image (or is cut short, or its
        header is damaged).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + _LEN.size)
            n = _LEN.unpack_from(head, len(MAGIC))[0] if (
                len(head) == len(MAGIC) + _LEN.size and head.startswith(MAGIC)) else 0
            if n <= HEADER_MAX:
                # The checksum, the first frame's length and QEMU's magic.
                head += f.read(n + _SUM.size + _LEN.size + len(QEMU_MAGIC))
    except OSError as err:
        raise XenlabError(f"{path}: cannot read: {err.strerror or err}") from err
    return _layout(head, str(path))


def read_header(path: Path) -> tuple[SaveHeader, int]:
    """Read and parse the header of the save image at ``path``; (header, stream offset).

    :raise XenlabError: the file cannot be read.
    :raise FormatError: it is not a xenlab save image (or is cut short).
    """
    layout = read_image(path)
    return layout.header, layout.stream_offset


# --- frames -------------------------------------------------------------------------------


class ChecksumError(FormatError):
    """Bytes ``start`` to ``end`` of the source do not match their checksum at ``offset``:
    ``stored`` is the checksum written, ``actual`` the one the bytes have now."""

    def __init__(self, source: str, offset: int, field: str, stored: int, actual: int,
                 start: int, end: int) -> None:
        self.stored = stored
        self.actual = actual
        self.start = start
        self.end = end
        super().__init__(source, offset, field,
                         f"checksum {stored:#018x} does not match the bytes it covers "
                         f"(+{start:#x} to +{end:#x}, checksum {actual:#018x}): "
                         "they are damaged")


class CutShortError(TruncatedError):
    """The data ends inside a frame or before the trailer: it was cut short (a full
    disk, an interrupted copy); ``end`` is the offset where it ends."""

    def __init__(self, source: str, offset: int, field: str, need: int, have: int) -> None:
        self.need = need
        self.have = have
        self.end = offset + have
        where = ("where the next frame or the trailer should start" if have == 0 else
                 f"{have} of the {need} bytes this part needs")
        FormatError.__init__(
            self, source, offset, field,
            f"cut short: the data ends at +{self.end:#x}, {where}; a complete stream "
            "ends with a trailer")


@dataclass(frozen=True, slots=True)
class StreamSummary:
    """A framed stream checked to its trailer: ``frames`` and data ``bytes`` it holds,
    ``end`` the offset just after its trailer (the end of the file)."""

    frames: int
    bytes: int
    end: int


def _frame_sum(seed: int, index: int, head: bytes | memoryview,
               data: bytes | bytearray | memoryview) -> int:
    h = xxhash.xxh64(head, seed=(seed + index) & _MASK)
    h.update(data)
    return h.intdigest()


def _write_all(fd: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    """``writev`` until every byte of ``parts`` is written (a short write goes on)."""
    left = [memoryview(p).cast("B") for p in parts if len(p)]
    while left:
        n = os.writev(fd, left)
        while n:
            if n >= len(left[0]):
                n -= len(left[0])
                left.pop(0)
            else:
                left[0] = left[0][n:]
                n = 0


class FrameWriter:
    """Writes data as checksummed frames to file descriptor ``fd``, then the trailer.

    ``seed`` is the header's checksum in a save image (0 in a bare stream):
    frame ``i`` is hashed with seed ``seed + i``.  Each :meth:`frame` call
    writes one frame; :meth:`finish` writes the trailer, which says the
    stream is complete; call it only once the data is.
    """

    def __init__(self, fd: int, *, seed: int = 0) -> None:
        self.fd = fd
        self.seed = seed
        self.frames = 0
        self.bytes = 0

    def frame(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` (1 to :data:`FRAME_MAX` bytes) as the next frame."""
        n = len(data)
        if not 0 < n <= FRAME_MAX:
            raise ValueError(f"a frame holds 1 to {FRAME_MAX} bytes, not {n}")
        head = _LEN.pack(n)
        _write_all(self.fd, (head, data, _SUM.pack(_frame_sum(self.seed, self.frames,
                                                              head, data))))
        self.frames += 1
        self.bytes += n

    def finish(self) -> StreamSummary:
        """Write the trailer; what the stream holds (``end`` is relative to its start)."""
        body = _TRAILER.pack(0, self.frames, self.bytes)
        _write_all(self.fd, (body, _SUM.pack(_frame_sum(self.seed, self.frames, body, b""))))
        return StreamSummary(self.frames, self.bytes,
                             self.bytes + self.frames * (_LEN.size + _SUM.size)
                             + _TRAILER.size + _SUM.size)


def pump(src: int, writer: FrameWriter, *, stop: threading.Event | None = None,
         poll: float = 0.1) -> None:
    """Read ``src`` (a pipe QEMU writes) to its end, writing full frames to ``writer``.

    Frames are :data:`FRAME_MAX` bytes but the last.  ``src`` is read with
    ``poll`` so that ``stop`` (set by the caller, e.g. when QEMU hangs) ends
    the pump within ``poll`` seconds; the trailer is not written here (only
    the caller knows whether the stream completed).
    """
    buf = bytearray(FRAME_MAX)
    mv = memoryview(buf)
    filled = 0
    poller = select.poll()
    poller.register(src, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        if stop is not None and stop.is_set():
            return
        if not poller.poll(poll * 1000):
            continue
        try:
            n = os.readv(src, [mv[filled:]])
        except BlockingIOError:
            continue
        if n == 0:
            break
        filled += n
        if filled == FRAME_MAX:
            writer.frame(mv)
            filled = 0
    if filled:
        writer.frame(mv[:filled])


def _read_exact(f: BinaryIO, mv: memoryview) -> int:
    """Fill ``mv`` from ``f``; the bytes read (fewer only at the end of ``f``)."""
    got = 0
    while got < len(mv):
        n = f.readinto(mv[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def iter_frames(f: BinaryIO, *, seed: int = 0, source: str = "stream", offset: int = 0
                ) -> Iterator[memoryview]:
    """The data of each frame of the framed stream ``f`` reads, each checked before it is
    yielded; then the trailer and the end of ``f`` are checked.

    ``f`` is positioned at the first frame, which is at ``offset`` of the
    source (for the messages).  A yielded view is valid until the next one.
    Memory is one frame whatever ``f`` holds.

    :raise ChecksumError: a frame or the trailer does not match its checksum.
    :raise CutShortError: ``f`` ends inside a frame or before the trailer.
    :raise FormatError: a frame length above :data:`FRAME_MAX`, a trailer that
        disagrees with the frames, or bytes after the trailer.
    """
    buf = bytearray(_LEN.size + FRAME_MAX + _SUM.size)
    mv = memoryview(buf)
    index = total = 0
    at = offset
    while True:
        field = f"frame {index}"
        got = _read_exact(f, mv[: _LEN.size])
        if got < _LEN.size:
            raise CutShortError(source, at, field, _LEN.size, got)
        (length,) = _LEN.unpack_from(mv)
        if length == 0:
            break
        if length > FRAME_MAX:
            raise FormatError(source, at, f"{field} length",
                              f"{length} bytes, more than the {FRAME_MAX} a frame holds: "
                              "the image is damaged here")
        need = length + _SUM.size
        got = _read_exact(f, mv[_LEN.size: _LEN.size + need])
        if got < need:
            raise CutShortError(source, at, field, _LEN.size + need, _LEN.size + got)
        data = mv[_LEN.size: _LEN.size + length]
        (stored,) = _SUM.unpack_from(mv, _LEN.size + length)
        actual = _frame_sum(seed, index, mv[: _LEN.size], data)
        end = at + _LEN.size + length
        if stored != actual:
            raise ChecksumError(source, end, field, stored, actual, at, end)
        yield data
        index += 1
        total += length
        at = end + _SUM.size
    rest = _TRAILER.size + _SUM.size - _LEN.size
    got = _read_exact(f, mv[_LEN.size: _LEN.size + rest])
    if got < rest:
        raise CutShortError(source, at, "trailer", _LEN.size + rest, _LEN.size + got)
    _, frames, nbytes = _TRAILER.unpack_from(mv)
    (stored,) = _SUM.unpack_from(mv, _TRAILER.size)
    actual = _frame_sum(seed, index, mv[: _TRAILER.size], b"")
    if stored != actual:
        raise ChecksumError(source, at + _TRAILER.size, "trailer", stored, actual, at,
                            at + _TRAILER.size)
    if (frames, nbytes) != (index, total):
        raise FormatError(source, at, "trailer",
                          f"says {frames} frames and {nbytes} bytes, the stream has "
                          f"{index} and {total}")
    end = at + _TRAILER.size + _SUM.size
    extra = _read_exact(f, mv[:1])
    if extra:
        raise FormatError(source, end, "end",
                          "bytes after the trailer: something was appended to the image")


def check_stream(f: BinaryIO, *, seed: int = 0, source: str = "stream", offset: int = 0
                 ) -> StreamSummary:
    """Check every frame and the trailer of the framed stream ``f`` reads (see
    :func:`iter_frames` for where it starts and what it raises); what it holds."""
    frames = nbytes = 0
    for data in iter_frames(f, seed=seed, source=source, offset=offset):
        frames += 1
        nbytes += len(data)
    return StreamSummary(frames, nbytes, offset + nbytes
                         + frames * (_LEN.size + _SUM.size) + _TRAILER.size + _SUM.size)


def check_image(path: Path) -> tuple[ImageLayout, StreamSummary | None]:
    """Check the save image at ``path`` whole: header, every frame, trailer, end of file.

    Reads the file once, one frame at a time.  For versions 1 to 3, which
    carry no checksums, only the header is checked (the summary is None).

    :raise XenlabError: the file cannot be read.
    :raise FormatError: see :func:`parse_header` and :func:`iter_frames`.
    """
    layout = read_image(path)
    if layout.seed is None:
        return layout, None
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(layout.stream_offset)
            summary = check_stream(f, seed=layout.seed, source=str(path),
                                   offset=layout.stream_offset)
    except OSError as err:
        raise XenlabError(f"{path}: cannot read: {err.strerror or err}") from err
    return layout, summary


def check_stream_file(path: Path) -> StreamSummary | None:
    """Check a VM state file written by :func:`xenlab.vm.vmstate.write_stream` whole (a
    snapshot's memory file): magic, every frame, trailer; None for an older file that is
    QEMU's raw stream (nothing to check).

    :raise XenlabError: the file cannot be read.
    :raise FormatError: neither kind of file, or damaged, or cut short.
    """
    try:
        with open(path, "rb", buffering=0) as f:
            head = f.read(len(STREAM_MAGIC))
            if head.startswith(QEMU_MAGIC):
                return None
            if head != STREAM_MAGIC:
                raise FormatError(str(path), 0, "magic", f"found {head!r}, expected "
                                  f"{STREAM_MAGIC!r}: not a xenlab VM state")
            return check_stream(f, source=str(path), offset=len(STREAM_MAGIC))
    except OSError as err:
        raise XenlabError(f"{path}: cannot read: {err.strerror or err}") from err


def header_seed(packed: bytes) -> int:
    """The seed the frames behind ``packed`` chain to: the checksum that ends a version 4
    header from :func:`pack_header`."""
    return int(_SUM.unpack_from(packed, len(packed) - _SUM.size)[0])
