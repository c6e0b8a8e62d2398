"""Issue item 13: what the format readers spend is bounded, whatever the fields claim.

Each test builds its bomb by hand (tests/ucode/builders.py), then checks
the bound with a number: bytes handed out, bytes traced by tracemalloc,
seconds, or the offset and field a ``LimitError`` names.  The readers are
driven directly; tests/ucode/test_bombs.py drives the scan and the CLI.
"""

from __future__ import annotations

import io
import lzma
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import TypeVar

import pytest

from tests.ucode import builders as b
from xenlab.errors import FormatError, TruncatedError
from xenlab.formats import amd_ucode, cpio, intel_ucode
from xenlab.formats.compress import (
    DECODER_MEMORY,
    DEFAULT_LIMIT,
    Compression,
    LimitError,
    detect,
    open_stream,
)

T = TypeVar("T")
MiB = 1 << 20


def traced(fn: Callable[[], T]) -> tuple[T, int]:
    """``fn()`` and the peak bytes Python allocated while it ran."""
    tracemalloc.start()
    try:
        out = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return out, peak


# ------------------------------------------------------- decompression limit


@pytest.mark.parametrize("name", b.BOMB_COMPRESSIONS)
def test_stream_stops_at_its_limit(name: str) -> None:
    """Exactly ``limit`` bytes come out, then LimitError at the stream's offset, every read."""
    data = b"\0" * 8 + b.bomb(name, [b"x" * 100, (0, 40 * MiB)])
    stream = open_stream(data, 8, detect(data, 8) or Compression.GZIP, source="i.img",
                         limit=8 * MiB)  # fmt: skip
    got = 0
    with pytest.raises(LimitError) as exc:
        while chunk := stream.read(MiB):
            got += len(chunk)
    assert got == 8 * MiB
    err = exc.value
    assert (err.source, err.offset, err.limit) == ("i.img", 8, 8 * MiB)
    assert str(err).startswith("i.img+0x8: ") and "more than 8 MiB" in str(err)
    # lz4 legacy blocks are 8 MiB: the decoder may go one block past.
    assert 8 * MiB < stream.decompressed <= 16 * MiB + 1
    with pytest.raises(LimitError):
        stream.read(1)


@pytest.mark.parametrize("name", b.BOMB_COMPRESSIONS)
def test_stream_within_its_limit_ends_normally(name: str) -> None:
    data = b.bomb(name, [b"y" * 10, (0, 3 * MiB)])
    stream = open_stream(data, 0, detect(data, 0) or Compression.GZIP, limit=3 * MiB + 10)
    assert stream.read() == b"y" * 10 + bytes(3 * MiB)
    assert stream.compressed_end == len(data)
    assert stream.decompressed == 3 * MiB + 10


def test_default_limit_and_none() -> None:
    assert DEFAULT_LIMIT == 1 << 30
    data = b.zstd_frame([(0, 2 * MiB)])
    assert open_stream(data, 0, Compression.ZSTD).limit == DEFAULT_LIMIT
    stream = open_stream(data, 0, Compression.ZSTD, limit=None)
    assert len(stream.read()) == 2 * MiB
    with pytest.raises(ValueError, match="negative"):
        open_stream(data, 0, Compression.ZSTD, limit=-1)


def test_default_limit_stops_a_gigabyte_zstd_bomb_quickly() -> None:
    """48 KB of zstd RLE blocks claiming 1.5 GiB: read through, bounded by 1 GiB."""
    data = b.zstd_frame([(0, 3 << 29)])
    assert len(data) < 50_000
    stream = open_stream(data, 0, Compression.ZSTD)
    start = time.perf_counter()

    def drain() -> int:
        n = 0
        with pytest.raises(LimitError):
            while chunk := stream.read(MiB):
                n += len(chunk)
        return n

    n, peak = traced(drain)
    assert n == 1 << 30
    assert time.perf_counter() - start < 20
    assert peak < 8 * MiB, peak


# ----------------------------------------------------- decoder history sizes


