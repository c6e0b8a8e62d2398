"""vm.saveimage: the save image header (versions 1-4) and the checksums of version 4.

Images are built here byte by byte with struct and xxhash (not through the
module's writer), so a mistake in the writer cannot cancel one in the reader;
the writer is then checked against these bytes.  Files are memfds.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from xenlab.errors import FormatError, TruncatedError, XenlabError
from xenlab.vm.migration import image as si
from xenlab.vm.migration.image import (
    CHUNK,
    MAGIC,
    ChecksumError,
    CutShortError,
    DiskMove,
    DiskSnapshot,
    SaveHeader,
    pack_header,
    parse_header,
)

HEADER = SaveHeader(
    name="g1", uuid="0b5e0a4c-1111-2222-3333-444455556666",
    config_text='name = "g1"\nmemory = 128\n# ünïcode\n', config_path="/etc/xen/g1.cfg",
    qemu_version="7.2.22", created=1700000000.5, state="running",
)
STREAM = b"QEVM\x00\x00\x00\x03rest of the stream"
MASK = (1 << 64) - 1


# --- builders (by hand) -----------------------------------------------------------------


def _body(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()


def _v4_head(obj: object) -> bytes:
    """magic, length, JSON, XXH64 of all three."""
    body = _body(obj)
    head = MAGIC + struct.pack(">I", len(body)) + body
    return head + struct.pack(">Q", xxhash.xxh64_intdigest(head))


def _tail(stream: bytes, seed: int) -> bytes:
    """The checksum of each MiB of ``stream`` (seed + i), then the trailer: b"XLSAVEND",
    u64 length, u32 chunk size, u32 0, u64 checksum of the table, u64 its own checksum."""
    sums = [xxhash.xxh64_intdigest(stream[i: i + CHUNK], seed=(seed + i // CHUNK) & MASK)
            for i in range(0, len(stream), CHUNK)]
    table = b"".join(struct.pack(">Q", x) for x in sums)
    body = struct.pack(">8sQIIQ", b"XLSAVEND", len(stream), CHUNK, 0,
                       xxhash.xxh64_intdigest(table, seed=(seed + len(sums)) & MASK))
    return table + body + struct.pack(
        ">Q", xxhash.xxh64_intdigest(body, seed=(seed + len(sums) + 1) & MASK))


def _seed(head: bytes) -> int:
    return int(struct.unpack(">Q", head[-8:])[0])


def _fields(**change: object) -> dict[str, object]:
    fields: dict[str, object] = {k: getattr(HEADER, k) for k in SaveHeader.__slots__}
    fields.update(disk_snapshots=[], disk_paths={}, overlays={})
    fields.pop("vcpus_plugged")  # written only when vcpu-set plugged some
    fields.update(change)
    return fields


def _legacy(obj: object) -> bytes:
    """A version 1-3 header: no checksum, QEMU's stream right behind it."""
    body = json.dumps(obj).encode()
    return MAGIC + struct.pack(">I", len(body)) + body


SMALL = STREAM + bytes(range(256)) * 2
BIG = STREAM + os.urandom(2 * CHUNK + 5000)  # three chunks, the last one short


def _image(stream: bytes = SMALL, header: SaveHeader = HEADER) -> bytes:
    head = _v4_head(_fields(**{k: getattr(header, k) for k in ("name", "uuid", "state")}))
    return head + stream + _tail(stream, _seed(head))


def _fd(data: bytes) -> int:
    fd = os.memfd_create("image")
    os.write(fd, data)
    return fd


def _check(raw: bytes) -> si.StreamSummary | None:
    fd = _fd(raw)
    try:
        return si.check_open(fd, "img")[1]
    finally:
        os.close(fd)


# --- the header -----------------------------------------------------------------------------


