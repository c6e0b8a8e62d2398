"""Tests for xenlab.formats.intel_ucode: real Intel files against iucode_tool, built fixtures."""

from __future__ import annotations

import mmap
import random
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenlab.errors import FormatError, ParseError, TruncatedError
from xenlab.formats.intel_ucode import (
    HEADER_SIZE,
    IntelUpdate,
    build_update,
    decode_bcd_date,
    dword_sum,
    find_updates,
    iter_updates,
    parse_dat,
    parse_update,
)

M32 = 0xFFFFFFFF

# --- hand-made fixtures (struct, not the module's writer) ----------------------


def hand_update(
    *,
    sig: int = 0x906A4,
    rev: int = 0x10,
    date: int = 0x06132025,
    pf: int = 0x40,
    data: bytes = b"\xa5" * (1024 - 48),
    raw_sizes: tuple[int, int] | None = None,
    ext: list[tuple[int, int]] | None = None,
    hdrver: int = 1,
    ldrver: int = 1,
) -> bytes:
    """An update written field by field, checksums computed here by plain Python sums."""
    ext_tab = b""
    ds, ts = len(data), 48 + len(data) + (20 + 12 * len(ext) if ext else 0)
    if raw_sizes is not None:
        ds, ts = raw_sizes
    hdr = [hdrver, rev & M32, date, sig, 0, ldrver, pf, ds, ts, 0, 0, 0]
    words = struct.unpack(f"<{len(data) // 4}I", data)
    hdr[4] = -(sum(hdr) + sum(words)) & M32
    if ext:
        primary = (sig + pf + hdr[4]) & M32
        ents = [(s, p, (primary - s - p) & M32) for s, p in ext]
        flat = [v for e in ents for v in e]
        ext_tab = struct.pack("<5I", len(ext), -(len(ext) + sum(flat)) & M32, 0, 0, 0)
        ext_tab += struct.pack(f"<{len(flat)}I", *flat)
    return struct.pack("<12I", *hdr) + data + ext_tab


def test_hand_fixture_matches_writer() -> None:
    """The module's writer and the hand builder produce the same bytes."""
    data = bytes(range(256)) * 8
    data = data[: 2048 - 48 - 20 - 24]
    ext = [(0x906A3, 0x80), (0x906A4, 0x80)]
    hand = hand_update(sig=0x906A3, rev=0x43A, date=0x10122025, pf=0x80, data=data, ext=ext)
    built = build_update(
        signature=0x906A3,
        revision=0x43A,
        platform_mask=0x80,
        date="2025-10-12",
        payload=data,
        ext=ext,
    )
    assert built == hand


# --- real files against iucode_tool ---------------------------------------------

INTEL_FILES = [
    "06-03-02",
    "06-05-03",
    "06-0f-0b",
    "06-1a-04",
    "06-55-04",
    "06-5f-01",
    "06-97-05",
    "06-9a-04",
    "06-c5-02",
    "0f-04-08",
    "with-caveats/06-4f-01",
]

_MAIN = re.compile(
    r"^\s+\d+/\d+: sig (0x[0-9a-f]+), pf_mask (0x[0-9a-f]+), (\d{4}-\d{2}-\d{2}),"
    r" rev (0x[0-9a-f]+), size (\d+)$"
)
_EXT = re.compile(
    r"^\s+sig (0x[0-9a-f]+), pf_mask (0x[0-9a-f]+), (\d{4}-\d{2}-\d{2}), rev (0x[0-9a-f]+)$"
)


