"""The save image format: :func:`pack_header`, :func:`parse_header`, :class:`StreamHasher`,
:func:`check_image` and :func:`check_stream`.

A save image is a JSON header (the domain's config and where its disks
are) followed by QEMU's migration stream.  Since version 4 every byte is
covered by an XXH64 checksum: the header has its own, right behind it; QEMU's
stream follows as QEMU wrote it, and after it comes a table with the
checksum of each MiB of the stream and a trailer that says how long the
stream is and holds the table's checksum and its own.  A reader checks the
whole image before QEMU sees a byte of it, so a damaged image is refused
naming the damaged bytes, and a cut one naming where it ends (it has no
trailer).  Versions 1 to 3 (no checksums) are still read.  The layout, byte
by byte, is in docs/migration.md.

Rules: this module is the format only.  It reads and writes through file
descriptors its caller opens (:mod:`xenlab.vm.backends.qemu.vmstate` hands them to QEMU);
it starts no process and speaks no QMP.  Errors are
:class:`~xenlab.errors.FormatError` subclasses at ``source+0xOFFSET``.  The
checksums chain to the header's (chunk ``i`` is hashed with seed
``header checksum + i``), so chunks cannot be moved between images or
reordered without a checksum failing.  QEMU's stream is never copied
through xenlab: QEMU writes and reads the file itself, and xenlab hashes
what is in the page cache, which is what costs least.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import xxhash

from xenlab.config.specs.disk import DiskFormat
from xenlab.errors import FormatError, TruncatedError
from xenlab.files import FileReadError

__all__ = [
    "CHECKED_VERSION",
    "CHUNK",
    "HEADER_MAX",
    "MAGIC",
    "QEMU_MAGIC",
    "READS",
    "SAVE_VERSION",
    "STREAM_MAGIC",
    "TRAILER_MAGIC",
    "TRAILER_SIZE",
    "ChecksumError",
    "CutShortError",
    "DiskMove",
    "DiskSnapshot",
    "ImageLayout",
    "SaveHeader",
    "StreamHasher",
    "StreamSummary",
    "check_image",
    "check_open",
    "check_stream",
    "check_stream_file",
    "check_stream_open",
    "file_identity",
    "header_from_json",
    "header_seed",
    "header_to_json",
    "pack_header",
    "parse_header",
    "read_header",
    "read_image",
]

MAGIC: Final = b"XENLAB-SAVE\n"
#: What a checked VM state file (a snapshot's memory file) starts with.
STREAM_MAGIC: Final = b"XENLAB-STREAM\n"
SAVE_VERSION: Final = 4
#: The first version with checksums.
CHECKED_VERSION: Final = 4
#: Versions this xenlab reads (1: before disk_snapshots, 2: before disk_paths
#: and overlays, 3: before checksums).
READS: Final = (1, 2, 3, 4)
#: QEMU_VM_FILE_MAGIC: every migration stream starts with it.
QEMU_MAGIC: Final = b"QEVM"
#: A config is a few KiB; anything near this is not a header.
HEADER_MAX: Final = 16 << 20
_LEN: Final = struct.Struct(">I")
_SUM: Final = struct.Struct(">Q")
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
    # vCPUs present in QEMU (boot and hot-plugged; version 4, when vcpu-set
    # plugged some): a QEMU that loads the state must have them all first.
    vcpus_plugged: int | None = None


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
    if h.version >= 4 and h.vcpus_plugged is not None:
        obj["vcpus_plugged"] = h.vcpus_plugged
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
    seed its checksums chain to (the header's checksum; None: versions 1-3, no checksums)."""

    header: SaveHeader
    stream_offset: int
    seed: int | None


