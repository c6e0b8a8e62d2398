"""Disk image headers that name other files (qcow2, qcow, QED): :func:`parse_image`, :func:`probe`.

A qcow2, qcow or QED image may name a backing file and (qcow2) an external
data file, which QEMU opens with it; this module reads what an image names
exactly as QEMU 7.2 does (``block/qcow2.c``, ``block/qcow.c``,
``block/qed.c``), and :func:`probe` tells which driver QEMU would pick
(``bdrv_probe_all``).  Every check QEMU makes before it opens a named file is
made here: a header QEMU would refuse raises :class:`FormatError` at the
field's offset, names are cut at their first NUL, a buffer short of a name
raises :class:`TruncatedError`, and more than :data:`MAX_EXTENSIONS` header
extensions are refused, never skipped.  Pure: bytes in, frozen values out. The
design (the three header layouts and the rules) is in docs/formats.md, section
Disk image headers.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from xenlab.errors import FormatError
from xenlab.formats.buffer import Buffer, as_bytes_buffer, require

__all__ = [
    "MAX_EXTENSIONS",
    "PROBE_SIZE",
    "Extension",
    "FeatureName",
    "ImageFormat",
    "ImageHeader",
    "detect",
    "parse_image",
    "parse_qcow",
    "parse_qcow2",
    "parse_qed",
    "probe",
]

QCOW_MAGIC = b"QFI\xfb"
QED_MAGIC = b"QED\0"
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
EXT_FEATURE_TABLE = 0x6803F857
INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1 << 0, 1 << 1, 1 << 2
INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 = 1 << 3, 1 << 4
# The incompatible features QEMU 7.2 knows; any other bit makes it refuse the image.
INCOMPAT_KNOWN = 0x1F
QED_F_BACKING_FILE, QED_F_NEED_CHECK, QED_F_BACKING_FORMAT_NO_PROBE = 1, 2, 4
#: How much of a file QEMU reads to probe its format (BLOCK_PROBE_BUF_SIZE).
PROBE_SIZE = 2048
#: Header extensions read before the image is refused: real images have a
#: handful, and each one costs a step.
MAX_EXTENSIONS = 1024

_QCOW2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes: the v2 header
_QCOW2_V3 = struct.Struct(">QQQII")  # +72 .. +104
_QCOW = struct.Struct(">4sIQIIQBBHIQ")  # 48 bytes
_QED = struct.Struct("<4sIIIQQQQQII")  # 64 bytes
_EXT = struct.Struct(">II")
_FEATURE = struct.Struct(">BB46s")
_MIN_CLUSTER_BITS, _MAX_CLUSTER_BITS = 9, 21  # qcow2: 512 bytes to 2 MiB
_NAME_MAX = 1023  # qcow2 and qcow backing file names (bs->backing_file is 1024 bytes)
_FORMAT_NAME_MAX = 15  # bs->backing_format is 16 bytes
_QED_NAME_MAX = 4095  # qed_read_string into PATH_MAX bytes
_QED_MIN_CLUSTER, _QED_MAX_CLUSTER = 4096, 64 << 20
_QED_MAX_TABLE = 16
_U32_MAX = 0xFFFFFFFF


class ImageFormat(enum.Enum):
    """The image formats that can name other files; values are QEMU's driver names."""

    QCOW2 = "qcow2"
    QCOW = "qcow"
    QED = "qed"


@dataclass(frozen=True, slots=True)
class Extension:
    """One qcow2 header extension: its header's offset, type and data length."""

    offset: int
    type: int
    length: int