def iucode_tool_list(path: Path) -> list[dict[str, object]]:
    """``iucode_tool -L`` (file order, with extended signatures) as a list of dicts."""
    tool = shutil.which("iucode_tool")
    if tool is None:
        pytest.skip("iucode_tool is not installed on this machine")
    out = subprocess.run([tool, "-L", str(path)], check=True, capture_output=True, text=True).stdout
    updates: list[dict[str, object]] = []
    for line in out.splitlines():
        if m := _MAIN.match(line):
            updates.append(
                {
                    "sig": int(m[1], 16),
                    "pf": int(m[2], 16),
                    "date": m[3],
                    "rev": int(m[4], 16),
                    "size": int(m[5]),
                    "ext": [],
                }
            )
        elif m := _EXT.match(line):
            ext = updates[-1]["ext"]
            assert isinstance(ext, list)
            ext.append((int(m[1], 16), int(m[2], 16)))
            assert m[3] == updates[-1]["date"] and int(m[4], 16) == updates[-1]["rev"]
    return updates


@pytest.mark.parametrize("name", INTEL_FILES)
def test_real_file_matches_iucode_tool(shared_data: Path, name: str) -> None:
    path = shared_data / "microcode" / "intel" / name
    data = path.read_bytes()
    expected = iucode_tool_list(path)
    got = list(iter_updates(data, source=name))
    assert len(got) == len(expected) >= 1
    offset = 0
    for u, want in zip(got, expected, strict=True):
        assert u.offset == offset
        assert u.signature == want["sig"]
        assert u.platform_mask == want["pf"]
        assert u.date == want["date"]
        assert u.revision & M32 == want["rev"]
        assert u.total_size == want["size"]
        assert [(e.signature, e.platform_mask) for e in u.ext_signatures] == want["ext"]
        assert u.checksum_ok, u.problems
        assert u.problems == ()
        assert dword_sum(data, u.offset, HEADER_SIZE + u.data_size) == 0
        offset = u.end
    assert offset == len(data)
    # Recover mode finds exactly the same updates.
    assert list(find_updates(data, source=name)) == got


def test_real_facts_from_sources(shared_data: Path) -> None:
    """The SOURCES.md table, as the files really hold it (06-97-05 is rev 0x3d now)."""
    intel = shared_data / "microcode" / "intel"

    def load(name: str) -> list[IntelUpdate]:
        return list(iter_updates((intel / name).read_bytes(), source=name))

    (old,) = load("06-03-02")
    assert (old.data_size, old.total_size, old.signature, old.revision) == (2000, 2048, 0x1632, 2)
    assert old.date == "1998-06-10" and old.platform_mask == 0
    assert [u.platform_mask for u in load("06-05-03")] == [1, 2, 4, 8]
    nine = load("06-0f-0b")
    assert len(nine) == 7 and {(u.data_size, u.total_size) for u in nine} == {(4048, 4096)}
    (alder,) = load("06-97-05")
    assert alder.signature == 0x90672 and alder.revision == 0x3D and alder.date == "2025-10-12"
    assert (alder.data_size, alder.total_size) == (226164, 226304)
    assert [s for s, _ in alder.signatures()[1:]] == [
        0x90672,
        0x90675,
        0xB06F2,
        0xB06F5,
        0xB06F6,
        0xB06F7,
    ]
    assert {pf for _, pf in alder.signatures()} == {7}
    assert alder.ext_checksum == 0x51CC180C
    first, second = load("06-9a-04")
    assert second.offset == 224256 and second.signature == 0x906A4 and second.revision == 0xB
    assert first.signatures() == ((0x906A3, 0x80), (0x906A3, 0x80), (0x906A4, 0x80))
    assert second.ext_signatures == () and second.ext_checksum is None
    # Modern headers carry a minimum revision for late loading at +40.
    assert first.min_revision == 0x419 and first.metadata_size == 0
    (sky,) = load("06-55-04")
    assert sky.revision == 0x2007006 and sky.min_revision == 0x2006B06
    assert [u.total_size for u in load("0f-04-08")] == [3072] * 3


def test_real_bundle_concatenated(shared_data: Path) -> None:
    intel = shared_data / "microcode" / "intel"
    blob = b"".join((intel / n).read_bytes() for n in INTEL_FILES)
    got = list(iter_updates(blob))
    assert len(got) == 1 + 4 + 7 + 1 + 1 + 1 + 1 + 2 + 1 + 3 + 1
    assert all(u.checksum_ok for u in got)