def test_v4_header_is_what_the_builder_writes() -> None:
    head = pack_header(HEADER)
    assert HEADER.version == si.SAVE_VERSION == 4
    assert head == _v4_head(_fields())
    raw = head + SMALL + _tail(SMALL, _seed(head))
    assert raw == _image()
    header, offset = parse_header(raw)
    assert header == HEADER and offset == len(head)
    assert si.header_seed(head) == _seed(head)
    assert parse_header(memoryview(bytearray(raw)))[0] == HEADER


def test_header_errors_name_the_place() -> None:
    raw = _image()
    n = struct.unpack_from(">I", raw, 12)[0]
    with pytest.raises(FormatError, match="not a xenlab save image") as e:
        parse_header(b"\x7fELF" + raw[4:], "f")
    assert (e.value.offset, e.value.field) == (0, "magic")
    with pytest.raises(FormatError, match="not a xenlab save image"):
        parse_header(b"QEVM")
    with pytest.raises(FormatError) as e:
        parse_header(MAGIC + struct.pack(">I", 1 << 30))
    assert (e.value.offset, e.value.field) == (12, "header length")
    # Version 4: the checksum is checked before the JSON is believed.
    broken = bytearray(raw)
    broken[20] ^= 0x01
    with pytest.raises(ChecksumError, match=r"header checksum: .*\+0x0 to \+0x") as c:
        parse_header(bytes(broken), "f")
    assert (c.value.offset, c.value.start, c.value.end) == (16 + n, 0, 16 + n)
    # A version 4 header whose checksum is missing (QEMU's stream right behind).
    body = _body(_fields(version=4))
    with pytest.raises(FormatError, match="followed by its checksum") as e:
        parse_header(MAGIC + struct.pack(">I", len(body)) + body + STREAM)
    assert e.value.field == "header checksum"
    # A version 3 header with a checksum after it: not what version 3 writes.
    with pytest.raises(FormatError, match="version 3 image has no checksums"):
        parse_header(_v4_head(_fields(version=3)) + SMALL)
    with pytest.raises(FormatError, match="not JSON") as e:
        bad = MAGIC + struct.pack(">I", 3) + b"{{{"
        parse_header(bad + struct.pack(">Q", xxhash.xxh64_intdigest(bad)) + b"\0" * 8)
    assert e.value.offset == 16
    with pytest.raises(FormatError, match="found a int, expected a str") as e:
        parse_header(_v4_head(_fields(version=4, state=7)) + SMALL)
    assert (e.value.offset, e.value.field) == (16, "header.state")
    with pytest.raises(FormatError, match="newer than this xenlab"):
        parse_header(_legacy(_fields(version=9)) + STREAM)
    with pytest.raises(FormatError, match="expected a time"):
        parse_header(_legacy(_fields(version=3, created=float("inf"))) + STREAM)
    # QEMU's stream must follow the checksum.
    head = _v4_head(_fields(version=4))
    with pytest.raises(FormatError, match="expected QEMU's") as e:
        parse_header(head + b"JUNKJUNK")
    assert (e.value.offset, e.value.field) == (len(head), "stream magic")


def test_older_versions_are_still_read() -> None:
    """Versions 1-3 have QEMU's stream right after the JSON, and are written back as such."""
    v1 = {k: getattr(HEADER, k) for k in SaveHeader.__slots__
          if k not in ("disk_snapshots", "disk_paths", "overlays")}
    v1["version"] = 1
    h1, at = parse_header(_legacy(v1) + STREAM)
    assert h1 == replace(HEADER, version=1) and h1.disk_snapshots == ()
    assert at == len(_legacy(v1))
    assert parse_header(pack_header(h1) + STREAM)[0] == h1
    snaps = (DiskSnapshot("xvda", "/d/a.qcow2", "xenlab-save-1"),)
    h2 = replace(HEADER, version=2, disk_snapshots=snaps)
    assert parse_header(pack_header(h2) + STREAM)[0] == h2
    h3 = replace(HEADER, version=3, disk_paths=(DiskMove("xvda", "/d/m.raw", "raw"),),
                 overlays=(DiskMove("xvdb", "/d/b.s1.qcow2", "qcow2"),))
    raw = pack_header(h3) + STREAM
    assert parse_header(raw)[0] == h3
    with pytest.raises(ValueError):
        pack_header(replace(h2, version=1))
    with pytest.raises(ValueError):
        pack_header(replace(h3, version=2))
    with pytest.raises(FormatError, match="expected one of 1, 2, 3, 4"):
        parse_header(_legacy(_fields(version=0)) + STREAM)


