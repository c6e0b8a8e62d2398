"""Tests of the iucode_tool oracle wrapper (tests/oracle/iucode.py) on real and built files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.oracle import iucode
from tests.oracle.iucode import IucodeEntry
from tests.ucode.initrds import make_intel_update, run_tool

LIST_L = """microcode bundle 1: a/06-9a-04
microcode bundle 2: b/06-97-05
selected microcodes:
  001/001: sig 0x000906a3, pf_mask 0x80, 2025-10-12, rev 0x043a, size 224256
  002/001: sig 0x000b06f7, pf_mask 0x07, 2025-10-12, rev 0x003d, size 226304
  001/002: sig 0x000906a4, pf_mask 0x40, 2025-06-13, rev 0xffffffff, size 119808
"""

LIST_ALL = """microcode bundle 1: 06-9a-04
  001/001: sig 0x000906a3, pf_mask 0x80, 2025-10-12, rev 0x043a, size 224256
           sig 0x000906a3, pf_mask 0x80, 2025-10-12, rev 0x043a
           sig 0x000906a4, pf_mask 0x80, 2025-10-12, rev 0x043a
  001/002: sig 0x000906a4, pf_mask 0x40, 2025-06-13, rev 0x000b, size 119808
"""


@pytest.fixture(scope="module")
def iucode_tool() -> str:
    """iucode_tool's version; skipped, with the reason, when it is not installed."""
    try:
        return iucode.version()
    except iucode.IucodeUnavailable as err:
        pytest.skip(err.reason)


def triples(entries: list[IucodeEntry]) -> list[tuple[int, int, int]]:
    return sorted((e.sig, e.pf_mask, e.rev) for e in entries)


# --------------------------------------------------------------------------
# Parsing the listing (no tool needed)
# --------------------------------------------------------------------------


def test_parse_listing_selected() -> None:
    entries = iucode.parse_listing(LIST_L)
    assert entries == [
        IucodeEntry(1, 1, "a/06-9a-04", 0x906A3, 0x80, "2025-10-12", 0x43A, 224256),
        IucodeEntry(2, 1, "b/06-97-05", 0xB06F7, 0x07, "2025-10-12", 0x3D, 226304),
        IucodeEntry(1, 2, "a/06-9a-04", 0x906A4, 0x40, "2025-06-13", 0xFFFFFFFF, 119808),
    ]


def test_parse_listing_all_marks_extended_lines() -> None:
    entries = iucode.parse_listing(LIST_ALL)
    assert [(e.index, e.sig, e.extended, e.size) for e in entries] == [
        (1, 0x906A3, False, 224256),
        (1, 0x906A3, True, 224256),
        (1, 0x906A4, True, 224256),
        (2, 0x906A4, False, 119808),
    ]


def test_parse_listing_rejects_orphan_continuation() -> None:
    with pytest.raises(ValueError, match="continuation"):
        iucode.parse_listing("    sig 0x000906a3, pf_mask 0x80, 2025-10-12, rev 0x043a\n")


# --------------------------------------------------------------------------
# The real tool on the real files
# --------------------------------------------------------------------------


def test_version(iucode_tool: str) -> None:
    assert iucode_tool.split(".")[0].isdigit()


def test_list_06_9a_04(iucode_tool: str, shared_data: Path) -> None:
    path = shared_data / "microcode" / "intel" / "06-9a-04"
    assert iucode.list_updates([path]) == [
        IucodeEntry(1, 1, str(path), 0x906A3, 0x80, "2025-10-12", 0x43A, 224256),
        IucodeEntry(1, 1, str(path), 0x906A4, 0x80, "2025-10-12", 0x43A, 224256),
        IucodeEntry(1, 2, str(path), 0x906A4, 0x40, "2025-06-13", 0xB, 119808),
    ]
    every = iucode.list_updates([path], all=True)
    assert [(e.index, e.sig, e.extended) for e in every] == [
        (1, 0x906A3, False),
        (1, 0x906A3, True),
        (1, 0x906A4, True),
        (2, 0x906A4, False),
    ]


def test_list_several_bundles(iucode_tool: str, shared_data: Path) -> None:
    intel = shared_data / "microcode" / "intel"
    names = ["06-03-02", "06-05-03", "06-97-05", "0f-04-08", "with-caveats/06-4f-01"]
    entries = iucode.list_updates([intel / n for n in names])
    by_bundle = {b: [e for e in entries if e.bundle == b] for b in range(1, 6)}
    # data_size=0 means 2000 bytes of data, 2048 in all; its sig has type bit 12 set.
    assert [(e.sig, e.rev, e.size) for e in by_bundle[1]] == [(0x1632, 0x2, 2048)]
    assert sorted(e.pf_mask for e in by_bundle[2]) == [0x1, 0x2, 0x4, 0x8]
    # one update, six signatures through its extended table
    assert {e.index for e in by_bundle[3]} == {1}
    assert len(by_bundle[3]) == 6
    assert {e.sig for e in by_bundle[4]} == {0xF48}
    assert [(e.sig, e.rev) for e in by_bundle[5]] == [(0x406F1, 0xB000040)]
    assert all(e.path.endswith(n) for b, n in enumerate(names, 1) for e in by_bundle[b])


