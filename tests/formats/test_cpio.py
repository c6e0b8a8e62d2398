"""Tests of formats.cpio: hand-built headers, the kernel's walk, streams, the writer, GNU cpio."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
import subprocess
import time
import tracemalloc
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenlab.errors import FormatError, TruncatedError
from xenlab.formats.compress import Compression
from xenlab.formats.cpio import (
    CpioEntry,
    CpioFormat,
    CpioMember,
    SegmentKind,
    cpio_checksum,
    entry_data,
    find_early,
    iter_archive,
    iter_stream,
    next_segment,
    read_entry,
    safe_member_path,
    write_newc,
)

# --------------------------------------------------------------------------
# Hand builders: fields written with % formatting, not through the writer.
# --------------------------------------------------------------------------


def newc(
    name: bytes,
    data: bytes = b"",
    *,
    magic: bytes = b"070701",
    ino: int = 1,
    mode: int = 0o100644,
    uid: int = 0,
    gid: int = 0,
    nlink: int = 1,
    mtime: int = 0,
    devmajor: int = 0,
    devminor: int = 0,
    rdevmajor: int = 0,
    rdevminor: int = 0,
    namesize: int | None = None,
    check: int = 0,
    terminate: bool = True,
    upper: bool = False,
) -> bytes:
    """One newc/crc entry: header, name (+NUL), pad to 4, data, pad to 4."""
    raw_name = name + b"\0" if terminate else name
    size = len(raw_name) if namesize is None else namesize
    fields = (ino, mode, uid, gid, nlink, mtime, len(data), devmajor, devminor,
              rdevmajor, rdevminor, size, check)  # fmt: skip
    header = magic + b"".join((b"%08X" if upper else b"%08x") % v for v in fields)
    assert len(header) == 110
    out = header + raw_name
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def newc_trailer(magic: bytes = b"070701", *, upper: bool = False) -> bytes:
    return newc(b"TRAILER!!!", ino=0, mode=0, magic=magic, upper=upper)


def odc(name: bytes, data: bytes = b"", *, mode: int = 0o100644, dev: int = 0o1234,
        ino: int = 7, rdev: int = 0, mtime: int = 0o12345670123) -> bytes:  # fmt: skip
    """One odc entry: 76-byte octal header, name (+NUL), data, no padding."""
    fields = (dev, ino, mode, 1000, 100, 1, rdev, mtime, len(name) + 1, len(data))
    header = b"070707" + b"%06o%06o%06o%06o%06o%06o%06o%011o%06o%011o" % fields
    assert len(header) == 76
    return header + name + b"\0" + data


# --------------------------------------------------------------------------
# Reading hand-built archives
# --------------------------------------------------------------------------


def test_newc_entry_fields_and_offsets() -> None:
    buf = newc(b"etc/hostname", b"xen\n", ino=0x1234, mode=0o100600, uid=1000, gid=100,
               nlink=1, mtime=0x5F5E1000, devmajor=8, devminor=1) + newc_trailer()  # fmt: skip
    first, trailer = list(iter_archive(buf))
    assert first == CpioEntry(
        format=CpioFormat.NEWC, offset=0, name="etc/hostname", mode=0o100600, uid=1000,
        gid=100, nlink=1, mtime=0x5F5E1000, ino=0x1234, devmajor=8, devminor=1,
        rdevmajor=0, rdevminor=0, filesize=4, check=0,
        data_offset=124,  # 110 + 13 = 123, aligned to 124
        end=128, namesize=13,
    )  # fmt: skip
    assert buf[first.data_offset : first.data_offset + 4] == b"xen\n"
    assert bytes(entry_data(buf, first)) == b"xen\n"
    assert first.is_regular and not first.is_dir and not first.is_symlink
    assert trailer.is_trailer and trailer.offset == 128 and trailer.end == len(buf)


def test_uppercase_hex_fields() -> None:
    head = newc(b"a", b"z", mode=0o100755)
    upper = head[:6] + head[6:110].upper() + head[110:]
    assert read_entry(upper).mode == 0o100755


def test_crc_format_carries_the_checksum() -> None:
    data = b"\xff\x01" * 3
    buf = newc(b"f", data, magic=b"070702", check=6 * 0x80) + newc_trailer(b"070702")
    entry = next(iter_archive(buf))
    assert entry.format is CpioFormat.CRC
    assert entry.check == 0x300 == cpio_checksum(data)


def test_checksum_wraps_at_32_bits() -> None:
    assert cpio_checksum(b"") == 0
    assert cpio_checksum(bytes([0xFF]) * 1000) == 255000
    assert cpio_checksum(memoryview(b"\x01\x02\x03")) == 6


def test_odc_entries_have_no_padding_and_octal_fields() -> None:
    buf = odc(b"bin", mode=0o040755) + odc(b"bin/sh", b"#!", rdev=0o777) + odc(b"TRAILER!!!")
    d, sh, t = list(iter_archive(buf))
    assert d.format is CpioFormat.ODC and d.is_dir
    assert (d.devmajor, d.devminor, d.ino, d.uid, d.gid, d.mtime) == (
        0o1234, 0, 7, 1000, 100, 0o12345670123,
    )  # fmt: skip
    assert sh.offset == 76 + 4 and sh.data_offset == sh.offset + 76 + 7
    assert sh.end == sh.data_offset + 2 and sh.rdevmajor == 0o777
    assert t.offset == sh.end and t.end == len(buf)


def test_symlink_and_names_stop_at_the_first_nul() -> None:
    buf = newc(b"lnk", b"target", mode=0o120777) + newc(b"a\0junk") + newc_trailer()
    link, named, _ = list(iter_archive(buf))
    assert link.is_symlink and link.filesize == 6
    assert named.name == "a"  # as the kernel's C strings see it


def test_undecodable_names_survive_with_surrogateescape() -> None:
    entry = read_entry(newc(b"caf\xe9"))
    assert entry.name == "caf\udce9"
    assert entry.name.encode("utf-8", "surrogateescape") == b"caf\xe9"


def test_archive_at_an_aligned_offset_in_a_larger_buffer() -> None:
    prefix = b"\0" * 8
    buf = prefix + newc(b"x", b"abc") + newc_trailer()
    entries = list(iter_archive(buf, 8))
    assert [e.offset for e in entries] == [8, 8 + 116]
    assert entries[0].data_offset == 8 + 112


def test_memoryview_and_mmap_buffers(tmp_path: Path) -> None:
    import mmap

    buf = newc(b"x", b"abc") + newc_trailer()
    assert [e.name for e in iter_archive(memoryview(buf))] == ["x", "TRAILER!!!"]
    path = tmp_path / "a.cpio"
    path.write_bytes(buf)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert [e.name for e in iter_archive(m)] == ["x", "TRAILER!!!"]
        seg = next_segment(m, 0)
        assert seg is not None and seg.end == len(buf)


# --------------------------------------------------------------------------
# Errors: offset and field
# --------------------------------------------------------------------------


def test_bad_magic_names_offset_and_field() -> None:
    buf = newc(b"x") + b"070700" + b"0" * 200
    with pytest.raises(FormatError) as err:
        list(iter_archive(buf, source="initrd.img"))
    assert err.value.offset == 112 and err.value.field == "magic"
    assert str(err.value).startswith("initrd.img+0x70: magic: b'070700', expected b'070701'")


@pytest.mark.parametrize(
    ("field", "index"), [("ino", 0), ("uid", 2), ("filesize", 6), ("namesize", 11), ("check", 12)]
)
def test_non_hex_digit_names_the_field(field: str, index: int) -> None:
    buf = bytearray(newc(b"name", b"data") + newc_trailer())
    at = 6 + 8 * index + 5
    buf[at] = ord("g")
    with pytest.raises(FormatError) as err:
        read_entry(bytes(buf))
    assert err.value.field == field and err.value.offset == at
    assert "non-hex digit b'g'" in str(err.value)


@pytest.mark.parametrize("text", [b"0x000001", b" 0000001", b"+0000001", b"0000_001", b"-0000001"])
def test_int_leniency_is_not_accepted(text: bytes) -> None:
    buf = bytearray(newc(b"name"))
    buf[6 + 8 : 6 + 16] = text  # mode
    with pytest.raises(FormatError) as err:
        read_entry(bytes(buf))
    assert err.value.field == "mode"


def test_odc_non_octal_digit() -> None:
    buf = bytearray(odc(b"x"))
    buf[18 + 2] = ord("8")  # mode
    with pytest.raises(FormatError) as err:
        read_entry(bytes(buf))
    assert (err.value.field, err.value.offset) == ("mode", 20)


def test_namesize_zero() -> None:
    buf = newc(b"", namesize=0, terminate=False) + newc_trailer()
    with pytest.raises(FormatError) as err:
        read_entry(buf)
    assert (err.value.field, err.value.offset) == ("namesize", 94)


def test_namesize_past_the_end() -> None:
    buf = newc(b"x")[:110] + b"abc"  # namesize 2 fits; make it huge instead
    buf = buf[:94] + b"%08x" % 0xFFFFFFF0 + buf[102:]
    with pytest.raises(TruncatedError) as err:
        read_entry(buf)
    assert (err.value.field, err.value.offset) == ("namesize", 110)


def test_filesize_past_the_end() -> None:
    buf = newc(b"f", b"12345678")[:-4]
    with pytest.raises(TruncatedError) as err:
        read_entry(buf, source="x.cpio")
    assert (err.value.field, err.value.offset) == ("filesize", 112)
    assert (err.value.need, err.value.have) == (8, 4)
    assert str(err.value).startswith("x.cpio+0x70: filesize: needs 8 bytes, only 4 left")


def test_name_without_nul_terminator() -> None:
    buf = newc(b"abcd", terminate=False)
    with pytest.raises(FormatError) as err:
        read_entry(buf)
    assert (err.value.field, err.value.offset) == ("name", 113)


def test_missing_trailer() -> None:
    buf = newc(b"a") + newc(b"b")
    with pytest.raises(TruncatedError) as err:
        list(iter_archive(buf))
    assert (err.value.field, err.value.offset) == ("trailer", len(buf))


def test_truncated_header() -> None:
    with pytest.raises(TruncatedError) as err:
        read_entry(newc(b"a")[:50])
    assert (err.value.field, err.value.offset, err.value.have) == ("header", 0, 50)


# --------------------------------------------------------------------------
# The kernel's top-level walk
# --------------------------------------------------------------------------


def walk(buf: bytes) -> list[tuple[SegmentKind, int, int | None]]:
    out = []
    offset = 0
    while (seg := next_segment(buf, offset)) is not None:
        out.append((seg.kind, seg.offset, seg.end))
        if seg.end is None:
            break
        offset = seg.end
    return out


def test_walk_archives_and_padding() -> None:
    early = newc(b"kernel/x86/microcode/GenuineIntel.bin", b"U" * 5) + newc_trailer()
    main = newc(b"init", b"#!/bin/sh\n", mode=0o100755) + newc_trailer()
    buf = early + bytes(512 - len(early)) + main + bytes(7)
    assert walk(buf) == [
        (SegmentKind.CPIO, 0, len(early)),
        (SegmentKind.PADDING, len(early), 512),
        (SegmentKind.CPIO, 512, 512 + len(main)),
        (SegmentKind.PADDING, 512 + len(main), len(buf)),
    ]
    seg = next_segment(buf, 512)
    assert seg is not None and [e.name for e in seg.entries] == ["init", "TRAILER!!!"]
    assert next_segment(buf, len(buf)) is None


def test_walk_compressed_and_unknown() -> None:
    buf = newc_trailer() + b"\0\0" + b"\x28\xb5\x2f\xfd" + b"rest"
    seg = next_segment(buf, 126)
    assert seg is not None and seg.kind is SegmentKind.COMPRESSED
    assert seg.compression is Compression.ZSTD and seg.end is None
    # '0' at an unaligned offset is not an archive for the kernel: junk.
    odd = b"\0" + newc_trailer()
    assert walk(odd) == [(SegmentKind.PADDING, 0, 1), (SegmentKind.UNKNOWN, 1, len(odd))]
    assert walk(b"MZ\x90\0") == [(SegmentKind.UNKNOWN, 0, 4)]


def test_walk_archive_without_trailer_ends_where_the_kernel_goes_on() -> None:
    part = newc(b"a", b"1") + newc(b"b")
    buf = part + bytes(8) + b"\x1f\x8b\x08\0"
    seg = next_segment(buf, 0)
    assert seg is not None and seg.kind is SegmentKind.CPIO
    assert [e.name for e in seg.entries] == ["a", "b"] and seg.end == len(part)
    at_end = next_segment(part, 0)
    assert at_end is not None and at_end.end == len(part)


def test_walk_broken_archive_raises() -> None:
    with pytest.raises(FormatError) as err:
        next_segment(b"0707xx" + bytes(200), 0)
    assert err.value.field == "magic"


# --------------------------------------------------------------------------
# The early loader's lookup
# --------------------------------------------------------------------------


def test_find_early_walks_nul_words_and_trailers() -> None:
    path = "kernel/x86/microcode/GenuineIntel.bin"
    first = newc(b"kernel", mode=0o040755) + newc_trailer()
    second = newc(path.encode(), b"UCODE") + newc_trailer()
    buf = first + bytes(16) + second
    found = find_early(buf, path)
    assert found is not None and found.name == path
    assert buf[found.data_offset : found.data_offset + found.filesize] == b"UCODE"


def test_find_early_prefix_match_and_mode_check() -> None:
    buf = (
        newc(b"kernel/x86/microcode/GenuineIntel.bin", mode=0o040755)  # a dir: skipped
        + newc(b"kernel/x86/microcode/GenuineIntel.bin.old", b"old")
        + newc_trailer()
    )
    found = find_early(buf, "kernel/x86/microcode/GenuineIntel.bin")
    assert found is not None and found.name.endswith(".old")  # the C code's prefix match
    assert find_early(buf, "kernel/x86/microcode/AuthenticAMD.bin") is None


def test_find_early_stops_quietly() -> None:
    path = b"kernel/x86/microcode/AuthenticAMD.bin"
    behind_gzip = newc_trailer() + b"\x1f\x8b" + bytes(2) + newc(path, b"x")
    assert find_early(behind_gzip, path.decode()) is None
    behind_odc = odc(b"a") + newc(path, b"x")
    assert find_early(behind_odc, path.decode()) is None
    broken = newc(path, b"x")[:-4]
    assert find_early(broken, path.decode()) is None


# --------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------


class Trickle(io.RawIOBase):
    """A stream that returns at most ``step`` bytes per read and records the sizes asked for."""

    def __init__(self, data: bytes, step: int = 3) -> None:
        self._data = data
        self._pos = 0
        self._step = step
        self.asked: list[int] = []

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> bytes:
        size = len(self._data) if size is None or size < 0 else size
        self.asked.append(size)
        out = self._data[self._pos : self._pos + min(size, self._step)]
        self._pos += len(out)
        return out


def two_archives() -> bytes:
    a = newc(b"a", b"AAAA") + newc(b"dir", mode=0o040755) + newc_trailer()
    b = newc(b"b", b"BBBBB", magic=b"070702", check=5 * 0x42) + newc_trailer(b"070702")
    return a + bytes(20) + b + bytes(3)


def test_stream_concatenated_archives_with_padding() -> None:
    buf = two_archives()
    got = list(iter_stream(io.BytesIO(buf), want=lambda e: e.is_regular))
    assert [(e.name, d) for e, d in got] == [
        ("a", b"AAAA"),
        ("dir", None),
        ("TRAILER!!!", None),
        ("b", b"BBBBB"),
        ("TRAILER!!!", None),
    ]
    # Stream offsets agree with the buffer reader's.
    second = next(iter_archive(buf, got[3][0].offset))
    assert got[3][0] == second


def test_stream_in_tiny_reads() -> None:
    buf = two_archives()
    names = [e.name for e, _ in iter_stream(Trickle(buf, 1), want=lambda e: True)]
    assert names == ["a", "dir", "TRAILER!!!", "b", "TRAILER!!!"]


def test_stream_unaligned_next_archive() -> None:
    buf = newc_trailer() + b"\0" + newc_trailer()
    with pytest.raises(FormatError) as err:
        list(iter_stream(io.BytesIO(buf), source="initrd[gzip]"))
    assert (err.value.field, err.value.offset) == ("padding", 125)
    assert str(err.value).startswith("initrd[gzip]+0x7d: padding:")


def test_stream_junk_after_archive() -> None:
    buf = newc_trailer() + b"junk"
    with pytest.raises(FormatError) as err:
        list(iter_stream(io.BytesIO(buf)))
    assert (err.value.field, err.value.offset) == ("magic", 124)


def test_stream_truncated_and_missing_trailer() -> None:
    buf = newc(b"file", b"0123456789")
    with pytest.raises(TruncatedError) as err:
        list(iter_stream(io.BytesIO(buf[:-6]), want=lambda e: True))
    assert err.value.field == "filesize" and err.value.offset == 116
    with pytest.raises(TruncatedError) as err:
        list(iter_stream(io.BytesIO(buf)))
    assert (err.value.field, err.value.offset) == ("trailer", len(buf))


def test_stream_empty_and_all_nul() -> None:
    assert list(iter_stream(io.BytesIO(b""))) == []
    assert list(iter_stream(io.BytesIO(bytes(4096)))) == []


class LazyBigEntry(io.RawIOBase):
    """A stream of one newc entry of ``size`` zero bytes and a trailer, made up as it is read."""

    def __init__(self, size: int) -> None:
        assert size % 4 == 0
        head = newc(b"big")
        self._head = head[:54] + b"%08x" % size + head[62:]
        self._body_end = len(self._head) + size
        self._tail = newc_trailer()
        self._size = self._body_end + len(self._tail)
        self._pos = 0
        self.largest = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> bytes:
        assert size is not None and size >= 0
        self.largest = max(self.largest, size)
        pos, end = self._pos, min(self._pos + size, self._size)
        head_end, body_end = len(self._head), self._body_end
        out = self._head[pos:end]
        if end > head_end and pos < body_end:
            out += bytes(min(end, body_end) - max(pos, head_end))
        if end > body_end:
            out += self._tail[max(pos, body_end) - body_end : end - body_end]
        self._pos = end
        return out


def test_stream_skips_big_data_in_bounded_memory() -> None:
    size = 64 << 20
    stream = LazyBigEntry(size)
    tracemalloc.start()
    try:
        entries = [e for e, _ in iter_stream(stream)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e.filesize for e in entries] == [size, 0]
    assert peak < 4 << 20
    assert stream.largest <= 1 << 20


# --------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("etc/passwd", "etc/passwd"),
        ("./etc//passwd", "etc/passwd"),
        ("kernel/x86/microcode/", "kernel/x86/microcode"),
        ("a/./b", "a/b"),
        ("", None),
        (".", None),
        ("./", None),
        ("/etc/passwd", None),
        ("../x", None),
        ("a/../../x", None),
        ("a/..", None),
        ("a\0b", None),
    ],
)
def test_safe_member_path(name: str, path: str | None) -> None:
    assert safe_member_path(name) == (None if path is None else PurePosixPath(path))


# --------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------


def test_writer_bytes_match_the_hand_builder() -> None:
    out = write_newc([CpioMember("etc/motd", b"hi\n", mtime=0x1234, uid=5, gid=6)])
    # Upper-case hex digits, as GNU cpio writes them.
    expect = newc(b"etc/motd", b"hi\n", mtime=0x1234, uid=5, gid=6, upper=True)
    assert out == expect + newc_trailer(upper=True)


def test_writer_defaults_kinds_and_inodes() -> None:
    members = [
        CpioMember.directory("kernel"),
        CpioMember("kernel/a", b"1", mode=0o600, ino=77),
        CpioMember.symlink("kernel/l", "a"),
        CpioMember("kernel/b", b"22"),
    ]
    d, a, link, b, t = list(iter_archive(write_newc(members)))
    assert (d.mode, d.nlink, d.ino) == (0o040755, 2, 1)
    assert (a.mode, a.nlink, a.ino) == (0o100600, 1, 77)
    assert (link.mode, link.filesize, link.ino) == (0o120777, 1, 2)
    assert (b.mode, b.ino) == (0o100644, 3)
    assert t.is_trailer and (t.mode, t.ino) == (0, 0)


def test_writer_align_and_no_trailer() -> None:
    out = write_newc([CpioMember("x", b"abc")], align=512)
    assert len(out) == 512 and out[240:] == bytes(272)
    seg = next_segment(out, 0)
    assert seg is not None and seg.end == 240
    bare = write_newc([CpioMember("x", b"abc")], trailer=False)
    assert len(bare) == 116
    assert write_newc([], align=512) == newc_trailer(upper=True) + bytes(512 - 124)


@pytest.mark.parametrize(
    "member",
    [
        CpioMember(""),
        CpioMember("a\0b"),
        CpioMember("TRAILER!!!"),
        CpioMember("d", b"x", mode=0o040755),
        CpioMember("big", mtime=1 << 32),
        CpioMember("neg", uid=-1),
    ],
)
def test_writer_rejects(member: CpioMember) -> None:
    with pytest.raises(ValueError):
        write_newc([member])
    with pytest.raises(ValueError):
        write_newc([], align=0)


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------

names = st.text(
    alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=40,
).filter(lambda n: n != "TRAILER!!!")
members_st = st.lists(
    st.builds(
        CpioMember,
        name=names,
        data=st.binary(max_size=64),
        mode=st.sampled_from([0o100644, 0o100755, 0o120777, 0o100000]),
        mtime=st.integers(0, 0xFFFFFFFF),
        uid=st.integers(0, 0xFFFFFFFF),
        gid=st.integers(0, 65535),
    ),
    max_size=8,
)


@given(members_st, st.sampled_from([4, 512]))
def test_write_read_round_trip(members: list[CpioMember], align: int) -> None:
    buf = write_newc(members, align=align)
    entries = list(iter_archive(buf))
    assert entries[-1].is_trailer and len(entries) == len(members) + 1
    for m, e in zip(members, entries, strict=False):
        assert (e.name, e.mode, e.mtime, e.uid, e.gid) == (m.name, m.mode, m.mtime, m.uid, m.gid)
        assert bytes(entry_data(buf, e)) == m.data
    streamed = list(iter_stream(io.BytesIO(buf), want=lambda e: True))
    assert [e for e, _ in streamed] == entries
    assert [d for _, d in streamed[:-1]] == [m.data for m in members]


def exercise(buf: bytes) -> None:
    """Every reader on ``buf``: only FormatError may come out."""
    with contextlib.suppress(FormatError):
        list(iter_archive(buf))
    offset = 0
    try:
        while (seg := next_segment(buf, offset)) is not None and seg.end is not None:
            assert seg.end > offset
            offset = seg.end
    except FormatError:
        pass
    with contextlib.suppress(FormatError):
        list(iter_stream(io.BytesIO(buf), want=lambda e: True))
    find_early(buf, "kernel/x86/microcode/GenuineIntel.bin")


@given(st.binary(max_size=400))
def test_random_bytes_raise_only_format_errors(buf: bytes) -> None:
    exercise(buf)
    exercise(b"070701" + buf)
    exercise(b"070707" + buf)


valid = write_newc(
    [CpioMember.directory("d"), CpioMember("d/f", b"data" * 5), CpioMember.symlink("l", "d/f")]
)


@given(st.integers(0, len(valid) - 1), st.binary(min_size=1, max_size=4))
def test_mutated_archives_raise_only_format_errors(at: int, patch: bytes) -> None:
    exercise(valid[:at] + patch + valid[at + len(patch) :])


@given(st.integers(1, len(valid) - 1))
def test_truncated_archives_raise_truncated_error(cut: int) -> None:
    with pytest.raises(TruncatedError):
        list(iter_archive(valid[:cut]))
    with pytest.raises(TruncatedError):
        list(iter_stream(io.BytesIO(valid[:cut]), want=lambda e: True))


def test_huge_size_fields_raise_truncated_error() -> None:
    buf = newc(b"f", b"")
    buf = buf[:54] + b"FFFFFFFF" + buf[62:]
    with pytest.raises(TruncatedError) as err:
        read_entry(buf)
    assert err.value.field == "filesize" and err.value.need == 0xFFFFFFFF + 1
    with pytest.raises(TruncatedError):
        list(iter_stream(io.BytesIO(buf), want=lambda e: True))


def test_scanning_10k_entries_is_fast() -> None:
    buf = write_newc(CpioMember(f"lib/modules/file{i}.ko", b"x" * (i % 13)) for i in range(10_000))
    t0 = time.perf_counter()
    count = sum(1 for _ in iter_archive(buf))
    elapsed = time.perf_counter() - t0
    assert count == 10_001
    assert elapsed < 1.0, f"{elapsed:.3f}s for 10k entries"


# --------------------------------------------------------------------------
# Against GNU cpio
# --------------------------------------------------------------------------

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")


def make_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "odd.txt").write_bytes(b"seven b")
    (root / "etc" / "empty").write_bytes(b"")
    (root / "etc" / "four").write_bytes(b"four")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(bytes(range(256)) * 3 + b"\x01")
    (root / "bin" / "tool").chmod(0o755)
    (root / "link").symlink_to("etc/odd.txt")


def gnu_cpio_archive(root: Path, fmt: str) -> bytes:
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    done = subprocess.run(
        ["cpio", "-o", "-H", fmt, "--quiet"],
        cwd=root,
        input="\n".join(names).encode() + b"\n",
        capture_output=True,
        check=True,
    )
    return done.stdout


@needs_cpio
@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["newc", "crc", "odc"])
def test_reads_gnu_cpio_archives(tmp_path: Path, fmt: str) -> None:
    root = tmp_path / "tree"
    make_tree(root)
    buf = gnu_cpio_archive(root, fmt)
    entries = list(iter_archive(buf, source=f"{fmt}.cpio"))
    assert entries[-1].is_trailer
    listed = {e.name: e for e in entries[:-1]}
    expected = {str(p.relative_to(root)) for p in root.rglob("*")}
    assert set(listed) == expected
    for name, e in listed.items():
        st_ = os.lstat(root / name)
        assert e.mode == st_.st_mode, name
        assert e.format.value == {"newc": "070701", "crc": "070702", "odc": "070707"}[fmt]
        if e.is_symlink:
            assert bytes(entry_data(buf, e)) == os.readlink(root / name).encode()
        elif e.is_regular:
            assert e.filesize == st_.st_size
            assert bytes(entry_data(buf, e)) == (root / name).read_bytes()
            if fmt == "crc":
                assert e.check == cpio_checksum((root / name).read_bytes())
        else:
            assert e.is_dir and e.filesize == 0
    listing = subprocess.run(
        ["cpio", "-i", "-t", "--quiet"], input=buf, capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == [e.name for e in entries[:-1]]
    # GNU cpio pads to 512-byte blocks: the walk sees the archive, then padding.
    assert walk(buf) == [
        (SegmentKind.CPIO, 0, entries[-1].end),
        *([(SegmentKind.PADDING, entries[-1].end, len(buf))] if len(buf) > entries[-1].end else []),
    ]
    streamed = list(iter_stream(io.BytesIO(buf), want=lambda e: e.is_regular))
    assert [e for e, _ in streamed] == entries


@needs_cpio
@pytest.mark.integration
def test_gnu_cpio_reads_our_archives(tmp_path: Path) -> None:
    files = {
        "kernel/x86/microcode/GenuineIntel.bin": bytes(range(256)) * 5 + b"odd",
        "init": b"#!/bin/sh\nexec /bin/sh\n",
        "empty": b"",
        "one": b"1",
    }
    members = [CpioMember.directory("kernel"), CpioMember.directory("kernel/x86"),
               CpioMember.directory("kernel/x86/microcode")]  # fmt: skip
    members += [CpioMember(name, data) for name, data in files.items()]
    members.append(CpioMember.symlink("sbin", "init"))
    buf = write_newc(members, align=512)
    listing = subprocess.run(
        ["cpio", "-i", "-t", "--quiet"], input=buf, capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == [m.name for m in members]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames"],
        cwd=out,
        input=buf,
        check=True,
    )
    for name, data in files.items():
        assert (out / name).read_bytes() == data
        assert (out / name).stat().st_mode == 0o100644
    assert (out / "kernel" / "x86").is_dir()
    assert os.readlink(out / "sbin") == "init"


@needs_cpio
@pytest.mark.integration
def test_real_microcode_files_in_a_gnu_cpio_archive(tmp_path: Path, shared_data: Path) -> None:
    intel = shared_data / "microcode" / "intel"
    blobs = sorted(p for p in intel.rglob("*") if p.is_file() and "-" in p.name)
    assert blobs
    root = tmp_path / "tree"
    (root / "kernel/x86/microcode").mkdir(parents=True)
    target = root / "kernel/x86/microcode/GenuineIntel.bin"
    target.write_bytes(b"".join(p.read_bytes() for p in blobs))
    buf = gnu_cpio_archive(root, "newc")
    found = find_early(buf, "kernel/x86/microcode/GenuineIntel.bin")
    assert found is not None and bytes(entry_data(buf, found)) == target.read_bytes()
    crc = gnu_cpio_archive(root, "crc")
    entry = next(e for e in iter_archive(crc) if e.is_regular)
    assert entry.check == cpio_checksum(target.read_bytes())
    assert struct.unpack_from("<I", crc, entry.data_offset)[0] == 1  # header version 1