def test_header_fields_are_checked() -> None:
    bad: list[tuple[str, object, str]] = [
        ("disk_snapshots", None, "header.disk_snapshots"),
        ("disk_snapshots", ["xvda"], "header.disk_snapshots[0]"),
        ("disk_snapshots", [{"vdev": "xvda", "file": "/a", "name": ""}],
         "header.disk_snapshots[0].name"),
        ("disk_snapshots", [{"vdev": "xvda", "file": "/a", "name": "n"}] * 2,
         "header.disk_snapshots"),
        ("disk_paths", [], "header.disk_paths"),
        ("overlays", {"xvda": "/x"}, "header.overlays.xvda"),
        ("disk_paths", {"xvda": {"file": "", "format": "raw"}}, "header.disk_paths.xvda.file"),
        ("disk_paths", {"xvda": {"file": "/x", "format": "vmdk"}},
         "header.disk_paths.xvda.format"),
        ("overlays", {"": {"file": "/x", "format": "qcow2"}}, "header.overlays"),
    ]
    for key, value, field in bad:
        head = _v4_head(_fields(version=4, **{key: value}))
        with pytest.raises(FormatError) as e:
            parse_header(head + SMALL)
        assert (e.value.offset, e.value.field) == (16, field), (key, value)


def test_every_cut_of_the_header_is_truncated() -> None:
    raw = _image()
    first = parse_header(raw)[1]
    for cut in range(first + 4):
        with pytest.raises(TruncatedError):
            parse_header(raw[:cut])


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_format_errors(data: bytes) -> None:
    for buf in (data, MAGIC + data, MAGIC + struct.pack(">I", len(data)) + data + b"QEVM"):
        with contextlib.suppress(FormatError):
            parse_header(buf)
        with contextlib.suppress(FormatError):
            _check(buf)


