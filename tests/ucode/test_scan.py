"""ucode.scan: every update in bundles, early cpios, compressed initrds and unknown data."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import pytest
import zstandard

from tests.ucode import builders as b
from xenlab.formats.cpio import CpioMember, write_newc
from xenlab.ucode.cpu import Vendor
from xenlab.ucode.scan import scan_buffer, scan_file
from xenlab.ucode.update import Container, update_to_json


def test_intel_bundle_lists_every_update_with_offsets() -> None:
    blob = b.INTEL_OLD + b.INTEL_NEW + b.INTEL_PF40
    r = scan_buffer(blob, "bundle.bin")
    assert [p.kind for p in r.parts] == ["intel-bundle"]
    got = [(u.signatures, u.revision, u.source.offset) for u in r.updates]
    assert got == [
        ((0x906A4,), 0x10, 0),
        ((0x906A3, 0x906A3, 0x906A4), 0x43A, len(b.INTEL_OLD)),
        ((0x906A4,), 0xB, len(b.INTEL_OLD) + len(b.INTEL_NEW)),
    ]
    assert all(u.checksum_ok and u.vendor is Vendor.INTEL for u in r.updates)
    assert r.updates[1].raw == b.INTEL_NEW
    assert r.updates[1].platforms[1:] == ((0x906A3, 0x80), (0x906A4, 0x80))


def test_json_contract_fields() -> None:
    u = scan_buffer(b.INTEL_NEW, "x.bin").updates[0]
    j = update_to_json(u)
    assert j["vendor"] == "intel"
    assert j["signatures"] == [0x906A3, 0x906A3, 0x906A4]
    assert j["platform_mask"] == 0x80
    assert j["revision"] == 0x43A
    assert j["date"] == "2025-10-12"
    assert j["size"] == len(b.INTEL_NEW)
    assert j["checksum_ok"] is True
    assert j["source"] == {
        "file": "x.bin",
        "member": None,
        "offset": 0,
        "container": "bundle",
        "archive_offset": None,
        "compression": None,
        "early": False,
    }


def test_amd_container_maps_installed_cpus() -> None:
    r = scan_buffer(b.AMD_CONTAINER + b.AMD_CONTAINER, "amd.bin")
    assert len(r.updates) == 4
    first = r.updates[0]
    assert first.vendor is Vendor.AMD
    assert first.signatures == (0x800F12,)
    assert first.revision == 0x08001227
    assert first.family == 0x17
    assert first.raw == b.AMD_P1
    assert r.updates[2].source.offset == len(b.AMD_CONTAINER) + (first.source.offset)


def test_bad_checksum_is_reported_not_raised() -> None:
    bad = bytearray(b.INTEL_OLD)
    bad[100] ^= 0xFF
    r = scan_buffer(bytes(bad) + b.INTEL_PF40, "bad.bin")
    assert [u.checksum_ok for u in r.updates] == [False, True]


def test_truncated_bundle_warns_with_offset_and_keeps_the_rest() -> None:
    blob = b.INTEL_OLD + b.INTEL_NEW[:1000]
    r = scan_buffer(blob, "cut.bin")
    assert [u.revision for u in r.updates] == [0x10]
    assert r.findings, "the truncated update must be reported"
    assert f"{len(b.INTEL_OLD):#x}" in str(r.findings[0])


def _initrd(main_members: list[CpioMember], compress: str = "zstd") -> tuple[bytes, bytes]:
    early = b.early_cpio(b.INTEL_OLD + b.INTEL_NEW, b.AMD_CONTAINER)
    main = write_newc(main_members)
    packed = (
        zstandard.ZstdCompressor().compress(main) if compress == "zstd" else (gzip.compress(main))
    )
    return early, early + packed


def test_initrd_early_and_compressed_parts() -> None:
    members = [
        CpioMember("bin", mode=0o040755),
        CpioMember("bin/sh", b"\x7fELF" + bytes(5000), mode=0o100755),
        CpioMember("lib/firmware/intel-ucode/06-9a-04", b.INTEL_PF40),
        CpioMember("usr/share/whatever.bin", b.AMD_CONTAINER),
    ]
    early, img = _initrd(members)
    r = scan_buffer(img, "initrd.img")
    assert [p.kind for p in r.parts] == ["cpio", "compressed"]
    assert r.parts[1].compression == "zstd" and r.parts[1].offset == len(early)
    assert r.parts[1].end == len(img)
    early_ups = [u for u in r.updates if u.source.early]
    assert sorted(u.revision for u in early_ups) == [0x10, 0x43A, 0x08001227, 0x0800820B]
    assert all(u.source.container is Container.CPIO for u in early_ups)
    late = [u for u in r.updates if not u.source.early]
    assert {(u.source.member, u.revision, u.source.compression) for u in late} == {
        ("lib/firmware/intel-ucode/06-9a-04", 0xB, "zstd"),
        ("usr/share/whatever.bin", 0x08001227, "zstd"),
        ("usr/share/whatever.bin", 0x0800820B, "zstd"),
    }
    # The kernel-view scan stops at the compressed part.
    r2 = scan_buffer(img, "initrd.img", early_only=True)
    assert len(r2.updates) == 4 and all(u.source.early for u in r2.updates)


def test_gzip_main_archive_and_trailing_part() -> None:
    _, img = _initrd(
        [CpioMember("lib/firmware/amd-ucode/microcode_amd_fam17h.bin", b.AMD_CONTAINER)],
        compress="gzip",
    )
    r = scan_buffer(img, "i.gz")
    assert {u.source.compression for u in r.updates if not u.source.early} == {"gzip"}


def test_dot_slash_names_are_not_early(tmp_path: Path) -> None:
    img = b.early_cpio(b.INTEL_OLD, prefix="./")
    r = scan_buffer(img, "dot.img")
    assert len(r.updates) == 1 and not r.updates[0].source.early
    assert any("exact name" in f.message for f in r.findings)


def test_unknown_data_is_searched() -> None:
    blob = b.payload(10_001, 5) + b.INTEL_NEW + b.payload(333, 6) + b.AMD_CONTAINER
    r = scan_buffer(blob, "firmware.img")
    assert [p.kind for p in r.parts] == ["data"]
    assert [(u.vendor, u.source.offset) for u in r.updates][:1] == [(Vendor.INTEL, 10_001)]
    assert sorted(u.revision for u in r.updates) == [0x43A, 0x08001227, 0x0800820B]


def test_dat_text(tmp_path: Path) -> None:
    words = [
        int.from_bytes(b.INTEL_OLD[i : i + 4], "little") for i in range(0, len(b.INTEL_OLD), 4)
    ]
    text = "/* microcode.dat */\n" + "".join(
        f"0x{w:08x},{chr(10) if i % 4 == 3 else ' '}" for i, w in enumerate(words)
    )
    r = scan_buffer(text.encode(), "microcode.dat")
    assert [u.revision for u in r.updates] == [0x10]
    assert r.updates[0].raw == b.INTEL_OLD


def test_scan_file_sparse_gigabyte_is_fast(tmp_path: Path) -> None:
    p = tmp_path / "sparse.img"
    with p.open("wb") as f:
        f.truncate(1 << 30)
        f.seek(700 << 20)
        f.write(b.INTEL_PF40)
    start = time.perf_counter()
    r = scan_file(p)
    took = time.perf_counter() - start
    assert [(u.revision, u.source.offset) for u in r.updates] == [(0xB, 700 << 20)]
    assert took < 30, f"1 GiB sparse file took {took:.1f} s"


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_never_crash(seed: int) -> None:
    data = b.payload(4096, seed)
    for cut in (
        data,
        b"0707" + data,
        b"\x1f\x8b" + data,
        b"DMA\x00" + data,
        b.INTEL_OLD[:48] + data,
        b.early_cpio(b.INTEL_OLD)[:300] + data,
    ):
        try:
            scan_buffer(cut, "rnd")
        except Exception as err:  # only xenlab's format errors may escape
            from xenlab.errors import FormatError

            assert isinstance(err, FormatError), repr(err)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    from xenlab.errors import XenlabError

    with pytest.raises(XenlabError, match=r"nope\.img"):
        scan_file(tmp_path / "nope.img")


def test_zero_padding_after_updates_is_quiet() -> None:
    r = scan_buffer(b.INTEL_OLD + bytes(1024), "padded.bin")
    assert [u.revision for u in r.updates] == [0x10] and r.findings == []
    r = scan_buffer(b.AMD_CONTAINER + bytes(64), "padded-amd.bin")
    assert len(r.updates) == 2 and r.findings == []


def test_garbage_after_a_container_keeps_its_patches_and_names_the_offset() -> None:
    r = scan_buffer(b.AMD_CONTAINER + b"garbage!" * 100, "amd.bin")
    assert sorted(u.revision for u in r.updates) == [0x08001227, 0x0800820B]
    assert [str(f) for f in r.findings] == [
        f"amd.bin+{len(b.AMD_CONTAINER):#x}: section_type: 0x62726167, expected 1 (patch)"]