def parse_header(buf: bytes | bytearray | memoryview, source: str = "save image"
                 ) -> tuple[SaveHeader, int]:
    """Parse a save image's header; (header, offset of QEMU's stream).

    ``buf`` must hold at least the header (in version 4 with its checksum)
    and the 4 bytes of QEMU's magic behind it, which are checked too, so an
    image cut right after its header is refused here rather than by QEMU.

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
    if len(mv) < first + len(QEMU_MAGIC):
        raise TruncatedError(source, first, "stream magic", len(QEMU_MAGIC), len(mv) - first)
    found = bytes(mv[first: first + len(QEMU_MAGIC)])
    if found != QEMU_MAGIC:
        raise FormatError(source, first, "stream magic",
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
    plugged = obj.get("vcpus_plugged")
    if plugged is not None and (version < 4 or isinstance(plugged, bool)
                                or not isinstance(plugged, int) or not 1 <= plugged <= 1024):
        raise FormatError(source, at, "header.vcpus_plugged",
                          f"found {_describe(plugged)}, expected a number of vCPUs (1-1024)")
    return SaveHeader(
        name=obj["name"], uuid=obj["uuid"], config_text=obj["config_text"],
        config_path=obj["config_path"], qemu_version=obj["qemu_version"],
        created=created, state=obj["state"], version=version,
        disk_snapshots=_disk_snapshots(obj, source, at) if version >= 2 else (),
        disk_paths=_disk_moves(obj, "disk_paths", source, at) if version >= 3 else (),
        overlays=_disk_moves(obj, "overlays", source, at) if version >= 3 else (),
        vcpus_plugged=plugged,
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
                # The checksum and QEMU's magic.
                head += f.read(n + _SUM.size + len(QEMU_MAGIC))
    except OSError as err:
        raise FileReadError(str(path), f"cannot read: {err.strerror or err}") from err
    return _layout(head, str(path))


def read_header(path: Path) -> tuple[SaveHeader, int]:
    """Read and parse the header of the save image at ``path``; (header, stream offset).

    :raise XenlabError: the file cannot be read.
    :raise FormatError: it is not a xenlab save image (or is cut short).
    """
    layout = read_image(path)
    return layout.header, layout.stream_offset


# --- the checked stream -------------------------------------------------------------------


class ChecksumError(FormatError):
    """Bytes ``start`` to ``end`` of the source do not match their checksum: ``stored`` is
    the checksum written, ``actual`` the one the bytes have now."""

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
    """The data ends without the trailer that ends a complete stream: it was cut short (a
    full disk, an interrupted copy); ``offset`` is where it ends."""

    def __init__(self, source: str, offset: int, field: str) -> None:
        self.need = TRAILER_SIZE
        self.have = 0
        self.end = offset
        FormatError.__init__(self, source, offset, field,
                             "cut short: the data ends here, without the trailer that ends "
                             "a complete stream")


@dataclass(frozen=True, slots=True)
class StreamSummary:
    """A checked stream: QEMU's ``bytes`` in ``chunks`` checksums; ``end`` the offset
    just after the trailer (the end of the file)."""

    chunks: int
    bytes: int
    end: int


#: Bytes per checksum: big enough that a checksum costs nothing next to its
#: data, small enough that a damaged one names a place worth looking at.
CHUNK: Final = 1 << 20
TRAILER_MAGIC: Final = b"XLSAVEND"
_READ: Final = 128 << 10
# magic, QEMU's stream bytes, chunk size, reserved (0), checksum of the table.
_TRAILER: Final = struct.Struct(">8sQIIQ")
#: The trailer: the fields above and their own checksum.
TRAILER_SIZE: Final = _TRAILER.size + _SUM.size


def _chunks(nbytes: int) -> int:
    return -(-nbytes // CHUNK)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class StreamHasher:
    """Checksums QEMU's stream as it lands in file ``fd`` (open for reading and writing)
    from offset ``start``, then appends the checksum table and the trailer (:meth:`finish`).

    QEMU appends to the file and never goes back, so every byte below the
    file's size is final: :meth:`update` (called while QEMU writes) hashes
    the whole chunks there are, from the page cache, and :meth:`finish` the
    rest.  ``seed`` is the header's checksum in a save image (0 in a bare
    stream): chunk ``i`` is hashed with seed ``seed + i``.
    """

    def __init__(self, fd: int, start: int, *, seed: int = 0) -> None:
        self.fd = fd
        self.start = start
        self.seed = seed
        self.sums: list[int] = []
        self._buf = bytearray(CHUNK)

    def _hash(self, length: int) -> None:
        view = memoryview(self._buf)[:length]
        at = self.start + len(self.sums) * CHUNK
        got = os.preadv(self.fd, [view], at)
        if got != length:
            raise OSError(f"read {got} of {length} bytes at {at:#x} of the stream")
        self.sums.append(xxhash.xxh64_intdigest(view, seed=(self.seed + len(self.sums)) & _MASK))

    def update(self) -> None:
        """Hash every whole chunk written so far."""
        written = os.fstat(self.fd).st_size - self.start
        while written - len(self.sums) * CHUNK >= CHUNK:
            self._hash(CHUNK)

    def finish(self) -> StreamSummary:
        """The stream is complete: hash the rest, append the table and the trailer; what the
        stream holds (``end`` is the file's new size).

        :raise OSError: the file cannot be read or written (a full disk).
        :raise ValueError: no stream (QEMU wrote nothing).
        """
        nbytes = os.fstat(self.fd).st_size - self.start
        if nbytes < len(QEMU_MAGIC):
            raise ValueError(f"QEMU wrote {nbytes} bytes, not a stream")
        self.update()
        rest = nbytes - len(self.sums) * CHUNK
        if rest:
            self._hash(rest)
        count = len(self.sums)
        table = b"".join(_SUM.pack(s) for s in self.sums)
        body = _TRAILER.pack(TRAILER_MAGIC, nbytes, CHUNK, 0,
                             xxhash.xxh64_intdigest(table, seed=(self.seed + count) & _MASK))
        tail = table + body + _SUM.pack(
            xxhash.xxh64_intdigest(body, seed=(self.seed + count + 1) & _MASK))
        _pwrite_all(self.fd, tail, self.start + nbytes)
        return StreamSummary(count, nbytes, self.start + nbytes + len(tail))


def _read_at(fd: int, size: int, offset: int) -> bytes:
    out = os.pread(fd, size, offset)
    while len(out) < size:
        more = os.pread(fd, size - len(out), offset + len(out))
        if not more:
            break
        out += more
    return out


def _trailer_at(fd: int, at: int, start: int, seed: int) -> tuple[int, int, int, bool] | None:
    """(stream bytes, chunk size, table checksum, own checksum right) of the trailer at
    ``at``, or None when there is no trailer magic there."""
    raw = _read_at(fd, TRAILER_SIZE, at)
    if len(raw) < TRAILER_SIZE or not raw.startswith(TRAILER_MAGIC):
        return None
    _, nbytes, chunk, _, table_sum = _TRAILER.unpack_from(raw)
    (stored,) = _SUM.unpack_from(raw, _TRAILER.size)
    count = _chunks(nbytes) if chunk == CHUNK else 0
    actual = xxhash.xxh64_intdigest(raw[: _TRAILER.size], seed=(seed + count + 1) & _MASK)
    return nbytes, chunk, table_sum, stored == actual


def _earlier_trailer(fd: int, start: int, below: int, seed: int) -> int | None:
    """The end of the last valid trailer that starts between ``start`` and ``below``."""
    hi = below + len(TRAILER_MAGIC) - 1
    while hi > start:
        lo = max(start, hi - CHUNK)
        window = _read_at(fd, hi - lo, lo)
        pos = window.rfind(TRAILER_MAGIC)
        while pos >= 0:
            found = _trailer_at(fd, lo + pos, start, seed) if lo + pos < below else None
            if found is not None and found[3]:
                return lo + pos + TRAILER_SIZE
            pos = window.rfind(TRAILER_MAGIC, 0, pos + len(TRAILER_MAGIC) - 1)
        hi = lo + len(TRAILER_MAGIC) - 1 if lo > start else start
    return None


def check_stream(fd: int, *, start: int, seed: int = 0, source: str = "stream"
                 ) -> StreamSummary:
    """Check the stream of file ``fd`` that starts at ``start`` whole: its trailer at the
    end of the file, the checksum table before it, and every chunk of QEMU's stream.

    Reads the file once, a chunk at a time (memory: one chunk and the table,
    8 bytes per MiB); leaves its offset alone.

    :raise CutShortError: no trailer at the end (it names where the data ends).
    :raise ChecksumError: the trailer, the table or a chunk does not match its
        checksum (it names the damaged bytes).
    :raise FormatError: a trailer that does not fit the file, bytes after the
        trailer, or a stream that is not QEMU's.
    """
    size = os.fstat(fd).st_size
    at = size - TRAILER_SIZE
    found = _trailer_at(fd, at, start, seed) if at >= start else None
    if found is None or not found[3]:
        # Junk appended after a complete image (a valid trailer earlier on)?
        # Searched backwards a MiB at a time: only a refused image pays for it.
        end = _earlier_trailer(fd, start, at, seed)
        if end is not None:
            raise FormatError(source, end, "end",
                              f"{size - end} bytes after the trailer: something was "
                              "appended to the image")
    if found is None:
        raise CutShortError(source, size, "trailer")
    nbytes, chunk, table_sum, trailer_ok = found
    if not trailer_ok:
        raw = _read_at(fd, TRAILER_SIZE, at)
        count = _chunks(nbytes) if chunk == CHUNK else 0
        raise ChecksumError(source, at, "trailer", _SUM.unpack_from(raw, _TRAILER.size)[0],
                            xxhash.xxh64_intdigest(raw[: _TRAILER.size],
                                                   seed=(seed + count + 1) & _MASK),
                            at, at + _TRAILER.size)
    count = _chunks(nbytes)
    if chunk != CHUNK or nbytes < len(QEMU_MAGIC) or start + nbytes + count * _SUM.size != at:
        raise FormatError(source, at, "trailer",
                          f"says {nbytes} bytes in chunks of {chunk}, which do not fit the "
                          f"{at - start} bytes before it")
    table_at = start + nbytes
    table = _read_at(fd, count * _SUM.size, table_at)
    actual = xxhash.xxh64_intdigest(table, seed=(seed + count) & _MASK)
    if actual != table_sum:
        raise ChecksumError(source, table_at, "checksum table", table_sum, actual, table_at, at)
    # Read in pieces that stay in the CPU's cache while they are hashed: the
    # copy out of the page cache is most of this pass's cost.
    buf = bytearray(_READ)
    head = _read_at(fd, len(QEMU_MAGIC), start)
    if head != QEMU_MAGIC:
        raise FormatError(source, start, "stream magic",
                          f"found {head!r}, expected QEMU's {QEMU_MAGIC!r}")
    for i in range(count):
        begin = start + i * CHUNK
        length = min(CHUNK, nbytes - i * CHUNK)
        h = xxhash.xxh64(seed=(seed + i) & _MASK)
        for at in range(begin, begin + length, _READ):
            view = memoryview(buf)[: min(_READ, begin + length - at)]
            if os.preadv(fd, [view], at) != len(view):
                raise CutShortError(source, at, f"stream chunk {i}")  # shrank meanwhile
            h.update(view)
        (stored,) = _SUM.unpack_from(table, i * _SUM.size)
        got = h.intdigest()
        if got != stored:
            raise ChecksumError(source, begin, f"stream chunk {i}", stored, got, begin,
                                begin + length)
    return StreamSummary(count, nbytes, size)


def check_image(path: Path) -> tuple[ImageLayout, StreamSummary | None]:
    """Check the save image at ``path`` whole: header, every chunk, table, trailer, end of
    file (:func:`check_open` on a descriptor of its own)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise FileReadError(str(path), f"cannot read: {err.strerror or err}") from err
    try:
        return check_open(fd, str(path))
    finally:
        os.close(fd)


def check_open(fd: int, source: str) -> tuple[ImageLayout, StreamSummary | None]:
    """Check the save image open at ``fd`` (``source`` names it): its header, and for
    version 4 all of the stream (:func:`check_stream`).  Versions 1 to 3 carry no
    checksums: only the header is checked (the summary is None).

    :raise XenlabError: the file cannot be read.
    :raise FormatError: see :func:`parse_header` and :func:`check_stream`.
    """
    try:
        head = _read_at(fd, len(MAGIC) + _LEN.size, 0)
        n = _LEN.unpack_from(head, len(MAGIC))[0] if (
            len(head) == len(MAGIC) + _LEN.size and head.startswith(MAGIC)) else 0
        if n <= HEADER_MAX:
            head += _read_at(fd, n + _SUM.size + len(QEMU_MAGIC), len(head))
        layout = _layout(head, source)
        if layout.seed is None:
            return layout, None
        return layout, check_stream(fd, start=layout.stream_offset, seed=layout.seed,
                                    source=source)
    except OSError as err:
        raise FileReadError(str(source), f"cannot read: {err.strerror or err}") from err


def check_stream_file(path: Path) -> StreamSummary | None:
    """Check a VM state file written by QEMU's backend
    (:func:`xenlab.vm.backends.qemu.vmstate.write_stream`) whole (a snapshot's memory
    file): magic, every chunk, table, trailer; None for an older file that is QEMU's raw
    stream (nothing to check).

    :raise XenlabError: the file cannot be read.
    :raise FormatError: neither kind of file, or damaged, or cut short.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise FileReadError(str(path), f"cannot read: {err.strerror or err}") from err
    try:
        return check_stream_open(fd, str(path))
    except OSError as err:
        raise FileReadError(str(path), f"cannot read: {err.strerror or err}") from err
    finally:
        os.close(fd)


def check_stream_open(fd: int, source: str) -> StreamSummary | None:
    """:func:`check_stream_file` on an open descriptor (its offset is left alone)."""
    head = _read_at(fd, len(STREAM_MAGIC), 0)
    if head.startswith(QEMU_MAGIC):
        return None
    if head != STREAM_MAGIC:
        raise FormatError(source, 0, "magic", f"found {head!r}, expected "
                          f"{STREAM_MAGIC!r}: not a xenlab VM state")
    return check_stream(fd, start=len(STREAM_MAGIC), source=source)


def header_seed(packed: bytes) -> int:
    """The seed the checksums behind ``packed`` chain to: the checksum that ends a version
    4 header from :func:`pack_header`."""
    return int(_SUM.unpack_from(packed, len(packed) - _SUM.size)[0])


def file_identity(fd: int) -> tuple[int, ...]:
    """What a loader compares before and after reading a checked file: device, inode, size
    and times of file ``fd`` (another writer changes one of them)."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