@given(st.dictionaries(st.sampled_from(["version", "name", "uuid", "config_text", "state",
                                        "config_path", "qemu_version", "created",
                                        "disk_snapshots", "disk_paths", "overlays"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                 st.text(max_size=5))))
def test_random_json_headers_raise_only_format_errors(obj: dict[str, object]) -> None:
    for raw in (_legacy(obj) + b"QEVM", _v4_head(obj) + b"QEVM"):
        try:
            h, _ = parse_header(raw)
        except FormatError:
            continue
        assert isinstance(h.name, str) and isinstance(h.created, float)


def test_read_header_of_files(tmp_path: Path) -> None:
    good = tmp_path / "good.save"
    good.write_bytes(_image())
    assert si.read_header(good)[0] == HEADER
    layout = si.read_image(good)
    assert layout.seed == _seed(_image()[: layout.stream_offset])
    old = tmp_path / "old.save"
    old.write_bytes(pack_header(replace(HEADER, version=3)) + STREAM)
    assert si.read_image(old).seed is None
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(FormatError, match=f"{text}.*not a xenlab save image"):
        si.read_header(text)
    with pytest.raises(XenlabError, match="cannot read"):
        si.read_header(tmp_path / "missing.save")


# --- the checked stream ---------------------------------------------------------------------


def test_the_hasher_writes_what_the_builder_writes(tmp_path: Path) -> None:
    """QEMU's bytes come in pieces; the hasher follows them and appends table and trailer."""
    head = pack_header(HEADER)
    fd = os.memfd_create("save")
    os.write(fd, head)
    hasher = si.StreamHasher(fd, len(head), seed=si.header_seed(head))
    for i in range(0, len(BIG), 300000):
        os.write(fd, BIG[i: i + 300000])  # QEMU, writing
        hasher.update()
    assert len(hasher.sums) == 2  # the whole chunks so far
    summary = hasher.finish()
    data = os.pread(fd, 10 << 20, 0)
    assert data == head + BIG + _tail(BIG, _seed(head))
    assert summary == si.StreamSummary(3, len(BIG), len(data))
    assert si.check_open(fd, "x")[1] == summary
    os.close(fd)
    empty = os.memfd_create("empty")
    os.write(empty, head)
    with pytest.raises(ValueError, match="QEMU wrote 0 bytes"):
        si.StreamHasher(empty, len(head)).finish()
    os.close(empty)


def test_one_flipped_byte_anywhere_is_refused_at_its_place() -> None:
    """Every byte of an image, flipped: refused, and the bytes named cover the flipped one."""
    raw = _image()
    fields: set[str] = set()
    for pos in range(len(raw)):
        for bit in (0x01, 0x80):
            bad = bytearray(raw)
            bad[pos] ^= bit
            with pytest.raises(FormatError) as e:
                _check(bytes(bad))
            err = e.value
            fields.add(err.field.split()[0])
            if isinstance(err, ChecksumError) and err.field != "header checksum":
                assert err.start <= pos < len(raw), (pos, str(err))
    assert {"magic", "header", "stream", "checksum", "trailer"} <= fields, fields


def test_each_section_flipped() -> None:
    raw = _image(BIG)
    first = parse_header(raw)[1]
    table = first + len(BIG)
    trailer = len(raw) - si.TRAILER_SIZE
    cases: list[tuple[int, type[FormatError], str, int]] = [
        (20, ChecksumError, "header checksum", first - 8),           # the JSON
        (first - 1, ChecksumError, "header checksum", first - 8),    # the header's checksum
        (first + 10, ChecksumError, "stream chunk 0", first),        # QEMU's stream
        (first + 2 * CHUNK + 7, ChecksumError, "stream chunk 2", first + 2 * CHUNK),
        (table + 8 + 3, ChecksumError, "checksum table", table),      # chunk 1's checksum
        (trailer + 9, ChecksumError, "trailer", trailer),              # the stream's length
        (len(raw) - 1, ChecksumError, "trailer", trailer),             # the trailer's checksum
    ]
    for pos, kind, field, offset in cases:
        bad = bytearray(raw)
        bad[pos] ^= 0x10
        with pytest.raises(kind) as e:
            _check(bytes(bad))
        assert (e.value.field, e.value.offset) == (field, offset), (pos, str(e.value))
        assert str(e.value).startswith(f"img+{offset:#x}: {field}: "), str(e.value)
    # The damaged chunk's bytes are named.
    bad = bytearray(raw)
    bad[first + CHUNK + 1] ^= 1
    with pytest.raises(ChecksumError, match=rf"\(\+{first + CHUNK:#x} to "
                                            rf"\+{first + 2 * CHUNK:#x}, checksum"):
        _check(bytes(bad))


def test_cut_and_appended_images_are_refused() -> None:
    raw = _image()
    first = parse_header(raw)[1]
    for cut in range(len(raw)):
        with pytest.raises(FormatError) as e:
            _check(raw[:cut])
        if cut >= first + 4:
            assert isinstance(e.value, CutShortError), (cut, str(e.value))
            assert e.value.offset == e.value.end == cut
            assert str(e.value) == (f"img+{cut:#x}: trailer: cut short: the data ends here, "
                                    "without the trailer that ends a complete stream")
    big = _image(BIG)
    with pytest.raises(CutShortError) as c:
        _check(big[: first + CHUNK + 5])
    assert c.value.end == first + CHUNK + 5
    for junk in (b"\0", b"XLSAVEND" * 10, os.urandom(3 * CHUNK)):
        with pytest.raises(FormatError, match=f"{len(junk)} bytes after the trailer") as e:
            _check(big + junk)
        assert (e.value.offset, e.value.field) == (len(big), "end")
    assert _check(big) == si.StreamSummary(3, len(BIG), len(big))


def test_chunks_cannot_move_between_images_or_order() -> None:
    mine, other = _image(BIG), _image(BIG, replace(HEADER, name="g2"))
    first, other_first = parse_header(mine)[1], parse_header(other)[1]
    # Another image's stream and checksums behind this header.
    with pytest.raises(ChecksumError, match="trailer"):
        _check(mine[:first] + other[other_first:])
    # Two chunks swapped, checksums and all.
    seed = _seed(mine[:first])
    c0, c1, rest = BIG[:CHUNK], BIG[CHUNK: 2 * CHUNK], BIG[2 * CHUNK:]
    tail = bytearray(_tail(BIG, seed))
    tail[0:8], tail[8:16] = tail[8:16], tail[0:8]
    with pytest.raises(FormatError):
        _check(mine[:first] + c1 + c0 + rest + bytes(tail))
    with pytest.raises(ChecksumError, match="stream chunk 0"):
        _check(mine[:first] + c0[:4] + c1[4:] + c1[:4] + c0[4:] + rest + _tail(BIG, seed))
    # A trailer that does not fit the file.
    bad = bytearray(_tail(BIG, seed))
    body = struct.pack(">8sQIIQ", b"XLSAVEND", len(BIG), 4096, 0, 0)
    # (a chunk size other than 1 MiB counts no chunks for the seed)
    bad[-40:] = body + struct.pack(">Q", xxhash.xxh64_intdigest(body, seed=seed + 1))
    with pytest.raises(FormatError, match="do not fit") as e:
        _check(mine[:first] + BIG + bytes(bad))
    assert e.value.field == "trailer"


@given(st.binary(max_size=300))
def test_random_streams_raise_only_format_errors(data: bytes) -> None:
    for buf in (data, si.STREAM_MAGIC + data, si.STREAM_MAGIC + data + b"XLSAVEND" + data):
        fd = _fd(buf)
        try:
            with contextlib.suppress(FormatError):
                si.check_stream_open(fd, "x")
        finally:
            os.close(fd)


def test_bare_streams(tmp_path: Path) -> None:
    legacy = tmp_path / "old.mem"
    legacy.write_bytes(STREAM)
    assert si.check_stream_file(legacy) is None
    junk = tmp_path / "junk.mem"
    junk.write_bytes(b"\x7fELF" + b"\0" * 40)
    with pytest.raises(FormatError, match="not a xenlab VM state"):
        si.check_stream_file(junk)
    good = tmp_path / "new.mem"
    good.write_bytes(si.STREAM_MAGIC + BIG + _tail(BIG, 0))
    assert si.check_stream_file(good) == si.StreamSummary(3, len(BIG), good.stat().st_size)
    bad = bytearray(good.read_bytes())
    bad[len(si.STREAM_MAGIC) + CHUNK + 30] ^= 1
    good.write_bytes(bytes(bad))
    with pytest.raises(ChecksumError, match=r"new.mem\+0x10000e: stream chunk 1"):
        si.check_stream_file(good)
    with pytest.raises(XenlabError, match="cannot read"):
        si.check_stream_file(tmp_path / "missing.mem")


def test_plugged_vcpus_are_carried_and_checked() -> None:
    from dataclasses import replace

    header = replace(HEADER, vcpus_plugged=3)
    head = pack_header(header)
    assert head == _v4_head(_fields(vcpus_plugged=3))
    assert parse_header(head + SMALL + _tail(SMALL, _seed(head)))[0] == header
    for bad in (0, -1, 2000, True, "3", 1.5):
        body = _v4_head(_fields(vcpus_plugged=bad))
        with pytest.raises(FormatError, match="vcpus_plugged"):
            parse_header(body + SMALL + _tail(SMALL, _seed(body)))