def test_zstd_window_over_the_decoder_limit() -> None:
    """A window descriptor asking for 2 GiB is refused before anything is allocated."""
    frame = bytearray(b.zstd_frame([b"abc"]))
    frame[5] = (31 - 10) << 3  # window log 31
    with pytest.raises(LimitError) as exc:
        open_stream(bytes(frame), 0, Compression.ZSTD, source="z")
    assert exc.value.field == "zstd window" and exc.value.limit == DECODER_MEMORY
    assert str(exc.value).startswith("z+0x0: zstd window: 0x80000000 bytes")


def test_zstd_single_segment_content_size_is_the_window() -> None:
    # Single segment, 8-byte content size of 1 TiB, then a raw last block.
    frame = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", 1 << 40)
    frame += struct.pack("<I", (3 << 3) | 1)[:3] + b"abc"
    with pytest.raises(LimitError, match="zstd window"):
        open_stream(frame, 0, Compression.ZSTD)


def test_zstd_window_at_the_limit_is_fine() -> None:
    frame = bytearray(b.zstd_frame([b"abc"]))
    frame[5] = (27 - 10) << 3  # 128 MiB, zstd's own default cap
    assert open_stream(bytes(frame), 0, Compression.ZSTD).read() == b"abc"


def test_lzma_dictionary_over_the_decoder_limit() -> None:
    data = bytearray(lzma.compress(b"abc", format=lzma.FORMAT_ALONE))
    struct.pack_into("<I", data, 1, 1 << 30)
    with pytest.raises(LimitError) as exc:
        open_stream(bytes(data), 0, Compression.LZMA, source="l")
    assert (exc.value.offset, exc.value.field) == (1, "lzma dictionary")
    assert "0x40000000 bytes" in str(exc.value)


def test_xz_dictionary_over_the_decoder_limit() -> None:
    """The LZMA2 dictionary byte of the block header patched to 4 GiB (CRC32 redone)."""
    data = bytearray(lzma.compress(b"abc" * 100, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32))
    hdr_at = 12
    hdr_size = (data[hdr_at] + 1) * 4
    props = data.index(b"\x21\x01", hdr_at, hdr_at + hdr_size) + 2
    data[props] = 40  # dictionary 4 GiB - 1
    crc_at = hdr_at + hdr_size - 4
    struct.pack_into("<I", data, crc_at, zlib.crc32(bytes(data[hdr_at:crc_at])))
    stream = open_stream(bytes(data), 0, Compression.XZ, source="x")
    with pytest.raises(LimitError) as exc:
        stream.read()
    assert exc.value.field == "xz" and "decoder memory" in str(exc.value)


# ------------------------------------------------------------- cpio names


class ZeroTail(io.RawIOBase):
    """``head``, ``size`` zeros, then ``tail``, produced as read, counting what was read."""

    def __init__(self, head: bytes, size: int, tail: bytes = b"") -> None:
        super().__init__()
        self._head = head
        self._left = size
        self._tail = tail
        self.pos = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1, /) -> bytes:
        out = self._head[:n]
        self._head = self._head[len(out) :]
        zeros = min(n - len(out), self._left)
        self._left -= zeros
        tail = self._tail[: n - len(out) - zeros] if not self._left else b""
        self._tail = self._tail[len(tail) :]
        self.pos += len(out) + zeros + len(tail)
        return out + bytes(zeros) + tail


HEADERS: dict[str, Callable[..., bytes]] = {
    "newc": b.newc_header,
    "crc": lambda *a, **k: b.newc_header(*a, magic=b"070702", **k),
    "odc": b.odc_header,
}