# --- fields and writer round trips ------------------------------------------------


def test_legacy_sizes_mean_2000_and_2048() -> None:
    blob = hand_update(data=b"\x11" * 2000, raw_sizes=(0, 0))
    u = parse_update(blob)
    assert (u.data_size, u.total_size, u.checksum_ok) == (2000, 2048, True)
    assert (
        build_update(
            signature=0x906A4,
            revision=0x10,
            platform_mask=0x40,
            date="2025-06-13",
            payload=b"\x11" * 2000,
            legacy_sizes=True,
        )
        == blob
    )


def test_signed_revision() -> None:
    blob = build_update(signature=0x906A4, revision=-1, platform_mask=1, payload=bytes(976))
    assert blob[4:8] == b"\xff\xff\xff\xff"
    u = parse_update(blob)
    assert u.revision == -1 and u.checksum_ok


@pytest.mark.parametrize(
    ("raw", "text", "fragment"),
    [
        (0x13092011, "2011-13-09", "month 13"),
        (0x06322020, "2020-06-32", "day 32"),
        (0x1A0F2020, "2020-1a-0f", "not packed BCD"),
        (0, "0000-00-00", "missing"),
    ],
)
def test_bad_bcd_date_is_a_problem_not_an_error(raw: int, text: str, fragment: str) -> None:
    u = parse_update(hand_update(date=raw))
    assert u.date == text and u.date_raw == raw
    assert u.checksum_ok
    assert any(fragment in p for p in u.problems), u.problems
    assert decode_bcd_date(0x10122025) == ("2025-10-12", ())


def test_revision_zero_and_reserved_bits_are_problems() -> None:
    u = parse_update(hand_update(rev=0, pf=0x100))
    assert u.checksum_ok
    assert any("revision 0" in p for p in u.problems)
    assert any("reserved bits" in p for p in u.problems)


dates = st.builds(
    lambda y, m, d: f"{y:04d}-{m:02d}-{d:02d}",
    st.integers(1995, 2099),
    st.integers(1, 12),
    st.integers(1, 28),
)


@given(
    sig=st.integers(0, M32),
    rev=st.integers(-(2**31), 2**31 - 1).filter(bool),
    pf=st.integers(0, 0xFF),
    date=dates,
    kib=st.integers(1, 6),
    ext=st.lists(st.tuples(st.integers(0, M32), st.integers(0, 0xFF)), max_size=6),
    seed=st.integers(0, 2**32),
    min_rev=st.integers(0, M32),
)
def test_build_parse_round_trip(
    sig: int,
    rev: int,
    pf: int,
    date: str,
    kib: int,
    ext: list[tuple[int, int]],
    seed: int,
    min_rev: int,
) -> None:
    ext_size = 20 + 12 * len(ext) if ext else 0
    size = 1024 * kib - 48 - ext_size
    if size < 0:
        size += 1024
    payload = random.Random(seed).randbytes(size)
    blob = build_update(
        signature=sig,
        revision=rev,
        platform_mask=pf,
        date=date,
        payload=payload,
        ext=ext,
        min_revision=min_rev,
    )
    u = parse_update(blob, source="rt")
    assert (u.signature, u.revision, u.platform_mask, u.date) == (sig, rev, pf, date)
    assert (u.data_size, u.total_size, u.min_revision) == (size, len(blob), min_rev)
    assert [(e.signature, e.platform_mask) for e in u.ext_signatures] == ext
    assert u.checksum_ok and u.problems == ()
    assert blob[48 : 48 + size] == payload
    # Each extended entry makes a valid update when swapped in as the primary.
    for e in u.ext_signatures:
        swapped = bytearray(blob)
        struct.pack_into("<I", swapped, 12, e.signature)
        struct.pack_into("<I", swapped, 16, e.checksum)
        struct.pack_into("<I", swapped, 24, e.platform_mask)
        assert dword_sum(swapped, 0, 48 + size) == 0