@dataclass(frozen=True, slots=True)
class FeatureName:
    """A qcow2 feature name table entry; type 0 incompatible, 1 compatible, 2 autoclear."""

    type: int
    bit: int
    name: str


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What QEMU reads of an image header, with the files it names.

    Names are ``str`` with undecodable bytes kept as surrogates
    (``os.fsencode`` gives the bytes back), cut at a NUL as QEMU cuts them.
    ``backing_format`` is the recorded driver of the backing file; None
    means QEMU probes it (:func:`probe`).  ``data_file`` is the external
    data file QEMU opens (qcow2 with incompatible bit 2), ``data_file_name``
    whatever the extension says, opened or not.  Fields a format lacks are
    0 or empty; ``version`` is 0 for QED, which has none.
    """

    format: ImageFormat
    version: int
    size: int
    cluster_size: int
    backing_file: str | None
    backing_file_offset: int
    backing_file_size: int
    backing_format: str | None = None
    data_file: str | None = None
    data_file_name: str | None = None
    header_length: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    crypt_method: int = 0
    extensions: tuple[Extension, ...] = ()
    feature_names: tuple[FeatureName, ...] = ()


def _name(raw: bytes) -> str | None:
    """A C string as QEMU keeps it: cut at the first NUL; None when empty."""
    text = raw.split(b"\0", 1)[0]
    return text.decode("utf-8", "surrogateescape") if text else None


def _view(buf: Buffer) -> memoryview:
    return memoryview(as_bytes_buffer(buf))


def detect(buf: Buffer) -> ImageFormat | None:
    """The format ``buf`` starts with (by magic, and version for qcow/qcow2), or None."""
    head = bytes(_view(buf)[:8])
    if head[:4] == QED_MAGIC:
        return ImageFormat.QED
    if head[:4] == QCOW_MAGIC and len(head) == 8:
        return ImageFormat.QCOW if int.from_bytes(head[4:8], "big") == 1 else ImageFormat.QCOW2
    return None


def parse_qcow2(buf: Buffer, *, source: str = "<data>") -> ImageHeader:
    """The qcow2 header at the start of ``buf``: backing file, its format, the data file.

    :raise TruncatedError: ``buf`` ends inside what QEMU reads.
    :raise FormatError: a header QEMU refuses (the offset names the field).
    """
    view = _view(buf)
    require(view, 0, _QCOW2.size, "qcow2 header", source)
    (magic, version, backing_offset, backing_size, cluster_bits, size, crypt, _l1_size,
     _l1_offset, _rt_offset, _rt_clusters, _nb_snapshots, _snap_offset) = _QCOW2.unpack_from(view)
    if magic != QCOW_MAGIC:
        raise FormatError(source, 0, "magic", f"{magic!r}, expected {QCOW_MAGIC!r}")
    if version not in (2, 3):
        raise FormatError(source, 4, "version", f"{version}: QEMU opens qcow2 versions 2 and 3")
    if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        raise FormatError(source, 20, "cluster_bits", f"{cluster_bits}, expected "
                          f"{_MIN_CLUSTER_BITS}-{_MAX_CLUSTER_BITS}")
    cluster = 1 << cluster_bits
    incompat = compat = autoclear = 0
    header_length = _QCOW2.size
    if version == 3:
        require(view, _QCOW2.size, _QCOW2_V3.size, "qcow2 v3 header", source)
        incompat, compat, autoclear, _order, header_length = _QCOW2_V3.unpack_from(view, 72)
        if header_length < 104:
            raise FormatError(source, 100, "header_length", f"{header_length}, less than 104")
    if header_length > cluster:
        raise FormatError(source, 100, "header_length",
                          f"{header_length}, more than the cluster size {cluster}")
    if incompat & ~INCOMPAT_KNOWN:
        raise FormatError(source, 72, "incompatible_features", f"{incompat:#x}: bits "
                          f"{incompat & ~INCOMPAT_KNOWN:#x} unknown to QEMU, which refuses it")
    if backing_offset > cluster:
        raise FormatError(source, 8, "backing_file_offset",
                          f"{backing_offset:#x}, beyond the first cluster ({cluster:#x})")
    ext_end = backing_offset or cluster
    extensions, backing_format, data_name, features = _extensions(
        view, header_length, ext_end, source)
    backing = None
    if backing_offset:
        if backing_size > min(_NAME_MAX, cluster - backing_offset):
            raise FormatError(source, 16, "backing_file_size", f"{backing_size}: the name "
                              f"would run past {min(_NAME_MAX, cluster - backing_offset)} bytes")
        require(view, backing_offset, backing_size, "backing file name", source)
        backing = _name(bytes(view[backing_offset : backing_offset + backing_size]))
    data_file = data_name if incompat & INCOMPAT_DATA_FILE else None
    if incompat & INCOMPAT_DATA_FILE and data_file is None:
        raise FormatError(source, 72, "incompatible_features",
                          "an external data file, but no data file name extension")
    return ImageHeader(
        format=ImageFormat.QCOW2, version=version, size=size, cluster_size=cluster,
        backing_file=backing, backing_file_offset=backing_offset,
        backing_file_size=backing_size, backing_format=backing_format, data_file=data_file,
        data_file_name=data_name, header_length=header_length, incompatible_features=incompat,
        compatible_features=compat, autoclear_features=autoclear, crypt_method=crypt,
        extensions=extensions, feature_names=features)


def _extensions(view: memoryview, start: int, end: int, source: str
                ) -> tuple[tuple[Extension, ...], str | None, str | None, tuple[FeatureName, ...]]:
    """qcow2_read_extensions: the extensions from ``start`` up to ``end`` or the end marker."""
    found: list[Extension] = []
    backing_format = data_name = None
    features: list[FeatureName] = []
    offset = start
    while offset < end:
        if len(found) >= MAX_EXTENSIONS:
            raise FormatError(source, offset, "header extension",
                              f"more than {MAX_EXTENSIONS} extensions: not read further")
        require(view, offset, _EXT.size, "header extension", source)
        ext_type, length = _EXT.unpack_from(view, offset)
        data = offset + _EXT.size
        if data > end or length > end - data:
            raise FormatError(source, offset + 4, "extension length",
                              f"{length}: the extension runs past {end:#x}")
        if ext_type == EXT_END:
            break
        require(view, data, length, f"extension {ext_type:#010x}", source)
        raw = bytes(view[data : data + length])
        if ext_type == EXT_BACKING_FORMAT:
            if length > _FORMAT_NAME_MAX:
                raise FormatError(source, offset + 4, "backing format length",
                                  f"{length}, more than {_FORMAT_NAME_MAX}")
            backing_format = _name(raw)
        elif ext_type == EXT_DATA_FILE:
            data_name = _name(raw)
        elif ext_type == EXT_FEATURE_TABLE:
            features += [FeatureName(t, bit, _name(name) or "")
                         for t, bit, name in _FEATURE.iter_unpack(
                             raw[: length - length % _FEATURE.size])]
        found.append(Extension(offset, ext_type, length))
        offset = data + ((length + 7) & ~7)
    return tuple(found), backing_format, data_name, tuple(features)


def parse_qcow(buf: Buffer, *, source: str = "<data>") -> ImageHeader:
    """The qcow (version 1) header at the start of ``buf``; its backing file has no format.

    :raise TruncatedError: ``buf`` ends inside the header or the backing file name.
    :raise FormatError: a header QEMU refuses.
    """
    view = _view(buf)
    require(view, 0, _QCOW.size, "qcow header", source)
    (magic, version, backing_offset, backing_size, _mtime, size, cluster_bits, l2_bits, _pad,
     crypt, _l1) = _QCOW.unpack_from(view)
    if magic != QCOW_MAGIC:
        raise FormatError(source, 0, "magic", f"{magic!r}, expected {QCOW_MAGIC!r}")
    if version != 1:
        raise FormatError(source, 4, "version", f"{version}, expected 1")
    if size <= 1:
        raise FormatError(source, 24, "size", f"{size}: QEMU needs at least 2 bytes")
    if not 9 <= cluster_bits <= 16:
        raise FormatError(source, 32, "cluster_bits", f"{cluster_bits}, expected 9-16")
    if not 6 <= l2_bits <= 13:
        raise FormatError(source, 33, "l2_bits", f"{l2_bits}, expected 6-13")
    if crypt > 1:
        raise FormatError(source, 36, "crypt_method", f"{crypt}, expected 0 or 1")
    backing = None
    if backing_offset:
        if backing_size > _NAME_MAX:
            raise FormatError(source, 16, "backing_file_size", f"{backing_size}, more than "
                              f"{_NAME_MAX}")
        require(view, backing_offset, backing_size, "backing file name", source)
        backing = _name(bytes(view[backing_offset : backing_offset + backing_size]))
    return ImageHeader(
        format=ImageFormat.QCOW, version=1, size=size, cluster_size=1 << cluster_bits,
        backing_file=backing, backing_file_offset=backing_offset,
        backing_file_size=backing_size, header_length=_QCOW.size, crypt_method=crypt)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def parse_qed(buf: Buffer, *, source: str = "<data>") -> ImageHeader:
    """The QED header at the start of ``buf``; feature bit 2 records a raw backing file.

    :raise TruncatedError: ``buf`` ends inside the header or the backing file name.
    :raise FormatError: a header QEMU refuses.
    """
    view = _view(buf)
    require(view, 0, _QED.size, "QED header", source)
    (magic, cluster, table_size, header_size, features, compat, autoclear, _l1, image_size,
     backing_offset, backing_size) = _QED.unpack_from(view)
    if magic != QED_MAGIC:
        raise FormatError(source, 0, "magic", f"{magic!r}, expected {QED_MAGIC!r}")
    if features & ~(QED_F_BACKING_FILE | QED_F_NEED_CHECK | QED_F_BACKING_FORMAT_NO_PROBE):
        raise FormatError(source, 16, "features", f"{features:#x}: unknown to QEMU")
    if not (_power_of_two(cluster) and _QED_MIN_CLUSTER <= cluster <= _QED_MAX_CLUSTER):
        raise FormatError(source, 4, "cluster_size", f"{cluster}, expected a power of two "
                          f"from {_QED_MIN_CLUSTER} to {_QED_MAX_CLUSTER}")
    if not (_power_of_two(table_size) and table_size <= _QED_MAX_TABLE):
        raise FormatError(source, 8, "table_size", f"{table_size}, expected a power of two "
                          f"up to {_QED_MAX_TABLE}")
    entries = table_size * cluster // 8
    if image_size % 512 or image_size > entries * cluster * entries:
        raise FormatError(source, 48, "image_size", f"{image_size}: not a multiple of 512 "
                          "or larger than the tables map")
    if header_size > _U32_MAX // cluster:
        raise FormatError(source, 12, "header_size", f"{header_size} clusters overflow")
    backing = backing_format = None
    if features & QED_F_BACKING_FILE:
        if backing_offset + backing_size > cluster * header_size:
            raise FormatError(source, 56, "backing_filename_offset", "the name runs past the "
                              f"header's {cluster * header_size} bytes")
        if backing_size > _QED_NAME_MAX:
            raise FormatError(source, 60, "backing_filename_size",
                              f"{backing_size}, more than {_QED_NAME_MAX}")
        require(view, backing_offset, backing_size, "backing file name", source)
        backing = _name(bytes(view[backing_offset : backing_offset + backing_size]))
        if features & QED_F_BACKING_FORMAT_NO_PROBE:
            backing_format = "raw"
    return ImageHeader(
        format=ImageFormat.QED, version=0, size=image_size, cluster_size=cluster,
        backing_file=backing, backing_file_offset=backing_offset,
        backing_file_size=backing_size, backing_format=backing_format,
        header_length=cluster * header_size, incompatible_features=features,
        compatible_features=compat, autoclear_features=autoclear)


def parse_image(buf: Buffer, *, source: str = "<data>") -> ImageHeader:
    """The header of whichever of qcow2, qcow or QED ``buf`` starts with (:func:`detect`).

    :raise FormatError: none of them, or a header QEMU refuses.
    """
    fmt = detect(buf)
    if fmt is ImageFormat.QCOW2:
        return parse_qcow2(buf, source=source)
    if fmt is ImageFormat.QCOW:
        return parse_qcow(buf, source=source)
    if fmt is ImageFormat.QED:
        return parse_qed(buf, source=source)
    raise FormatError(source, 0, "magic", f"{bytes(_view(buf)[:4])!r}: not a qcow2, qcow or "
                      "QED image")


# --- probing ---------------------------------------------------------------------

_CLOOP = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
# Formats QEMU 7.2 (Debian's build) recognises by their first bytes.
_MAGICS = (
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
)


def _vmdk_descriptor(head: bytes) -> bool:
    """vmdk_probe's text rule: comments and blank lines, then ``version=1|2|3``."""
    pos, end = 0, len(head)
    while pos < end:
        if head[pos : pos + 1] == b"#":
            nl = head.find(b"\n", pos)
            pos = end if nl < 0 else nl + 1
            continue
        if head[pos : pos + 1] == b" ":
            while pos < end and head[pos : pos + 1] == b" ":
                pos += 1
            if head[pos : pos + 1] == b"\r":
                pos += 1
            if pos == end or head[pos : pos + 1] != b"\n":
                return False
            pos += 1
            continue
        line = head[pos : pos + 11]
        return any(line.startswith(b"version=%d%s" % (v, nl))
                   for v in (1, 2, 3) for nl in (b"\n", b"\r\n"))
    return False


