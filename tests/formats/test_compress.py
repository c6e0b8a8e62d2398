"""Tests of formats.compress: magic detection, streaming decompression of real tools' output."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import tracemalloc
from collections.abc import Callable

import lz4.block
import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenlab.errors import FormatError, TruncatedError
from xenlab.formats import cpio
from xenlab.formats.compress import Compression, DecompressedStream, detect, open_stream
from xenlab.formats.cpio import CpioMember, SegmentKind, iter_stream, next_segment, write_newc

# The command lines distributions use (mkinitramfs, dracut), per format.
TOOLS: dict[Compression, list[str]] = {
    Compression.GZIP: ["gzip", "-n", "-9", "-c"],
    Compression.BZIP2: ["bzip2", "-9", "-c"],
    Compression.XZ: ["xz", "--check=crc32", "-c"],
    Compression.LZMA: ["lzma", "-9", "-c"],
    Compression.ZSTD: ["zstd", "-q", "-19", "-c"],
    Compression.LZ4_LEGACY: ["lz4", "-q", "-9", "-l", "-c"],
    Compression.LZ4_FRAME: ["lz4", "-q", "-9", "-c"],
}
FORMATS = list(TOOLS)


def compress(fmt: Compression, data: bytes) -> bytes:
    tool = TOOLS[fmt]
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} not installed")
    return subprocess.run(tool, input=data, capture_output=True, check=True).stdout


def members() -> list[CpioMember]:
    return [
        CpioMember.directory("usr"),
        CpioMember.directory("usr/bin"),
        CpioMember("usr/bin/tool", bytes(range(256)) * 300 + b"odd", mode=0o100755),
        CpioMember("etc/empty"),
        CpioMember.symlink("bin", "usr/bin"),
        CpioMember("init", b"#!/bin/sh\nexec switch_root /root /sbin/init\n"),
    ]


ARCHIVE = write_newc(members(), align=512)


def read_back(buf: bytes, offset: int, fmt: Compression) -> tuple[list[tuple[str, bytes]], int]:
    stream = open_stream(buf, offset, fmt, source="initrd.img")
    got = [
        (e.name, d)
        for e, d in iter_stream(stream, source="initrd.img[z]", want=lambda e: e.is_regular)
        if d is not None
    ]
    # iter_stream stops at the end of the data; drain so the stream sees its end.
    assert stream.read() == b""
    assert stream.compressed_end is not None
    return got, stream.compressed_end


def expected_files() -> list[tuple[str, bytes]]:
    return [(m.name, m.data) for m in members() if m.mode & 0o170000 == 0o100000]


# --------------------------------------------------------------------------
# detect
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        ("1f8b08", Compression.GZIP),
        ("1f9e", Compression.GZIP),
        ("425a6839", Compression.BZIP2),
        ("5d00008000", Compression.LZMA),
        ("fd377a585a00", Compression.XZ),
        ("894c5a4f000d0a1a0a", Compression.LZO),
        ("02214c18", Compression.LZ4_LEGACY),
        ("04224d18", Compression.LZ4_FRAME),
        ("28b52ffd", Compression.ZSTD),
        ("5d0001", None),
        ("fd377a58", None),
        ("0707", None),
        ("", None),
        ("1f", None),
    ],
)
def test_detect_magic_table(head: str, fmt: Compression | None) -> None:
    buf = bytes.fromhex(head)
    assert detect(buf) is fmt
    assert detect(b"\0\0\0" + buf, 3) is fmt


def test_kernel_table_membership() -> None:
    assert not Compression.LZ4_FRAME.in_kernel_table
    assert all(c.in_kernel_table for c in Compression if c is not Compression.LZ4_FRAME)


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_real_tool_output(fmt: Compression) -> None:
    assert detect(compress(fmt, b"hello")) is fmt


# --------------------------------------------------------------------------
# Round trips through the real tools
# --------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("fmt", FORMATS)
def test_real_tool_output_reads_back(fmt: Compression) -> None:
    packed = compress(fmt, ARCHIVE)
    buf = b"\0" * 4 + packed + bytes(12)
    files, end = read_back(buf, 4, fmt)
    assert files == expected_files()
    assert end == 4 + len(packed)


@pytest.mark.integration
@pytest.mark.parametrize("fmt", FORMATS)
def test_stream_reads_match_the_tool(fmt: Compression) -> None:
    data = bytes(range(256)) * 4096 + b"tail"
    packed = compress(fmt, data)
    stream = open_stream(packed, 0, fmt, chunk=4096)
    assert isinstance(stream, DecompressedStream) and stream.compressed_end is None
    first = stream.read(1000)
    assert first == data[:1000] and stream.tell() == 1000
    target = bytearray(5000)
    assert stream.readinto(target) == 5000 and target == data[1000:6000]
    rest = io.BufferedReader(stream).read()
    assert first + target + rest == data
    assert stream.compressed_end == len(packed)
    stream.close()
    with pytest.raises(ValueError):
        stream.read(1)


@pytest.mark.integration
@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.in_kernel_table])
def test_initramfs_walk_early_cpio_compressed_cpio_padding(fmt: Compression) -> None:
    early = write_newc(
        [
            CpioMember.directory("kernel"),
            CpioMember("kernel/x86/microcode/GenuineIntel.bin", b"\x01\0\0\0" + b"U" * 61),
        ],
        align=512,
    )
    packed = compress(fmt, ARCHIVE)
    buf = early + packed + bytes(64)
    kinds = []
    files: list[tuple[str, bytes]] = []
    offset = 0
    while (seg := next_segment(buf, offset, source="initrd.img")) is not None:
        kinds.append(seg.kind)
        if seg.kind is SegmentKind.COMPRESSED:
            assert seg.compression is fmt and seg.end is None
            got, end = read_back(buf, seg.offset, fmt)
            files += got
            offset = end
        else:
            assert seg.end is not None
            offset = seg.end
    assert kinds == [
        SegmentKind.CPIO,
        SegmentKind.PADDING,
        SegmentKind.COMPRESSED,
        SegmentKind.PADDING,
    ]
    assert files == expected_files()
    assert offset == len(buf)


@pytest.mark.integration
def test_walk_two_compressed_streams_back_to_back() -> None:
    a = compress(Compression.GZIP, write_newc([CpioMember("a", b"A")]))
    b = compress(Compression.ZSTD, write_newc([CpioMember("b", b"B")]))
    buf = a + b
    first = next_segment(buf, 0)
    assert first is not None and first.compression is Compression.GZIP
    files, end = read_back(buf, 0, Compression.GZIP)
    assert files == [("a", b"A")] and end == len(a)
    second = next_segment(buf, end)
    assert second is not None and second.compression is Compression.ZSTD
    assert read_back(buf, end, Compression.ZSTD) == ([("b", b"B")], len(buf))


@pytest.mark.integration
def test_gzip_trailing_data_is_left_to_the_walk() -> None:
    packed = compress(Compression.GZIP, ARCHIVE)
    buf = packed + b"trailing junk"
    files, end = read_back(buf, 0, Compression.GZIP)
    assert files == expected_files() and end == len(packed)
    seg = next_segment(buf, end)
    assert seg is not None and seg.kind is SegmentKind.UNKNOWN and seg.offset == len(packed)


# --------------------------------------------------------------------------
# LZ4 legacy, by hand (lib/decompress_unlz4.c)
# --------------------------------------------------------------------------

LZ4_MAGIC = struct.pack("<I", 0x184C2102)


def lz4_legacy(*chunks: bytes) -> bytes:
    out = b""
    for chunk in chunks:
        block = lz4.block.compress(chunk, store_size=False)
        out += struct.pack("<I", len(block)) + block
    return out


def test_lz4_legacy_blocks_and_end_at_eof() -> None:
    buf = LZ4_MAGIC + lz4_legacy(b"a" * 100, b"b" * 50)
    stream = open_stream(buf, 0, Compression.LZ4_LEGACY)
    assert stream.read() == b"a" * 100 + b"b" * 50
    assert stream.compressed_end == len(buf)


def test_lz4_legacy_magic_mid_stream_continues_it() -> None:
    one = LZ4_MAGIC + lz4_legacy(b"first")
    two = LZ4_MAGIC + lz4_legacy(b"second")
    stream = open_stream(one + two, 0, Compression.LZ4_LEGACY)
    assert stream.read() == b"firstsecond"
    assert stream.compressed_end == len(one + two)


def test_lz4_legacy_zero_size_and_short_tail_end_the_stream() -> None:
    body = LZ4_MAGIC + lz4_legacy(b"x" * 10)
    padded = body + bytes(16)
    stream = open_stream(padded, 0, Compression.LZ4_LEGACY)
    assert stream.read() == b"x" * 10 and stream.compressed_end == len(body)
    short = body + b"\x07\x07"
    stream = open_stream(short, 0, Compression.LZ4_LEGACY)
    assert stream.read() == b"x" * 10 and stream.compressed_end == len(body)


def test_lz4_legacy_errors() -> None:
    too_big = LZ4_MAGIC + struct.pack("<I", 0x30373037) + b"0701"
    with pytest.raises(FormatError) as err:
        open_stream(too_big, 0, Compression.LZ4_LEGACY).read()
    assert (err.value.field, err.value.offset) == ("lz4 block size", 4)
    truncated = (LZ4_MAGIC + lz4_legacy(b"y" * 1000))[:-3]
    with pytest.raises(TruncatedError) as terr:
        open_stream(truncated, 0, Compression.LZ4_LEGACY).read()
    assert (terr.value.field, terr.value.offset) == ("lz4 block", 8)
    corrupt = LZ4_MAGIC + struct.pack("<I", 4) + b"\xff\xff\xff\xff"
    with pytest.raises(FormatError) as err:
        open_stream(corrupt, 0, Compression.LZ4_LEGACY).read()
    assert (err.value.field, err.value.offset) == ("lz4 block", 4)


# --------------------------------------------------------------------------
# Bounded memory
# --------------------------------------------------------------------------

BIG = 50 << 20


@pytest.fixture(scope="module")
def big_archive() -> bytes:
    return write_newc([CpioMember("big.img", bytes(BIG)), CpioMember("after", b"ok")])


@pytest.mark.integration
@pytest.mark.parametrize(
    "fmt",
    [Compression.GZIP, Compression.XZ, Compression.ZSTD, Compression.LZ4_LEGACY,
     Compression.LZ4_FRAME, Compression.BZIP2],
)  # fmt: skip
def test_50_mib_output_in_bounded_memory(big_archive: bytes, fmt: Compression) -> None:
    packed = compress(fmt, big_archive)
    tracemalloc.start()
    try:
        stream = open_stream(packed, 0, fmt)
        seen = [
            (e.name, e.filesize, d)
            for e, d in iter_stream(stream, want=lambda e: e.name == "after")
        ]
        assert stream.read() == b""
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == [("big.img", BIG, None), ("after", 2, b"ok"), ("TRAILER!!!", 0, None)]
    assert stream.compressed_end == len(packed)
    # One chunk of output and input plus the decoder's own state, far below 50 MiB:
    # xz's 8 MiB dictionary (liblzma allocates through Python, so it is counted),
    # LZ4 legacy's 8 MiB block (the library's buffer and the bytes made from it).
    limit = {Compression.XZ: 16 << 20, Compression.LZ4_LEGACY: 20 << 20}.get(fmt, 8 << 20)
    assert peak < limit, f"peak {peak / 2**20:.1f} MiB"


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def drain(buf: bytes, fmt: Compression, offset: int = 0) -> None:
    stream = open_stream(buf, offset, fmt, chunk=1024)
    while stream.read(1 << 16):
        pass


@pytest.mark.integration
@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_stream_raises_with_offset(fmt: Compression) -> None:
    packed = compress(fmt, ARCHIVE)
    cut = packed[: len(packed) - 20] if fmt is not Compression.LZ4_LEGACY else packed[:-5]
    with pytest.raises(FormatError) as err:
        drain(cut, fmt)
    assert 0 <= err.value.offset <= len(cut)
    assert str(err.value).startswith(f"<data>+{err.value.offset:#x}: ")


@pytest.mark.integration
@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_stream_raises_with_offset(fmt: Compression) -> None:
    data = bytes(range(256)) * 2000
    packed = bytearray(compress(fmt, data))
    middle = len(packed) // 2
    packed[middle : middle + 8] = b"\xa5\x5a\x00\xff\x13\x37\x00\x99"
    try:
        stream = open_stream(bytes(packed), 0, fmt, chunk=4096)
        out = stream.read()
    except FormatError as err:
        assert 0 <= err.offset <= len(packed)
        assert err.field in {"gzip", "bzip2", "lzma", "xz", "lz4 frame", "zstd",
                                   "lz4 block", "lz4 block size", "zstd block header",
                                   "zstd block"}  # fmt: skip
    else:
        # Only formats without a checksum may decode garbage; never the same data.
        assert fmt in {Compression.LZMA, Compression.LZ4_LEGACY, Compression.ZSTD}
        assert out != data


def test_lzo_is_detected_but_not_supported() -> None:
    buf = bytes.fromhex("894c5a4f000d0a1a0a") + bytes(40)
    with pytest.raises(FormatError) as err:
        open_stream(buf, 0, Compression.LZO, source="initrd.img")
    assert "lzo-compressed data is not supported" in str(err.value)
    assert str(err.value).startswith("initrd.img+0x0: lzo: ")


def test_wrong_magic_for_the_format() -> None:
    with pytest.raises(FormatError) as err:
        open_stream(b"\0\0BZh91AY", 2, Compression.GZIP)
    assert (err.value.field, err.value.offset) == ("magic", 2)
    assert "bzip2" in str(err.value)


def test_empty_after_magic() -> None:
    for fmt, magic in [
        (Compression.GZIP, "1f8b"),
        (Compression.ZSTD, "28b52ffd"),
        (Compression.XZ, "fd377a585a00"),
    ]:
        with pytest.raises(FormatError):
            drain(bytes.fromhex(magic), fmt)


MAGIC_OF = {
    Compression.GZIP: bytes.fromhex("1f8b08"),
    Compression.BZIP2: b"BZh9",
    Compression.LZMA: bytes.fromhex("5d0000"),
    Compression.XZ: bytes.fromhex("fd377a585a00"),
    Compression.LZ4_LEGACY: LZ4_MAGIC,
    Compression.LZ4_FRAME: bytes.fromhex("04224d18"),
    Compression.ZSTD: bytes.fromhex("28b52ffd"),
}


@given(st.sampled_from(sorted(MAGIC_OF, key=lambda c: c.value)), st.binary(max_size=300))
def test_random_data_after_a_magic_raises_only_format_errors(fmt: Compression, tail: bytes) -> None:
    buf = MAGIC_OF[fmt] + tail
    try:
        stream = open_stream(buf, 0, fmt, chunk=64)
        while stream.read(4096):
            pass
    except FormatError as err:
        assert 0 <= err.offset <= len(buf)
    else:
        assert stream.compressed_end is not None and stream.compressed_end <= len(buf)


@given(st.integers(0, 400), st.binary(min_size=1, max_size=3))
def test_mutated_zstd_raises_only_format_errors(at: int, patch: bytes) -> None:
    import zstandard

    packed = zstandard.ZstdCompressor(write_checksum=True).compress(ARCHIVE)
    at %= len(packed)
    buf = packed[:at] + patch + packed[at + len(patch) :]
    walk_all(buf)


def walk_all(buf: bytes) -> None:
    """The whole walk on ``buf``: only FormatError may come out."""
    offset = 0
    try:
        while (seg := next_segment(buf, offset)) is not None:
            if seg.kind is SegmentKind.COMPRESSED:
                assert seg.compression is not None
                stream = open_stream(buf, seg.offset, seg.compression)
                for _ in cpio.iter_stream(stream):
                    pass
                stream.read()
                assert stream.compressed_end is not None
                offset = stream.compressed_end
            else:
                assert seg.end is not None
                offset = seg.end
            if offset == seg.offset:
                break
    except FormatError:
        pass


@given(st.binary(max_size=200))
def test_random_walks_raise_only_format_errors(tail: bytes) -> None:
    for magic in MAGIC_OF.values():
        walk_all(magic + tail)


def test_compressors_by_python_libraries_without_tools() -> None:
    """The same reads with data compressed in-process, for machines without the tools."""
    import bz2
    import gzip
    import lzma

    import lz4.frame
    import zstandard

    makers: dict[Compression, Callable[[bytes], bytes]] = {
        Compression.GZIP: lambda d: gzip.compress(d, mtime=0),
        Compression.BZIP2: bz2.compress,
        Compression.XZ: lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
        Compression.LZMA: lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
        Compression.ZSTD: zstandard.ZstdCompressor().compress,
        Compression.LZ4_FRAME: lz4.frame.compress,
        Compression.LZ4_LEGACY: lambda d: LZ4_MAGIC + lz4_legacy(d),
    }
    for fmt, make in makers.items():
        packed = make(ARCHIVE)
        files, end = read_back(packed + bytes(8), 0, fmt)
        assert files == expected_files(), fmt
        assert end == len(packed), fmt