def test_pad_and_bad_writer_sizes() -> None:
    blob = build_update(signature=1, revision=1, platform_mask=1, payload=b"\x01" * 8)
    assert len(blob) == 1024 and parse_update(blob).data_size == 976
    assert blob[48:56] == b"\x01" * 8 and blob[56:] == bytes(968)
    ext = build_update(signature=1, revision=1, platform_mask=1, payload=bytes(2000), ext=[(2, 1)])
    assert len(ext) == 3072 and parse_update(ext).data_size == 3072 - 48 - 32
    with pytest.raises(ValueError, match="multiple of 1024"):
        build_update(signature=1, revision=1, platform_mask=1, payload=b"\x01" * 8, pad=False)
    with pytest.raises(ValueError, match="dwords"):
        build_update(signature=1, revision=1, platform_mask=1, payload=b"\x01" * 7)
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        build_update(signature=1, revision=1, platform_mask=1, payload=bytes(976), date="1/2/3")


def test_dword_sum_large_is_fast() -> None:
    big = bytes(range(256)) * (40 * 4096)  # 40 MiB
    start = time.perf_counter()
    total = dword_sum(big, 0, len(big))
    assert time.perf_counter() - start < 1.0
    assert total == sum(struct.unpack("<64I", bytes(range(256)))) * (40 * 4096) & M32
    with pytest.raises(TruncatedError):
        dword_sum(big, len(big) - 4, 8)


# --- checksum corruption at the right place ------------------------------------


def ext_blob() -> bytes:
    return build_update(
        signature=0xC0662,
        revision=0x11A,
        platform_mask=0x82,
        payload=bytes(range(256)) * 7 + bytes(2048 - 48 - 56 - 1792),
        ext=[(0xC0662, 0x82), (0xC06A2, 0x82), (0xC0652, 0x82)],
    )


def test_checksum_flip_in_data() -> None:
    blob = bytearray(ext_blob())
    blob[48 + 777] ^= 0x40
    u = parse_update(bytes(blob))
    assert not u.checksum_ok
    total = dword_sum(blob, 0, 48 + u.data_size)
    assert total != 0
    assert [p for p in u.problems if p.startswith("checksum")] == [
        f"checksum: dword sum of header+data at 0x0 is {total:#010x}, expected 0"
    ]


def test_checksum_flip_in_ext_table_header() -> None:
    blob = bytearray(ext_blob())
    ext_at = 48 + parse_update(bytes(blob)).data_size
    blob[ext_at + 12] ^= 1  # a reserved dword of the table header
    u = parse_update(bytes(blob))
    assert not u.checksum_ok
    assert len(u.problems) == 1 and f"extended table at {ext_at:#x}" in u.problems[0]


def test_checksum_flip_in_ext_entry() -> None:
    blob = bytearray(ext_blob())
    ext_at = 48 + parse_update(bytes(blob)).data_size
    entry = ext_at + 20 + 12 * 2
    blob[entry + 8] ^= 1  # entry 2's checksum: breaks the entry and the table sum
    u = parse_update(bytes(blob))
    assert not u.checksum_ok
    assert any(p.startswith(f"ext entry 2 at {entry:#x}") for p in u.problems), u.problems
    assert any("extended table" in p for p in u.problems)
    assert not any(p.startswith("ext entry 0") or p.startswith("ext entry 1") for p in u.problems)


def test_corrupt_update_in_bundle_is_reported_and_walk_continues() -> None:
    a, b, c = (hand_update(rev=r) for r in (1, 2, 3))
    bad = bytearray(b)
    bad[500] ^= 0xFF
    got = list(iter_updates(a + bytes(bad) + c))
    assert [u.checksum_ok for u in got] == [True, False, True]
    assert [u.offset for u in got] == [0, 1024, 2048]


