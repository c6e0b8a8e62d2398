"""ucode.extract and ucode.early: firmware layouts, bundles, early cpios, appended initrds."""

from __future__ import annotations

import subprocess
from pathlib import Path, PurePosixPath

import pytest

from tests.oracle import iucode
from tests.ucode import builders as b
from xenlab.errors import XenlabError
from xenlab.formats.cpio import CpioMember, write_newc
from xenlab.ucode.early import build_early, old_early_end
from xenlab.ucode.extract import (
    firmware_files,
    intel_bundle,
    newest_only,
    unique,
    write_tree,
)
from xenlab.ucode.scan import scan_buffer, scan_file

ALL = b.INTEL_OLD + b.INTEL_NEW + b.INTEL_PF40


def test_firmware_layout_intel_and_amd() -> None:
    ups = scan_buffer(ALL, "a").updates + scan_buffer(b.AMD_CONTAINER, "b").updates
    files = firmware_files(newest_only(ups))
    assert set(files) == {
        PurePosixPath("intel-ucode/06-9a-03"),
        PurePosixPath("intel-ucode/06-9a-04"),
        PurePosixPath("amd-ucode/microcode_amd_fam17h.bin"),
    }
    assert files[PurePosixPath("intel-ucode/06-9a-03")] == b.INTEL_NEW
    assert files[PurePosixPath("intel-ucode/06-9a-04")] == b.INTEL_NEW + b.INTEL_PF40
    amd = scan_buffer(files[PurePosixPath("amd-ucode/microcode_amd_fam17h.bin")], "c").updates
    assert [(u.signatures, u.revision) for u in amd] == [
        ((0x800F12,), 0x08001227),
        ((0x800F82,), 0x0800820B),
    ]


def test_newest_only_and_unique() -> None:
    ups = scan_buffer(ALL + ALL, "a").updates
    assert len(unique(ups)) == 3
    assert [u.revision for u in newest_only(ups)] == [0x43A, 0xB]


def test_intel_firmware_files_equal_iucode_tool(tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(ALL)
    peer = {p.name: p.read_bytes() for p in iucode.write_firmware_dir([src], tmp_path / "peer")}
    ours = {p.name: d for p, d in firmware_files(newest_only(scan_file(src).updates)).items()}
    assert ours == peer


def test_real_intel_firmware_files_equal_iucode_tool(shared_data: Path, tmp_path: Path) -> None:
    d = shared_data / "microcode" / "intel"
    files = sorted(p for p in d.iterdir() if p.is_file() and "." not in p.name)
    peer = {p.name: p.read_bytes() for p in iucode.write_firmware_dir(files, tmp_path / "peer")}
    ups = [u for f in files for u in scan_file(f).updates]
    ours = {p.name: d for p, d in firmware_files(newest_only(ups)).items()}
    assert set(ours) == set(peer)
    assert ours == peer


def test_write_tree_refuses_escape(tmp_path: Path) -> None:
    with pytest.raises(XenlabError, match="outside the target"):
        write_tree(tmp_path / "t", {PurePosixPath("../evil"): b"x", PurePosixPath("ok"): b"y"})
    assert not (tmp_path / "evil").exists() and not (tmp_path / "t" / "ok").exists()


def test_early_cpio_is_seen_by_the_loaders_view() -> None:
    ups = scan_buffer(ALL, "a").updates + scan_buffer(b.AMD_CONTAINER, "b").updates
    img = build_early(ups)
    assert len(img.data) % 512 == 0
    r = scan_buffer(img.data, "early.cpio", early_only=True)
    assert {u.raw for u in r.updates if u.source.early} == {u.raw for u in ups}


def test_early_cpio_read_by_real_cpio(tmp_path: Path) -> None:
    ups = scan_buffer(ALL, "a").updates
    f = tmp_path / "early.cpio"
    f.write_bytes(build_early(ups).data)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "-F", str(f)], cwd=out, check=True)
    assert (out / "kernel/x86/microcode/GenuineIntel.bin").read_bytes() == intel_bundle(ups)


def test_early_cpio_equals_iucode_tool_earlyfw_content(tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(ALL)
    peer = iucode.write_earlyfw([src], tmp_path / "peer.cpio")
    ours = build_early(newest_only(scan_file(src).updates)).data
    p_ups = scan_file(peer, early_only=True).updates
    o_ups = scan_buffer(ours, "o", early_only=True).updates
    assert sorted(u.raw for u in p_ups) == sorted(u.raw for u in o_ups)
    assert all(u.source.early for u in p_ups + o_ups)


def test_append_replaces_old_early_part() -> None:
    old = b.early_cpio(b.INTEL_OLD)
    main = write_newc([CpioMember("init", b"#!/bin/sh\n", mode=0o100755)])
    import zstandard

    initrd = old + zstandard.ZstdCompressor().compress(main)
    assert old_early_end(initrd) == len(old)
    new_ups = scan_buffer(b.INTEL_NEW, "n").updates
    img = build_early(new_ups, initrd)
    assert img.replaced_early == len(old)
    r = scan_buffer(img.data, "new.img")
    assert [u.revision for u in r.updates if u.source.early] == [0x43A]
    assert [p.kind for p in r.parts] == ["cpio", "compressed"]
    kept = build_early(new_ups, initrd, keep_old_early=True)
    r2 = scan_buffer(kept.data, "k.img")
    assert sorted(u.revision for u in r2.updates) == [0x10, 0x43A]
    # The first archive wins for the loaders: only the new one is early.
    assert [u.revision for u in r2.updates if u.source.early] == [0x43A]


def test_old_early_end_keeps_a_real_root_archive() -> None:
    root = write_newc([CpioMember("kernel", mode=0o040755), CpioMember("init", b"x")])
    assert old_early_end(root) == 0