def test_select(iucode_tool: str, shared_data: Path) -> None:
    intel = shared_data / "microcode" / "intel"
    paths = [intel / "06-9a-04", intel / "06-97-05"]
    assert triples(iucode.select(paths, 0x906A4, 0x80)) == [(0x906A4, 0x80, 0x43A)]
    assert triples(iucode.select(paths, 0x906A4)) == [(0x906A4, 0x40, 0xB), (0x906A4, 0x80, 0x43A)]
    # the mask is a mask: 0xc0 meets both platforms
    assert len(iucode.select(paths, 0x906A4, 0xC0)) == 2
    (ext,) = iucode.select(paths, 0x90675)
    assert (ext.bundle, ext.index, ext.size) == (2, 1, 226304)
    assert iucode.select(paths, 0x906A4, 0x01) == []
    assert iucode.select(paths, 0x12345) == []


def test_select_old_masks(iucode_tool: str, shared_data: Path) -> None:
    path = shared_data / "microcode" / "intel" / "06-05-03"
    assert sorted(e.pf_mask for e in iucode.select([path], 0x653, 0x3)) == [0x1, 0x2]


def test_write_firmware_dir(iucode_tool: str, shared_data: Path, tmp_path: Path) -> None:
    intel = shared_data / "microcode" / "intel"
    files = iucode.write_firmware_dir([intel / "06-97-05", intel / "06-9a-04"], tmp_path / "fw")
    assert [f.name for f in files] == [
        "06-97-02", "06-97-05", "06-9a-03", "06-9a-04",
        "06-bf-02", "06-bf-05", "06-bf-06", "06-bf-07",
    ]  # fmt: skip
    # 06-9a-04 holds both of its updates; 06-9a-03 only the one that names it.
    assert (tmp_path / "fw" / "06-9a-04").read_bytes() == (intel / "06-9a-04").read_bytes()
    assert (tmp_path / "fw" / "06-9a-03").stat().st_size == 224256


def test_write_earlyfw_selected(iucode_tool: str, shared_data: Path, tmp_path: Path) -> None:
    intel = shared_data / "microcode" / "intel"
    out = iucode.write_earlyfw(
        [intel / "06-9a-04", intel / "06-55-04"], tmp_path / "e.cpio", sig=0x50654
    )
    names = run_tool(["cpio", "--quiet", "-it"], input=out.read_bytes()).decode().split()
    assert "kernel/x86/microcode/GenuineIntel.bin" in names
    assert triples(iucode.list_updates([out], type="r")) == [(0x50654, 0xB7, 0x2007006)]
    # written again over the same file (--overwrite), smaller without alignment padding
    mini = iucode.write_earlyfw([intel / "06-55-04"], out, mini=True)
    assert mini.stat().st_size < 44032 + 1024
    assert triples(iucode.list_updates([mini], type="r")) == [(0x50654, 0xB7, 0x2007006)]


# --------------------------------------------------------------------------
# The real tool on updates built here (a fresh clone has no ../shared)
# --------------------------------------------------------------------------


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, Path]:
    a = make_intel_update(
        signature=0x806EC, revision=0xF6, platform_mask=0x94, date="2024-02-05", seed=1
    )
    ext = ((0x806EA, 0xC0), (0x806EB, 0xD0))
    b = make_intel_update(
        signature=0x806E9, revision=0xF4, platform_mask=0xC0, date="2023-07-16",
        data_size=2048 - 48 - 20 - 12 * len(ext), ext=ext, seed=2,
    )  # fmt: skip
    old = make_intel_update(
        signature=0x806EC, revision=0xF0, platform_mask=0x94, date="2021-01-01", seed=3
    )
    (tmp_path / "one.bin").write_bytes(a + b)
    (tmp_path / "old.bin").write_bytes(old)
    return tmp_path / "one.bin", tmp_path / "old.bin"


def test_built_updates_listed(iucode_tool: str, built: tuple[Path, Path]) -> None:
    one, old = built
    entries = iucode.list_updates([one])
    assert [(e.index, e.sig, e.pf_mask, e.rev, e.date, e.size) for e in entries] == [
        (2, 0x806E9, 0xC0, 0xF4, "2023-07-16", 2048),
        (2, 0x806EA, 0xC0, 0xF4, "2023-07-16", 2048),
        (2, 0x806EB, 0xD0, 0xF4, "2023-07-16", 2048),
        (1, 0x806EC, 0x94, 0xF6, "2024-02-05", 1024),
    ]
    # -l keeps the highest revision; -L shows both
    assert triples(iucode.list_updates([old, one]))[-1] == (0x806EC, 0x94, 0xF6)
    every = iucode.list_updates([old, one], all=True)
    assert sorted(e.rev for e in every if e.sig == 0x806EC) == [0xF0, 0xF6]


def test_built_updates_selected_and_written(
    iucode_tool: str, built: tuple[Path, Path], tmp_path: Path
) -> None:
    one, _ = built
    assert triples(iucode.select([one], 0x806EB, 0x10)) == [(0x806EB, 0xD0, 0xF4)]
    assert iucode.select([one], 0x806EB, 0x20) == []
    files = iucode.write_firmware_dir([one], tmp_path / "fw")
    assert [f.name for f in files] == ["06-8e-09", "06-8e-0a", "06-8e-0b", "06-8e-0c"]
    early = iucode.write_earlyfw([one], tmp_path / "early.cpio")
    assert early.stat().st_size % 512 == 0
    assert triples(iucode.list_updates([early], type="r")) == triples(iucode.list_updates([one]))


def test_broken_checksum_is_refused(iucode_tool: str, tmp_path: Path) -> None:
    data = bytearray(make_intel_update(signature=0x906A4, revision=1, platform_mask=1))
    data[100] ^= 0xFF
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(iucode.IucodeFailed, match="exited"):
        iucode.list_updates([path])


def test_missing_file_fails(iucode_tool: str, tmp_path: Path) -> None:
    with pytest.raises(iucode.IucodeFailed, match="cannot open"):
        iucode.list_updates([tmp_path / "absent.bin"])