# --- structural errors with their offsets ---------------------------------------


def _raises(blob: bytes, offset: int, field: str, kind: type[FormatError] = FormatError) -> None:
    with pytest.raises(kind) as info:
        list(iter_updates(blob, source="t.bin"))
    assert type(info.value) is kind
    assert info.value.offset == offset, str(info.value)
    assert info.value.field == field
    assert str(info.value).startswith(f"t.bin+{offset:#x}: {field}: ")


def test_truncated_header() -> None:
    _raises(bytes(hand_update())[:47], 0, "header", TruncatedError)
    _raises(hand_update() + hand_update()[:20], 1024, "header", TruncatedError)


def test_total_size_overflows_file() -> None:
    blob = hand_update(data=b"\x00" * 2000, raw_sizes=(2000, 3072))
    _raises(blob, 0, "update (total_size)", TruncatedError)
    _raises(hand_update() + hand_update()[:1000], 1024, "update (total_size)", TruncatedError)


def test_huge_sizes() -> None:
    blob = hand_update(raw_sizes=(0xFFFFF000, 0xFFFFFC00))
    _raises(blob, 0, "update (total_size)", TruncatedError)
    _raises(hand_update(raw_sizes=(0xFFFFFFFC, 0xFFFFFC00)), 32, "total_size")


def test_total_smaller_than_data_plus_header() -> None:
    _raises(hand_update(raw_sizes=(1000, 1024)), 32, "total_size")


def test_size_rules() -> None:
    _raises(hand_update(raw_sizes=(978, 1024)), 28, "data_size")
    _raises(hand_update(raw_sizes=(976, 1000)), 32, "total_size")
    _raises(hand_update(data=b"\x00" * 2000, raw_sizes=(0, 4096)), 32, "total_size")


def test_versions() -> None:
    _raises(hand_update(hdrver=2), 0, "header_version")
    _raises(hand_update() + hand_update(ldrver=0), 1024 + 20, "loader_version")


def test_ext_table_must_fit_exactly() -> None:
    # 12 bytes left after the data: too small for the 20-byte table header.
    data = b"\x00" * (1024 - 48 - 12)
    blob = hand_update(data=data, raw_sizes=(len(data), 1024)) + bytes(12)
    _raises(blob, 48 + len(data), "ext_table")
    # A count that does not match the space.
    good = bytearray(ext_blob())
    ext_at = 48 + parse_update(bytes(good)).data_size
    struct.pack_into("<I", good, ext_at, 7)
    _raises(bytes(good), ext_at, "ext_count")


# --- recover mode -------------------------------------------------------------------


def test_find_updates_at_odd_offsets_in_random_bytes() -> None:
    rng = random.Random(7)
    u1 = build_update(signature=0x906A4, revision=5, platform_mask=0x80, payload=bytes(976))
    u2 = ext_blob()
    bad = bytearray(hand_update(rev=9))
    bad[100] ^= 1
    blob = (
        rng.randbytes(3)
        + u1
        + rng.randbytes(5001)
        + u2
        + rng.randbytes(77)
        + bytes(bad)
        + rng.randbytes(4099)
    )
    found = list(find_updates(blob, source="r"))
    assert [(u.offset, u.checksum_ok) for u in found] == [
        (3, True),
        (3 + 1024 + 5001, True),
        (3 + 1024 + 5001 + 2048 + 77, False),
    ]
    assert found[1].ext_signatures[1].signature == 0xC06A2
    # start/end narrow the search.
    assert [u.offset for u in find_updates(blob, start=4)] == [6028, 8153]
    assert [u.offset for u in find_updates(blob, end=6028 + 2047)] == [3]


