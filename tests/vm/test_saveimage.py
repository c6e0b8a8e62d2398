"""vm.saveimage: the save image header (versions 1-4) and the checksummed frames of version 4.

Images are built here byte by byte with struct and xxhash (not through the
module's writer), so a mistake in the writer cannot cancel one in the reader;
the writer is then checked against these bytes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from xenlab.errors import FormatError, TruncatedError, XenlabError
from xenlab.vm import saveimage as si
from xenlab.vm.saveimage import (
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


def _frames(chunks: Sequence[bytes], seed: int) -> bytes:
    """Each chunk as [u32 length, data, u64 XXH64(length+data, seed+i)], then the trailer."""
    out = b""
    for i, data in enumerate(chunks):
        head = struct.pack(">I", len(data))
        out += head + data + struct.pack(
            ">Q", xxhash.xxh64_intdigest(head + data, seed=(seed + i) & MASK))
    trailer = struct.pack(">IQQ", 0, len(chunks), sum(map(len, chunks)))
    return out + trailer + struct.pack(
        ">Q", xxhash.xxh64_intdigest(trailer, seed=(seed + len(chunks)) & MASK))


def _seed(head: bytes) -> int:
    return int(struct.unpack(">Q", head[-8:])[0])


def _fields(**change: object) -> dict[str, object]:
    fields: dict[str, object] = {k: getattr(HEADER, k) for k in SaveHeader.__slots__}
    fields.update(disk_snapshots=[], disk_paths={}, overlays={})
    fields.update(change)
    return fields


def _legacy(obj: object) -> bytes:
    """A version 1-3 header: no checksum, QEMU's stream right behind it."""
    body = json.dumps(obj).encode()
    return MAGIC + struct.pack(">I", len(body)) + body


CHUNKS = (STREAM + b"a" * 70, b"b" * 100, b"c" * 33)


def _image(header: SaveHeader = HEADER, chunks: Sequence[bytes] = CHUNKS) -> bytes:
    head = _v4_head(_fields(**{k: getattr(header, k) for k in ("name", "uuid", "state")}))
    return head + _frames(chunks, _seed(head))


# --- the header -----------------------------------------------------------------------------


def test_v4_header_is_what_the_builder_writes() -> None:
    head = pack_header(HEADER)
    assert HEADER.version == si.SAVE_VERSION == 4
    assert head == _v4_head(_fields())
    raw = head + _frames(CHUNKS, _seed(head))
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
        parse_header(_v4_head(_fields(version=3)) + _frames(CHUNKS, 0))
    with pytest.raises(FormatError, match="not JSON") as e:
        bad = MAGIC + struct.pack(">I", 3) + b"{{{"
        parse_header(bad + struct.pack(">Q", xxhash.xxh64_intdigest(bad)) + b"\0" * 8)
    assert e.value.offset == 16
    with pytest.raises(FormatError, match="found a int, expected a str") as e:
        parse_header(_v4_head(_fields(version=4, state=7)) + _frames(CHUNKS, 0))
    assert (e.value.offset, e.value.field) == (16, "header.state")
    with pytest.raises(FormatError, match="newer than this xenlab"):
        parse_header(_legacy(_fields(version=9)) + STREAM)
    with pytest.raises(FormatError, match="expected a time"):
        parse_header(_legacy(_fields(version=3, created=float("inf"))) + STREAM)
    # The first frame must be QEMU's stream.
    head = _v4_head(_fields(version=4))
    with pytest.raises(FormatError, match="expected QEMU's") as e:
        parse_header(head + _frames([b"JUNKJUNK"], _seed(head)))
    assert (e.value.offset, e.value.field) == (len(head) + 4, "stream magic")
    with pytest.raises(FormatError, match="frame 0 length") as e:
        parse_header(head + struct.pack(">I", 0) + b"QEVM")
    assert e.value.offset == len(head)


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
            parse_header(head + _frames(CHUNKS, _seed(head)))
        assert (e.value.offset, e.value.field) == (16, field), (key, value)


def test_every_cut_of_the_header_is_truncated() -> None:
    raw = _image()
    first = parse_header(raw)[1]
    for cut in range(first + 8):
        with pytest.raises(TruncatedError):
            parse_header(raw[:cut])


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_format_errors(data: bytes) -> None:
    for buf in (data, MAGIC + data, MAGIC + struct.pack(">I", len(data)) + data + b"QEVM"):
        with contextlib.suppress(FormatError):
            parse_header(buf)
        with contextlib.suppress(FormatError):
            si.check_stream(io.BytesIO(buf))