@pytest.mark.parametrize("fmt", sorted(HEADERS))
def test_stream_name_over_path_max_is_not_read(fmt: str) -> None:
    """namesize claims 48 MiB: the entry comes out flagged after 4 KiB, then the rest is skipped."""
    claim = 48 * MiB if fmt != "odc" else 0o777777  # odc's field has 6 octal digits
    name = b"kernel/x86/microcode/GenuineIntel.bin"
    head = HEADERS[fmt](name, 0, namesize=claim)
    size = 76 if fmt == "odc" else 110
    entry_end = size + claim if fmt == "odc" else (size + claim + 3) & ~3
    stream = ZeroTail(head, entry_end - len(head), b.trailer())
    it = cpio.iter_stream(stream, source="s", want=lambda e: True)
    (entry, data), peak = traced(lambda: next(it))
    assert entry.name_too_long and entry.namesize == claim and data is None
    assert entry.name == name.decode() and entry.offset == 0 and entry.end == entry_end
    assert not entry.is_trailer
    assert stream.pos <= (1 << 16) + len(head), "the name was read before the entry came out"
    assert peak < MiB, peak
    # The claimed name is skipped in bounded reads; the walk goes on after it.
    rest, peak = traced(lambda: [(e.name, e.offset) for e, _ in it])
    assert rest == [("TRAILER!!!", entry_end)] and peak < 4 * MiB, peak


def test_stream_long_name_that_reads_as_the_trailer_is_not_one() -> None:
    name = b"TRAILER!!!"
    entry_bytes = b.newc_header(name, 0, namesize=5000) + b"\0" * (5000 - len(name))
    entry_bytes += bytes(-len(entry_bytes) % 4)
    buf = entry_bytes + b.newc_header(b"after", 2) + b"ok\0\0" + b.trailer()
    names = [(e.name, e.name_too_long) for e, _ in cpio.iter_stream(io.BytesIO(buf))]
    assert names == [("TRAILER!!!", True), ("after", False), ("TRAILER!!!", False)]


@pytest.mark.parametrize("fmt", sorted(HEADERS))
def test_stream_huge_filesize_comes_out_before_its_data(fmt: str) -> None:
    """filesize claims 4 GiB (8 GiB for odc): the caller hears of it before any data is read."""
    claim = 0xFFFFFFFF if fmt != "odc" else 0o77777777777
    head = HEADERS[fmt](b"lib/modules/huge.ko", claim)
    stream = ZeroTail(head, 8 * MiB)
    it = cpio.iter_stream(stream, source="s[gzip]", want=lambda e: e.filesize < MiB)
    entry, data = next(it)
    assert (entry.name, entry.filesize, data) == ("lib/modules/huge.ko", claim, None)
    assert stream.pos <= (1 << 16) + len(head)
    with pytest.raises(TruncatedError) as exc:
        next(it)
    assert exc.value.field == "filesize" and exc.value.source == "s[gzip]"


def test_buffer_long_name_is_skipped_and_copied_only_to_path_max() -> None:
    """In a buffer the walk goes on past the entry, as the kernel's unpacker does."""
    name = b"x" * (40 * MiB)
    first = b.newc_header(name[:10], 4, namesize=len(name) + 1) + name[10:] + b"\0"
    first += bytes(-len(first) % 4) + b"data"
    buf = bytearray(first + b.newc_header(b"after", 2) + b"ok\0\0" + b.trailer())
    entries, peak = traced(lambda: list(cpio.iter_archive(memoryview(buf), source="a.cpio")))
    assert [(e.name_too_long, len(e.name)) for e in entries] == [
        (True, cpio.PATH_MAX), (False, 5), (False, 10)]
    assert peak < MiB, peak
    seg = cpio.next_segment(buf, 0)
    assert seg is not None and len(seg.entries) == 3 and seg.end == len(buf)


def test_find_early_reads_no_more_than_path_max_of_a_name() -> None:
    want = "kernel/x86/microcode/GenuineIntel.bin"
    name = want.encode() + b"y" * (40 * MiB)
    buf = bytearray(b.newc_header(name[:40], 4, namesize=len(name) + 1) + name[40:] + b"\0")
    buf += bytes(-len(buf) % 4) + b"data" + b.trailer()
    entry, peak = traced(lambda: cpio.find_early(memoryview(buf), want))
    assert entry is not None and entry.name_too_long and entry.name.startswith(want)
    assert bytes(buf[entry.data_offset : entry.data_offset + 4]) == b"data"
    assert peak < MiB, peak