def test_find_updates_survives_garbage_candidates() -> None:
    real = hand_update(rev=3)
    # Fake headers that match the anchor bytes but have impossible sizes,
    # one of them overlapping the real update's start.
    fake = struct.pack("<12I", 1, 1, 0x01012020, 0, 0, 1, 1, 3, 5, 0, 0, 0)
    blob = fake + fake[:30] + real[:2] + fake + real + fake[:40]
    found = list(find_updates(blob))
    assert [u.offset for u in found] == [len(blob) - 40 - 1024]
    # A candidate that claims to be huge, right at the end.
    assert list(find_updates(b"\x00" * 9 + fake[:28])) == []
    assert list(find_updates(b"")) == []


def test_find_updates_inside_a_bad_checksum_update() -> None:
    inner = hand_update(rev=7)
    outer_payload = b"\x00" * 100 + inner + b"\x00" * (2048 - 48 - 100 - 1024)
    outer = bytearray(hand_update(data=outer_payload))
    outer[48 + 50] ^= 1
    found = list(find_updates(bytes(outer)))
    assert [(u.offset, u.checksum_ok) for u in found] == [(0, False), (148, True)]


def test_find_updates_in_sparse_gib_mmap(tmp_path: Path) -> None:
    path = tmp_path / "sparse.bin"
    u = build_update(signature=0x906A4, revision=5, platform_mask=0x80, payload=b"\x55" * 976)
    late = (1 << 30) - len(u) - 3
    with path.open("wb") as f:
        f.truncate(1 << 30)
        f.seek(12345)
        f.write(u)
        f.seek(late)
        f.write(u)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        start = time.perf_counter()
        found = [x.offset for x in find_updates(m, source=str(path))]
        elapsed = time.perf_counter() - start
        # iter_updates on an mmap too: strict, so the 3 trailing zeros are an error.
        assert [x.offset for x in iter_updates(m, offset=late, end=late + len(u))] == [late]
        with pytest.raises(TruncatedError) as info:
            list(iter_updates(m, offset=late))
        assert (info.value.offset, info.value.need, info.value.have) == (late + len(u), 48, 3)
    assert found == [12345, late]
    assert elapsed < 10, f"1 GiB sparse scan took {elapsed:.1f}s"


# --- .dat text -------------------------------------------------------------------------


def to_dat(blob: bytes) -> str:
    words = struct.unpack(f"<{len(blob) // 4}I", blob)
    lines = ["/*  Fri Jun 13 10:13:21 CST 2025  */", "/* 06-9a-04 */"]
    for i in range(0, len(words), 4):
        lines.append("\t".join(f"0x{w:08x}," for w in words[i : i + 4]))
    return "\n".join(lines) + "\n"


def test_parse_dat_round_trip() -> None:
    blob = hand_update() + ext_blob()
    assert parse_dat(to_dat(blob)) == blob
    assert [u.offset for u in iter_updates(parse_dat(to_dat(blob)))] == [0, 1024]


def test_parse_dat_separators_and_comments() -> None:
    text = "/* multi\n line */ 0x1 0x2,0x3 ,\n// note\n0XfFfFfFfF, /* x */ 0x0 // tail\n"
    assert parse_dat(text) == struct.pack("<5I", 1, 2, 3, M32, 0)
    assert parse_dat("") == b""


@pytest.mark.parametrize(
    ("text", "line", "col", "fragment"),
    [
        ("0x1,\n0x2, zz\n", 2, 6, "unexpected 'z'"),
        ("0x1,\n  0x100000000\n", 2, 3, "32 bits"),
        ("0x1g", 1, 4, "in a hex word"),
        ("0x1\n/* open\n\n", 2, 1, "unterminated"),
        ("/* a\nb */ 12", 2, 6, "unexpected '1'"),
        ("0x1 / 0x2", 1, 5, "unexpected '/'"),
    ],
)
def test_parse_dat_errors(text: str, line: int, col: int, fragment: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_dat(text, source="m.dat")
    assert (info.value.line, info.value.col) == (line, col), str(info.value)
    assert fragment in info.value.message
    assert str(info.value).startswith(f"m.dat:{line}:{col}: ")