def probe(buf: Buffer, filename: str = "", *, length: int | None = None) -> str:
    """The driver QEMU picks for a file it must probe: ``raw``, ``qcow2``, ``vmdk``...

    ``buf`` holds the file's first bytes (:data:`PROBE_SIZE` are used, the
    rest read as zeros as QEMU reads past the end), ``filename`` its name
    (QEMU's dmg driver claims ``*.dmg``), ``length`` its size (an empty
    file is raw).  Formats are scored as QEMU scores them: a magic wins
    (100) over dmg and cloop (2), which win over raw (1).
    """
    head = bytes(_view(buf)[:PROBE_SIZE]).ljust(PROBE_SIZE, b"\0")
    if length == 0:
        return "raw"
    version = int.from_bytes(head[4:8], "big")
    if head[:4] == QCOW_MAGIC and version:  # qcow is version 1, qcow2 2 and up; 0 is neither
        return "qcow" if version == 1 else "qcow2"
    if head[:4] == QED_MAGIC:
        return "qed"
    for offset, magic, name in _MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return name
    if _vmdk_descriptor(head):
        return "vmdk"
    if len(filename) > 4 and filename.endswith(".dmg"):
        return "dmg"
    if head.startswith(_CLOOP):
        return "cloop"
    return "raw"