@given(st.dictionaries(st.sampled_from(["version", "name", "uuid", "config_text", "state",
                                        "config_path", "qemu_version", "created",
                                        "disk_snapshots", "disk_paths", "overlays"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                 st.text(max_size=5))))
def test_random_json_headers_raise_only_format_errors(obj: dict[str, object]) -> None:
    for raw in (_legacy(obj) + b"QEVM", _v4_head(obj) + _frames([b"QEVM"], 0)):
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


# --- frames -----------------------------------------------------------------------------------


def _check(raw: bytes, tmp_path: Path) -> si.StreamSummary | None:
    f = tmp_path / "x.save"
    f.write_bytes(raw)
    return si.check_image(f)[1]


def test_frames_are_what_the_builder_writes(tmp_path: Path) -> None:
    head = pack_header(HEADER)
    path = tmp_path / "w.save"
    with path.open("wb") as f:
        f.write(head)
        f.flush()
        w = si.FrameWriter(f.fileno(), seed=si.header_seed(head))
        for chunk in CHUNKS:
            w.frame(chunk)
        end = w.finish()
    assert path.read_bytes() == _image()
    layout, summary = si.check_image(path)
    assert summary == si.StreamSummary(3, sum(map(len, CHUNKS)), path.stat().st_size)
    assert end.end == path.stat().st_size - layout.stream_offset
    with path.open("rb") as f:
        f.seek(layout.stream_offset)
        got = [bytes(d) for d in si.iter_frames(f, seed=layout.seed or 0)]
    assert got == list(CHUNKS)
    with pytest.raises(ValueError):
        w.frame(b"")
    with pytest.raises(ValueError):
        w.frame(b"x" * (si.FRAME_MAX + 1))


def test_one_flipped_byte_anywhere_is_refused_at_its_place(tmp_path: Path) -> None:
    """Every byte of an image, flipped: refused, and the offset named covers the byte."""
    raw = _image()
    first = parse_header(raw)[1]
    seen_fields: set[str] = set()
    for pos in range(len(raw)):
        for bit in (0x01, 0x80):
            bad = bytearray(raw)
            bad[pos] ^= bit
            with pytest.raises(FormatError) as e:
                _check(bytes(bad), tmp_path)
            err = e.value
            seen_fields.add(err.field.split()[0])
            if isinstance(err, ChecksumError):
                assert err.start <= pos < err.offset + 8, (pos, str(err))
            elif pos >= first:
                assert err.offset <= pos, (pos, str(err))
    assert {"magic", "header", "frame", "trailer"} <= seen_fields


def test_each_section_flipped(tmp_path: Path) -> None:
    raw = _image()
    first = parse_header(raw)[1]
    n0 = len(CHUNKS[0])
    f1 = first + 4 + n0 + 8  # frame 1
    trailer = len(raw) - 28
    cases: list[tuple[int, type[FormatError], str, str | None]] = [
        (20, ChecksumError, "header checksum", f"+0x0 to +{first - 8:#x}"),  # the JSON
        (first - 1, ChecksumError, "header checksum", None),      # the header's checksum
        (first + 4 + 10, ChecksumError, "frame 0", None),         # a frame's data
        (f1 + 4 + 100 + 3, ChecksumError, "frame 1", None),       # a frame's checksum
        (f1 + 3, FormatError, "frame 1", None),                   # a frame's length
        (trailer + 11, ChecksumError, "trailer", None),           # the trailer's count
        (len(raw) - 1, ChecksumError, "trailer", None),           # the trailer's checksum
    ]
    for pos, kind, field, text in cases:
        bad = bytearray(raw)
        bad[pos] ^= 0x10
        with pytest.raises(kind) as e:
            _check(bytes(bad), tmp_path)
        assert e.value.field.startswith(field), (pos, str(e.value))
        assert str(e.value).startswith(f"{tmp_path / 'x.save'}+0x"), str(e.value)
        if text:
            assert text in str(e.value)


def test_cut_and_appended_images_are_refused(tmp_path: Path) -> None:
    raw = _image()
    for cut in range(len(raw)):
        with pytest.raises(FormatError) as e:
            _check(raw[:cut], tmp_path)
        if cut >= parse_header(raw)[1] + 8:
            assert isinstance(e.value, CutShortError), (cut, str(e.value))
            assert e.value.end == cut and f"ends at +{cut:#x}" in str(e.value)
    # Cut exactly between frames: a stream without its trailer.
    first = parse_header(raw)[1]
    at = first + 4 + len(CHUNKS[0]) + 8
    with pytest.raises(CutShortError, match=r"frame 1: cut short: the data ends at \+0x"):
        _check(raw[:at], tmp_path)
    with pytest.raises(FormatError, match="bytes after the trailer") as e:
        _check(raw + b"\0", tmp_path)
    assert e.value.offset == len(raw)
    assert _check(raw, tmp_path) is not None


def test_frames_cannot_move_between_images_or_order(tmp_path: Path) -> None:
    other = _image(replace(HEADER, name="g2"))
    mine = _image()
    first, other_first = parse_header(mine)[1], parse_header(other)[1]
    with pytest.raises(ChecksumError, match="frame 0"):
        _check(mine[:first] + other[other_first:], tmp_path)
    head = mine[:first]
    swapped = head + _frames([CHUNKS[0], CHUNKS[2], CHUNKS[1]], 0)
    with pytest.raises(ChecksumError, match="frame 0"):
        _check(swapped, tmp_path)
    # A frame cut out of the written bytes (the trailer left as it is): the next
    # frame is checked with the seed of the one it replaced.
    f1 = first + 4 + len(CHUNKS[0]) + 8
    f2 = f1 + 4 + len(CHUNKS[1]) + 8
    with pytest.raises(ChecksumError, match="frame 1"):
        _check(mine[:f1] + mine[f2:], tmp_path)
    # ...or repeated.
    with pytest.raises(ChecksumError, match="frame 2"):
        _check(mine[:f2] + mine[f1:f2] + mine[f2:], tmp_path)


def test_an_oversized_frame_length_is_refused_before_any_read() -> None:
    with pytest.raises(FormatError, match="more than the 1048576 a frame holds") as e:
        list(si.iter_frames(io.BytesIO(b"\xff\xff\xff\xff" + b"\0" * 64), offset=0x40))
    assert e.value.offset == 0x40


def test_pump_frames_a_pipe(tmp_path: Path) -> None:
    """What QEMU writes into a pipe comes out as full frames, the last one short."""
    data = b"QEVM" + os.urandom(3 * si.FRAME_MAX + 12345)
    r, w = os.pipe()

    def qemu() -> None:
        for i in range(0, len(data), 70000):
            os.write(w, data[i: i + 70000])
        os.close(w)

    out = tmp_path / "s.vmstate"
    writer_thread = threading.Thread(target=qemu)
    with out.open("wb") as f:
        f.write(si.STREAM_MAGIC)
        f.flush()
        fw = si.FrameWriter(f.fileno())
        writer_thread.start()
        si.pump(r, fw)
        writer_thread.join()
        fw.finish()
    os.close(r)
    summary = si.check_stream_file(out)
    assert summary is not None and (summary.frames, summary.bytes) == (4, len(data))
    with out.open("rb") as g:
        g.seek(len(si.STREAM_MAGIC))
        sizes = [len(d) for d in si.iter_frames(g)]
    assert sizes == [si.FRAME_MAX] * 3 + [12349]
    # A stopped pump returns at once and writes nothing more.
    r, w = os.pipe()
    stop = threading.Event()
    stop.set()
    si.pump(r, si.FrameWriter(os.open(os.devnull, os.O_WRONLY)), stop=stop, poll=0.01)
    os.close(r)
    os.close(w)


def test_bare_streams(tmp_path: Path) -> None:
    legacy = tmp_path / "old.mem"
    legacy.write_bytes(STREAM)
    assert si.check_stream_file(legacy) is None
    junk = tmp_path / "junk.mem"
    junk.write_bytes(b"\x7fELF" + b"\0" * 40)
    with pytest.raises(FormatError, match="not a xenlab VM state"):
        si.check_stream_file(junk)
    good = tmp_path / "new.mem"
    good.write_bytes(si.STREAM_MAGIC + _frames(CHUNKS, 0))
    assert si.check_stream_file(good) == si.StreamSummary(
        3, sum(map(len, CHUNKS)), good.stat().st_size)
    bad = bytearray(good.read_bytes())
    bad[len(si.STREAM_MAGIC) + 30] ^= 1
    good.write_bytes(bytes(bad))
    with pytest.raises(ChecksumError, match=r"new.mem\+0x.*: frame 0"):
        si.check_stream_file(good)
