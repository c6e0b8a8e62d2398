"""Arbitrary and mutated bytes: readers raise only FormatError, finders only LimitError.

Also the stream side: random data behind compression magics stays within
its output limit, and cpio archives with huge fields keep names under PATH_MAX.
"""

from __future__ import annotations

import contextlib
import io
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from xenlab.errors import FormatError, ParseError
from xenlab.formats import amd_ucode, cpio, intel_ucode
from xenlab.formats.buffer import Buffer
from xenlab.formats.compress import Compression, open_stream

INTEL = intel_ucode.build_update(
    signature=0x906A3,
    revision=0x43A,
    platform_mask=0x80,
    payload=bytes(range(256)) * 7 + bytes(2048 - 48 - 44 - 1792),
    ext=[(0x906A3, 0x80), (0x906A4, 0x80)],
)
AMD = amd_ucode.build_container(
    [amd_ucode.EquivEntry(0x800F12, 0, 0, 0x8012)],
    [
        amd_ucode.build_patch(patch_id=0x8001227, processor_rev_id=0x8012, body=bytes(200)),
        amd_ucode.build_patch(
            patch_id=0x1000083, processor_rev_id=0x1022, body=bytes(range(96)), data_len=0x20
        ),
    ],
)
INTERESTING = [0, 1, 0x30, 0x400, 0x7D0, 0x800, 0xFFFFFFFF, 0xFFFFFC00, 0x7FFFFFFF, 0x80000000]


def _strict_intel(buf: Buffer, offset: int, end: int | None) -> None:
    with contextlib.suppress(FormatError):
        intel_ucode.parse_update(buf, offset)
    try:
        for u in intel_ucode.iter_updates(buf, offset, end):
            assert u.offset + u.total_size <= len(memoryview(buf))
    except FormatError:
        pass
    found = list(intel_ucode.find_updates(buf, offset, end))
    assert all(u.offset >= 0 and u.end <= len(memoryview(buf)) for u in found)


def _strict_amd(buf: Buffer, offset: int, end: int | None) -> None:
    with contextlib.suppress(FormatError):
        amd_ucode.parse_container(buf, offset)
    try:
        for c in amd_ucode.iter_containers(buf, offset, end):
            assert c.end <= len(memoryview(buf))
    except FormatError:
        pass
    for c in amd_ucode.find_containers(buf, offset, end):
        assert all(p.end <= c.end for p in c.patches)