# ------------------------------------------------------ Intel size fields


def test_intel_ext_signatures_over_the_limit() -> None:
    ext = [(0x90000 + i, 1) for i in range(intel_ucode.MAX_EXT_SIGNATURES + 1)]
    upd = intel_ucode.build_update(signature=0x906A4, revision=1, platform_mask=1,
                                   payload=b"\0" * 4, ext=ext)  # fmt: skip
    with pytest.raises(LimitError) as exc:
        intel_ucode.parse_update(upd, source="u.bin")
    err = exc.value
    ext_at = struct.unpack_from("<I", upd, 28)[0] + 48
    assert (err.offset, err.field, err.limit) == (ext_at, "ext_count", 1024)
    assert isinstance(err, FormatError)
    ok = intel_ucode.build_update(signature=0x906A4, revision=1, platform_mask=1,
                                  payload=b"\0" * 4, ext=ext[:-1])  # fmt: skip
    assert len(intel_ucode.parse_update(ok).ext_signatures) == 1024


def _overlapping_intel(size: int, total: int) -> bytes:
    """A header repeated every 48 bytes, each claiming ``total`` bytes, checksums wrong."""
    head = struct.pack("<12I", 1, 1, 0x01012020, 0x906A4, 0x1234, 1, 1, total - 48, total,
                       0, 0, 0)  # fmt: skip
    return (head * (size // 48 + 1))[:size]


def test_intel_search_over_overlapping_candidates_is_bounded() -> None:
    """1 MiB candidates every 48 bytes of 4 MiB: about 87,000 of them, 85 GB to sum."""
    data = _overlapping_intel(4 * MiB, MiB)
    start = time.perf_counter()
    found = []
    with pytest.raises(LimitError) as exc:
        for upd in intel_ucode.find_updates(data, source="d.bin"):
            found.append(upd)
    assert time.perf_counter() - start < 10
    err = exc.value
    # 8 x 4 MiB + 64 MiB of summing, a MiB a candidate: the 97th passes it.
    assert len(found) == 97 and err.offset == 96 * 48 and err.field == "search"
    assert err.limit == 8 * 4 * MiB + 64 * MiB
    assert f"({96 * 48 + 1:#x}..{4 * MiB:#x}) is not searched" in str(err)


def test_intel_search_over_rejected_candidates_is_linear() -> None:
    """A candidate every 48 bytes that breaks a size rule: 4 MiB took 23 s (the zero-chunk
    check rescanned its chunk after each), and each still costs an exception."""
    head = struct.pack("<12I", 1, 1, 0x01012020, 0x906A4, 0x1234, 1, 1, 1, 1024, 0, 0, 0)
    data = b.INTEL_OLD + (head * (16 * MiB // 48 + 1))[: 16 * MiB]
    start = time.perf_counter()
    found = []
    with pytest.raises(LimitError) as exc:
        found.extend(intel_ucode.find_updates(data, source="d.bin"))
    assert time.perf_counter() - start < 5
    assert [u.revision for u in found] == [0x10]
    # 4 KiB a rejection against 8 x 16 MiB + 64 MiB: about 49,000 of them (the
    # header holds three candidates), in the first MiB.
    assert exc.value.offset < MiB and exc.value.limit == 8 * len(data) + 64 * MiB


def test_intel_search_work_is_a_parameter() -> None:
    data = _overlapping_intel(64 * 1024, 32 * 1024)
    with pytest.raises(LimitError):
        list(intel_ucode.find_updates(data, work=100_000))
    assert len(list(intel_ucode.find_updates(data, work=None))) > 100


def test_intel_search_is_linear_in_real_data() -> None:
    """Valid updates are jumped over whole: 32 MiB of them sums each byte once."""
    data = (b.INTEL_OLD + b.INTEL_PF40) * (8 * MiB // 2048)
    start = time.perf_counter()
    assert sum(1 for _ in intel_ucode.find_updates(data)) == 8 * MiB // 1024
    assert time.perf_counter() - start < 20


# ------------------------------------------------------- AMD size fields


def _equiv(n: int) -> list[amd_ucode.EquivEntry]:
    return [amd_ucode.EquivEntry(0x800F00 + i, 0, 0, 0x8012) for i in range(n)]


def test_amd_equivalence_table_over_the_limit() -> None:
    over = amd_ucode.build_container(_equiv(1025), [], terminator=False)
    with pytest.raises(LimitError) as exc:
        amd_ucode.parse_container(over, source="a.bin")
    assert (exc.value.offset, exc.value.field) == (12, "equivalence table")
    ok = amd_ucode.build_container(_equiv(1024), [])
    assert len(amd_ucode.parse_container(ok).equiv_table) == 1024


def test_amd_long_table_after_its_terminator_is_free() -> None:
    """Only entries before the terminator count; a long zero tail is not read as entries."""
    table = _equiv(3)
    data = bytearray(amd_ucode.build_container(table, []))
    struct.pack_into("<I", data, 8, len(data) - 12 + 16 * 100_000)
    data += bytes(16 * 100_000)
    cont, peak = traced(lambda: amd_ucode.parse_container(data))
    assert len(cont.equiv_table) == 3 and peak < MiB, peak


def test_amd_patches_over_the_limit() -> None:
    patch = amd_ucode.build_patch(patch_id=1, processor_rev_id=0x8012, body=b"")
    data = amd_ucode.build_container(_equiv(1), [patch] * (amd_ucode.MAX_PATCHES + 1))
    section = 12 + 32 + amd_ucode.MAX_PATCHES * (8 + 64)
    with pytest.raises(LimitError) as exc:
        amd_ucode.parse_container(data, source="a.bin")
    assert (exc.value.offset, exc.value.field) == (section, "patch section")
    (cont,) = amd_ucode.find_containers(data)
    assert len(cont.patches) == amd_ucode.MAX_PATCHES and cont.end == section
    assert "more than 1024 patches" in cont.problems[0]


def test_amd_search_over_overlapping_candidates_is_bounded() -> None:
    """A 16-byte unit that is a candidate and, shifted, a table entry: every candidate's
    table runs past MAX_EQUIV_ENTRIES.  Before the limit this held a million entries."""
    unit = b"DMA\0" + b"\0\0\0\0" + struct.pack("<I", 16 * MiB) + b"\x01\x02\x03\x04"
    data = unit * (16 * MiB // 16)
    start = time.perf_counter()

    def search() -> list[amd_ucode.AmdContainer]:
        out = []
        with pytest.raises(LimitError) as exc:
            out.extend(amd_ucode.find_containers(data, source="d.bin"))
        assert exc.value.field == "search" and exc.value.limit == 8 * 16 * MiB + 64 * MiB
        return out

    found, peak = traced(search)
    assert found == []
    assert time.perf_counter() - start < 20
    assert peak < 8 * MiB, peak


def test_amd_search_over_rejected_candidates_is_bounded() -> None:
    """A candidate every 12 bytes whose table length is 0: 4 KiB of work each."""
    data = b.AMD_CONTAINER + (b"DMA\0" + bytes(8)) * (16 * MiB // 12)
    start = time.perf_counter()
    found = []
    with pytest.raises(LimitError) as exc:
        found.extend(amd_ucode.find_containers(data, source="d.bin"))
    assert time.perf_counter() - start < 5
    assert [len(c.patches) for c in found] == [2]
    # Charged 4 KiB each against 8 x the length + 64 MiB.
    rejections = (8 * len(data) + 64 * MiB) // 4096
    assert exc.value.offset == len(b.AMD_CONTAINER) + rejections * 12


# ------------------------------------------------------------ .dat text


def test_dat_words_take_four_bytes_each() -> None:
    text = ",\n".join(f"0x{i * 2654435761 & 0xFFFFFFFF:08x}" for i in range(200_000))
    out, peak = traced(lambda: intel_ucode.parse_dat(text))
    assert len(out) == 800_000 and out[4:8] == struct.pack("<I", 2654435761)
    assert peak < 3 * len(out), peak
