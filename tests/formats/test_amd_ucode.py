"""Tests for xenlab.formats.amd_ucode: real AMD containers (SOURCES.md facts) and built ones."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenlab.errors import FormatError, TruncatedError
from xenlab.formats.amd_ucode import (
    CONTAINER_MAGIC,
    AmdContainer,
    EquivEntry,
    build_container,
    build_patch,
    family_of,
    find_containers,
    iter_containers,
    max_patch_size,
    parse_container,
    patch_family,
)

M32 = 0xFFFFFFFF

# --- hand-made fixtures (struct, not the module's writer) ----------------------


def hand_patch(
    *, patch_id: int, rev_id: int, date: int = 0x02092018, body: bytes = bytes(3200 - 64)
) -> bytes:
    header = struct.pack(
        "<IIHBBIIIHBBB3x8I", date, patch_id, 0x8004, 0, 0, 0, 0, 0, rev_id, 0, 0, 0, *[0] * 8
    )
    return header + body


def hand_container(equiv: list[tuple[int, int]], patches: list[bytes]) -> bytes:
    rows = b"".join(struct.pack("<IIIHH", cpu, 0, 0, eid, 0) for cpu, eid in equiv)
    rows += bytes(16)
    out = struct.pack("<III", 0x00414D44, 0, len(rows)) + rows
    for p in patches:
        out += struct.pack("<II", 1, len(p)) + p
    return out


def zen1() -> bytes:
    return hand_container(
        [(0x800F12, 0x8012), (0x800F82, 0x8082)],
        [
            hand_patch(patch_id=0x8001227, rev_id=0x8012),
            hand_patch(patch_id=0x800820B, rev_id=0x8082, date=0x06202018),
        ],
    )


def test_hand_fixture_matches_writer() -> None:
    built = build_container(
        [EquivEntry(0x800F12, 0, 0, 0x8012), EquivEntry(0x800F82, 0, 0, 0x8082)],
        [
            build_patch(
                patch_id=0x8001227,
                processor_rev_id=0x8012,
                date="2018-02-09",
                body=bytes(3136),
                data_id=0x8004,
            ),
            build_patch(
                patch_id=0x800820B,
                processor_rev_id=0x8082,
                date="2018-06-20",
                body=bytes(3136),
                data_id=0x8004,
            ),
        ],
    )
    assert built == zen1()


def test_built_zen1_container() -> None:
    (c,) = iter_containers(zen1(), source="z")
    assert (c.offset, c.end) == (0, len(zen1()))
    assert [e.installed_cpu for e in c.equiv_table] == [0x800F12, 0x800F82]
    p1, p2 = c.patches
    assert (p1.offset, p1.size, p1.patch_id, p1.family, p1.date) == (
        12 + 48 + 8,
        3200,
        0x8001227,
        0x17,
        "2018-02-09",
    )
    assert p1.size_ok and p1.checksum_ok is None and p1.problems == ()
    assert c.signatures_for(p2) == (0x800F82,)
    assert p2.end == len(zen1())


# --- real files ---------------------------------------------------------------------


def load(shared_data: Path, name: str) -> tuple[bytes, list[AmdContainer]]:
    data = (shared_data / "microcode" / "amd" / name).read_bytes()
    return data, list(iter_containers(data, source=name))


def test_real_microcode_amd_bin(shared_data: Path) -> None:
    data, (c,) = load(shared_data, "microcode_amd.bin")
    assert c.end == len(data) == 12684
    assert len(c.equiv_table) == 17  # 288 bytes: 17 entries and the zero terminator
    assert len(c.patches) == 12
    assert {p.size for p in c.patches} == {960, 512, 1568}
    assert {p.family for p in c.patches} == {0x10, 0x11, 0x12, 0x14}
    assert all(p.size_ok for p in c.patches)
    # Families 10h-12h carry a real checksum of the body; 14h does not.
    assert [p.checksum_ok for p in c.patches] == [True] * 10 + [None] * 2
    (quirk,) = [p for p in c.patches if p.date_raw == 0x13092011]
    assert quirk.date == "2011-13-09"
    assert quirk.problems == ("date 0x13092011 has month 13, expected 1..12",)
    assert quirk.patch_id == 0x3000027 and c.signatures_for(quirk) == (0x300F10,)
    assert sum(1 for p in c.patches if p.problems) == 1
    first = c.patches[0]
    assert (first.offset, first.patch_id, first.processor_rev_id) == (308, 0x1000083, 0x1022)
    assert c.signatures_for(first) == (0x100F23, 0x100F22)
    assert (first.data_id, first.data_len, first.checksum) == (0x8000, 0x20, 0x074388A8)


def test_real_fam15h(shared_data: Path) -> None:
    _, (c,) = load(shared_data, "microcode_amd_fam15h.bin")
    assert [e.installed_cpu for e in c.equiv_table] == [0x600F20, 0x610F01, 0x600F12]
    assert [p.size for p in c.patches] == [2592] * 3
    assert {p.family for p in c.patches} == {0x15}
    assert all(p.size_ok and p.problems == () for p in c.patches)


def test_real_fam16h(shared_data: Path) -> None:
    _, (c,) = load(shared_data, "microcode_amd_fam16h.bin")
    assert [e.installed_cpu for e in c.equiv_table] == [0x700F01]
    (p,) = c.patches
    assert p.size == 3458 == max_patch_size(0x16)  # exactly at the family's limit
    assert p.size_ok and p.family == 0x16 and p.patch_id == 0x700010F


def test_real_fam17h(shared_data: Path) -> None:
    data, (c,) = load(shared_data, "microcode_amd_fam17h.bin")
    assert c.end == len(data) == 6476
    assert [e.installed_cpu for e in c.equiv_table] == [0x800F12, 0x800F82]
    assert [p.patch_id for p in c.patches] == [0x8001227, 0x800820B]
    assert [p.size for p in c.patches] == [3200, 3200]
    assert [p.date for p in c.patches] == ["2018-02-09", "2018-06-20"]
    assert [c.signatures_for(p) for p in c.patches] == [(0x800F12,), (0x800F82,)]
    assert all(p.family == 0x17 and p.size_ok for p in c.patches)
    assert family_of(0x800F12) == 0x17


def test_real_files_concatenated_and_found(shared_data: Path) -> None:
    names = [
        "microcode_amd.bin",
        "microcode_amd_fam15h.bin",
        "microcode_amd_fam16h.bin",
        "microcode_amd_fam17h.bin",
    ]
    blobs = [(shared_data / "microcode" / "amd" / n).read_bytes() for n in names]
    joined = b"".join(blobs)
    walked = list(iter_containers(joined))
    assert [c.offset for c in walked] == [0, 12684, 12684 + 7876, 12684 + 7876 + 3510]
    assert [len(c.patches) for c in walked] == [12, 3, 1, 2]
    rng = random.Random(3)
    noisy = rng.randbytes(7) + blobs[1] + rng.randbytes(1001) + blobs[3] + rng.randbytes(13)
    found = list(find_containers(noisy))
    assert [c.offset for c in found] == [7, 7 + 7876 + 1001]
    assert [len(c.patches) for c in found] == [3, 2]
    assert "bad section" in found[1].problems[0]


# --- families and sizes -----------------------------------------------------------


def test_family_helpers() -> None:
    assert family_of(0x100F23) == 0x10
    assert family_of(0x500F10) == 0x14
    assert family_of(0xA00F11) == 0x19
    assert family_of(0xB40F40) == 0x1A
    assert family_of(0x000906A4) == 6  # base family below 0xf: no extended family
    assert patch_family(0x1022) == 0x10
    assert patch_family(0x3010) == 0x12
    assert patch_family(0xA011) == 0x19
    assert patch_family(0xB040) == 0x1A
    assert [max_patch_size(f) for f in (0x10, 0x11, 0x12, 0x14, 0x15, 0x16, 0x17, 0x19, 0x1A)] == [
        2048,
        2048,
        2048,
        1824,
        4096,
        3458,
        3200,
        5568,
        15296,
    ]
    assert max_patch_size(0x13) is None and max_patch_size(0x18) is None
    assert max_patch_size(0x1B) is None


def test_oversized_patch_is_reported() -> None:
    blob = hand_container(
        [(0x800F12, 0x8012)], [hand_patch(patch_id=1, rev_id=0x8012, body=bytes(3137))]
    )
    (c,) = iter_containers(blob)
    (p,) = c.patches
    assert p.size == 3201 and not p.size_ok
    assert p.problems == ("patch of 3201 bytes exceeds family 0x17's maximum of 3200",)
    unknown = hand_container(
        [(0x1, 0xC000)], [hand_patch(patch_id=1, rev_id=0xC000, body=bytes(99999))]
    )
    (q,) = next(iter_containers(unknown)).patches
    assert q.family == 0x1B and q.size_ok


def test_problems_for_chipset_and_unmapped_patches() -> None:
    patch = bytearray(hand_patch(patch_id=1, rev_id=0x8012))
    struct.pack_into("<I", patch, 16, 0x1022)
    blob = hand_container([(0x800F12, 0x8082)], [bytes(patch)])
    (p,) = parse_container(blob).patches
    assert any("chipset-specific" in x for x in p.problems)
    assert any("no equivalence entry maps to processor_rev_id 0x8012" in x for x in p.problems)


def test_old_family_checksum() -> None:
    body = random.Random(1).randbytes(896)
    good = build_patch(patch_id=0x1000083, processor_rev_id=0x1022, body=body, data_len=0x20)
    blob = build_container([EquivEntry(0x100F22, 0, 0, 0x1022)], [good])
    (p,) = parse_container(blob).patches
    assert p.checksum_ok is True and p.checksum != 0
    bad = bytearray(blob)
    bad[-5] ^= 0x10
    (q,) = parse_container(bytes(bad)).patches
    assert q.checksum_ok is False
    assert any(x.startswith(f"checksum {p.checksum:#010x}") for x in q.problems)


# --- writer round trip ----------------------------------------------------------------

equiv_entries = st.builds(
    EquivEntry,
    st.integers(1, M32),
    st.integers(0, M32),
    st.integers(0, M32),
    st.integers(0, 0xFFFF),
)


@given(
    equiv=st.lists(equiv_entries, min_size=1, max_size=6),
    patches=st.lists(
        st.tuples(
            st.integers(0, M32),
            st.integers(0, 0xFFFF),
            st.integers(0, 600),
            st.integers(1995, 2099),
            st.integers(1, 12),
            st.integers(1, 28),
            st.integers(0, 0xFF),
        ),
        max_size=4,
    ),
    copies=st.integers(1, 3),
)
def test_build_parse_round_trip(
    equiv: list[EquivEntry], patches: list[tuple[int, int, int, int, int, int, int]], copies: int
) -> None:
    blobs = [
        build_patch(
            patch_id=pid,
            processor_rev_id=rid,
            date=f"{y:04d}-{m:02d}-{d:02d}",
            body=bytes([n % 256]) * n,
            bios_api_rev=api,
        )
        for pid, rid, n, y, m, d, api in patches
    ]
    one = build_container(equiv, blobs)
    got = list(iter_containers(one * copies))
    assert len(got) == copies
    for i, c in enumerate(got):
        assert (c.offset, c.end) == (i * len(one), (i + 1) * len(one))
        assert list(c.equiv_table) == equiv
        assert [p.patch_id for p in c.patches] == [x[0] for x in patches]
        assert [p.processor_rev_id for p in c.patches] == [x[1] for x in patches]
        assert [p.size for p in c.patches] == [64 + x[2] for x in patches]
        assert [p.date for p in c.patches] == [
            f"{y:04d}-{m:02d}-{d:02d}" for _, _, _, y, m, d, _ in patches
        ]
        assert [p.bios_api_rev for p in c.patches] == [x[6] for x in patches]
    assert list(find_containers(one * copies)) == got


# --- structural errors with offsets ---------------------------------------------------


def _raises(blob: bytes, offset: int, field: str, kind: type[FormatError] = FormatError) -> None:
    with pytest.raises(kind) as info:
        list(iter_containers(blob, source="a.bin"))
    assert type(info.value) is kind
    assert (info.value.offset, info.value.field) == (offset, field), str(info.value)
    assert str(info.value).startswith(f"a.bin+{offset:#x}: {field}: ")


def test_container_errors() -> None:
    good = zen1()
    _raises(good[:11], 0, "container header", TruncatedError)
    _raises(b"XMA\x00" + good[4:], 0, "magic")
    _raises(good + b"DMA\x00\x01\x00\x00\x00" + good[8:], len(good) + 4, "equiv_type")
    bad_len = bytearray(good)
    struct.pack_into("<I", bad_len, 8, 40)
    _raises(bytes(bad_len), 8, "equiv_len")
    struct.pack_into("<I", bad_len, 8, 0)
    _raises(bytes(bad_len), 8, "equiv_len")
    huge = bytearray(good)
    struct.pack_into("<I", huge, 8, 0xFFFFFFF0)
    _raises(bytes(huge), 12, "equivalence table", TruncatedError)
    first_section = 12 + 48
    wrong_type = bytearray(good)
    struct.pack_into("<I", wrong_type, first_section, 2)
    _raises(bytes(wrong_type), first_section, "section_type")
    short = bytearray(good)
    struct.pack_into("<I", short, first_section + 4, 63)
    _raises(bytes(short), first_section + 4, "section_len")
    over = bytearray(good)
    second = first_section + 8 + 3200
    struct.pack_into("<I", over, second + 4, 0xFFFFFFFF)
    _raises(bytes(over), second, "patch section", TruncatedError)
    _raises(good[:-1], second, "patch section", TruncatedError)
    _raises(good + b"\x00\x00\x00", len(good), "section header", TruncatedError)
    _raises(good + bytes(16), len(good), "section_type")


def test_parse_container_stops_at_next_magic() -> None:
    two = zen1() + zen1()
    c = parse_container(two)
    assert c.end == len(zen1()) and len(c.patches) == 2
    assert parse_container(two, len(zen1())).end == len(two)
    assert struct.unpack("<I", b"DMA\x00")[0] == CONTAINER_MAGIC


def test_find_containers_recovers_from_garbage() -> None:
    rng = random.Random(11)
    good = zen1()
    truncated = good[:-100]
    fake = b"DMA\x00\x00\x00\x00\x00" + struct.pack("<I", 0xFFFFFFF0)
    blob = fake + rng.randbytes(5) + good + fake + truncated
    found = list(find_containers(blob, source="g"))
    assert [c.offset for c in found] == [17, 17 + len(good) + 12]
    assert len(found[0].patches) == 2 and found[0].problems == ()
    assert len(found[1].patches) == 1 and "patch section" in found[1].problems[0]
    assert list(find_containers(b"")) == []
    assert list(find_containers(b"DMA\x00\x00\x00\x00")) == []