@given(
    data=st.binary(max_size=3000),
    offset=st.integers(-4, 3100),
    end=st.none() | st.integers(-4, 3100),
)
def test_random_bytes(data: bytes, offset: int, end: int | None) -> None:
    for buf in (data, bytearray(data), memoryview(data)):
        _strict_intel(buf, offset, end)
        _strict_amd(buf, offset, end)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    out = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["byte", "dword", "truncate", "insert"]))
        if not out:
            break
        pos = draw(st.integers(0, len(out) - 1))
        if kind == "byte":
            out[pos] = draw(st.integers(0, 255))
        elif kind == "dword" and pos + 4 <= len(out):
            struct.pack_into("<I", out, pos & ~3, draw(st.sampled_from(INTERESTING)))
        elif kind == "truncate":
            del out[pos:]
        else:
            out[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    prefix = draw(st.binary(max_size=5))
    return prefix + bytes(out) + draw(st.binary(max_size=5))


@given(blob=mutated(INTEL + INTEL))
def test_mutated_intel_bundle(blob: bytes) -> None:
    _strict_intel(blob, 0, None)
    _strict_amd(blob, 0, None)


@given(blob=mutated(AMD + AMD))
def test_mutated_amd_containers(blob: bytes) -> None:
    _strict_amd(blob, 0, None)
    _strict_intel(blob, 0, None)


@given(
    junk=st.binary(max_size=64),
    cut=st.integers(0, len(INTEL) + len(AMD)),
)
def test_slices_never_read_past_the_view(junk: bytes, cut: int) -> None:
    """A view of part of a buffer parses like a copy of that part: nothing past it is read."""
    whole = INTEL + AMD + junk
    view = memoryview(whole)[:cut]
    copy = whole[:cut]
    assert list(intel_ucode.find_updates(view)) == list(intel_ucode.find_updates(copy))
    assert list(amd_ucode.find_containers(view)) == list(amd_ucode.find_containers(copy))
    for fn in (intel_ucode.parse_update, amd_ucode.parse_container):
        outcomes = []
        for buf in (view, copy):
            try:
                outcomes.append(repr(fn(buf, 0)))
            except FormatError as err:
                outcomes.append(str(err))
        assert outcomes[0] == outcomes[1]


DAT_PIECES = [*"0x1fF, \t\n/*gz\x00", "0x", "/*", "*/", "//", "0xffffffff", "0x100000000"]


@given(text=st.lists(st.sampled_from(DAT_PIECES)).map("".join))
def test_parse_dat_random_text(text: str) -> None:
    try:
        out = intel_ucode.parse_dat(text)
    except ParseError as err:
        assert err.line >= 1 and err.col >= 1
    else:
        assert len(out) % 4 == 0


# ------------------------------------------ streams, names and limits (issue item 13)

STREAM_MAGICS = [
    (bytes.fromhex("1f8b08"), Compression.GZIP),
    (b"BZh9", Compression.BZIP2),
    (bytes.fromhex("fd377a585a00"), Compression.XZ),
    (bytes.fromhex("5d0000"), Compression.LZMA),
    (bytes.fromhex("28b52ffd"), Compression.ZSTD),
    (bytes.fromhex("02214c18"), Compression.LZ4_LEGACY),
    (bytes.fromhex("04224d18"), Compression.LZ4_FRAME),
]


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(STREAM_MAGICS),
    tail=st.binary(max_size=600),
    limit=st.integers(0, 1 << 20),
)
def test_streams_stay_within_their_limit(
    kind: tuple[bytes, Compression], tail: bytes, limit: int
) -> None:
    """Random bytes behind a magic: only FormatError (LimitError among them), never more
    than ``limit`` bytes out, and ``decompressed`` counts at most one block past it."""
    magic, compression = kind
    total = 0
    stream = None
    try:
        stream = open_stream(magic + tail, 0, compression, limit=limit)
        while chunk := stream.read(1 << 16):
            total += len(chunk)
    except FormatError:
        pass
    assert total <= limit
    if stream is not None:
        assert stream.decompressed <= limit + (8 << 20) + 1


NEWC_FIELD = st.sampled_from([b"FFFFFFFF", b"7FFFFFFF", b"00001001", b"00000000", b"0000000A"])


@st.composite
def newc_with_fields(draw: st.DrawFn) -> bytes:
    members = [cpio.CpioMember(n, d) for n, d in (("a", b"x" * 5), ("intel-ucode/x", INTEL[:64]))]
    out = bytearray(cpio.write_newc(members))
    headers = [i for i in range(0, len(out), 4) if out.startswith(b"070701", i)][:2]
    for _ in range(draw(st.integers(1, 3))):
        entry = draw(st.sampled_from(headers))
        field = draw(st.integers(1, 12))
        out[entry + 6 + 8 * field : entry + 14 + 8 * field] = draw(NEWC_FIELD)
    return bytes(out[: draw(st.integers(0, len(out)))]) + bytes(draw(st.integers(0, 64)))


@settings(max_examples=300, deadline=None)
@given(data=newc_with_fields())
def test_archives_with_huge_fields(data: bytes) -> None:
    """Buffers and streams alike: only FormatError, names never longer than PATH_MAX."""
    with contextlib.suppress(FormatError):
        for entry in cpio.iter_archive(data):
            assert len(entry.name) <= cpio.PATH_MAX
    with contextlib.suppress(FormatError):
        for entry, got in cpio.iter_stream(io.BytesIO(data), want=lambda e: e.filesize < 4096):
            assert len(entry.name) <= cpio.PATH_MAX
            assert got is None or len(got) == entry.filesize
    found = cpio.find_early(data, "intel-ucode/")
    assert found is None or len(found.name) <= cpio.PATH_MAX
