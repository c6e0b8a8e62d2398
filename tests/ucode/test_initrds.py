"""The built initrds as the peer tools see them: GNU cpio, lsinitramfs/unmkinitramfs, iucode_tool.

These views are what xenlab's initrd scanner is later compared with, so each
test states what the peer tool must find (member names, microcode counts,
bytes), from the fixtures' inputs.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.oracle import iucode
from tests.ucode import initrds
from tests.ucode.conftest import COMPRESSIONS
from tests.ucode.initrds import DebianInitrd, EarlyCpio, Tree, run_tool

#: First bytes of each compressed stream (the kernel's decompress table).
MAGIC = {
    "gzip": b"\x1f\x8b",
    "bzip2": b"BZh",
    "xz": b"\xfd7zXZ\x00",
    "lzma": b"\x5d\x00\x00",
    "zstd": b"\x28\xb5\x2f\xfd",
    "lz4": b"\x02\x21\x4c\x18",  # legacy frame
    "none": b"070701",
}


def lsinitramfs(path: Path) -> list[str]:
    """Debian's ``lsinitramfs``: member names of every archive in the file."""
    return run_tool(["lsinitramfs", path]).decode().splitlines()


def cpio_names(path: Path) -> list[str]:
    """GNU ``cpio -it`` of one uncompressed archive."""
    return run_tool(["cpio", "--quiet", "-it"], input=path.read_bytes()).decode().splitlines()


def member_bytes(archive: Path, member: str, workdir: Path) -> bytes:
    """One member of an uncompressed archive, extracted by GNU cpio."""
    workdir.mkdir(parents=True, exist_ok=True)
    run_tool(["cpio", "--quiet", "-idm", member], input=archive.read_bytes(), cwd=workdir)
    return (workdir / member).read_bytes()


def triples(entries: list[iucode.IucodeEntry]) -> list[tuple[int, int, int]]:
    return sorted((e.sig, e.pf_mask, e.rev) for e in entries)


def amd_patch_count(data: bytes) -> int:
    """Patches in back-to-back AMD containers, walked by hand (magic, type 0 table, type 1s)."""
    count = pos = 0
    while pos < len(data):
        magic, kind, size = struct.unpack_from("<III", data, pos)
        assert (magic, kind) == (0x00414D44, 0), f"no container at {pos:#x}"
        pos += 12 + size
        while pos + 8 <= len(data) and struct.unpack_from("<I", data, pos)[0] == 1:
            pos += 8 + struct.unpack_from("<I", data, pos + 4)[0]
            count += 1
    assert pos == len(data)
    return count


# --------------------------------------------------------------------------
# The main archive
# --------------------------------------------------------------------------


def test_busybox_tree(busybox_tree: Tree) -> None:
    root = busybox_tree.path
    assert (root / "bin" / "sh").readlink() == Path("busybox")
    assert (root / "bin" / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert (root / "init").stat().st_mode & 0o777 == 0o755
    assert {"init", "bin/busybox", "bin/switch_root", "dev", "proc", "sys"} <= set(
        busybox_tree.members
    )
    size = sum(p.stat().st_size for p in root.rglob("*.ko"))
    assert size >= 500_000


def test_main_cpio_bare(busybox_tree: Tree, main_cpio: Callable[[str], Path]) -> None:
    raw = main_cpio("none")
    assert raw.read_bytes().startswith(MAGIC["none"])
    names = cpio_names(raw)
    assert names == sorted(names)  # mkinitramfs' LC_ALL=C sort
    assert set(names) == {".", *busybox_tree.members}
    assert raw.stat().st_size % 512 == 0  # GNU cpio pads to its block size


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_main_cpio_compressed(
    compression: str, busybox_tree: Tree, main_cpio: Callable[[str], Path]
) -> None:
    path = main_cpio(compression)
    assert path.read_bytes().startswith(MAGIC[compression])
    assert set(lsinitramfs(path)) == {".", *busybox_tree.members}
    # The random module bytes keep the archive large whatever the compressor.
    assert path.stat().st_size > 500_000


def test_main_cpio_is_reproducible(busybox_tree: Tree, tmp_path: Path) -> None:
    again = initrds.cpio_newc(busybox_tree.path, tmp_path / "again.cpio")
    first = initrds.cpio_newc(busybox_tree.path, tmp_path / "first.cpio")
    assert again.read_bytes() == first.read_bytes()


# --------------------------------------------------------------------------
# The early archives
# --------------------------------------------------------------------------


def test_intel_early_cpio(intel_early_cpio: EarlyCpio, tmp_path: Path) -> None:
    early = intel_early_cpio
    names = cpio_names(early.path)
    assert early.member in names
    assert "kernel/x86/microcode/.enuineIntel.align.0123456789abc" in names
    assert early.path.stat().st_size % 512 == 0
    # The recover loader finds every update inside the archive...
    found = iucode.list_updates([early.path], type="r")
    assert triples(found) == sorted(early.intel)
    # ...and the member itself is the sources' updates, as a plain bundle.
    run_tool(["cpio", "--quiet", "-idm", early.member], input=early.path.read_bytes(), cwd=tmp_path)
    bundle = tmp_path / early.member
    assert triples(iucode.list_updates([bundle])) == sorted(early.intel)
    assert bundle.stat().st_size == sum(p.stat().st_size for p in early.sources)


def test_intel_early_cpio_shared_counts(intel_early_cpio: EarlyCpio) -> None:
    if intel_early_cpio.origin != "shared data":
        pytest.skip("../shared not present: the built sources are checked by the test above")
    assert len(intel_early_cpio.intel) == 10
    updates = {(e.bundle, e.index) for e in iucode.list_updates([intel_early_cpio.path], "r")}
    assert len(updates) == 4  # -l keeps 06-9a-04's two, 06-55-04's and 06-97-05's one each


def test_amd_early_cpio(amd_early_cpio: EarlyCpio, tmp_path: Path) -> None:
    early = amd_early_cpio
    assert cpio_names(early.path) == [".", *early.members]
    run_tool(["cpio", "--quiet", "-idm"], input=early.path.read_bytes(), cwd=tmp_path)
    data = (tmp_path / early.member).read_bytes()
    assert data == b"".join(p.read_bytes() for p in early.sources)
    assert data[:4] == b"DMA\x00"
    assert amd_patch_count(data) == early.amd_patches
    # iucode_tool is Intel-only: nothing in here looks like an Intel update to it.
    assert iucode.list_updates([early.path], type="r") == []


def test_amd_early_cpio_shared_counts(amd_early_cpio: EarlyCpio) -> None:
    if amd_early_cpio.origin != "shared data":
        pytest.skip("../shared not present: the built container is checked by the test above")
    assert amd_early_cpio.amd_patches == 5


def test_builders_make_what_iucode_tool_accepts(tmp_path: Path, iucode_tool: str) -> None:
    # The fallback sources, built here whatever ../shared holds.
    files, expect, origin = initrds.intel_sources(None, tmp_path / "intel")
    assert origin == initrds.INTEL_BUILDER
    assert triples(iucode.list_updates(files, all=False)) == sorted(expect)
    (amd,), patches, _ = initrds.amd_sources(None, tmp_path / "amd")
    assert amd_patch_count(amd.read_bytes()) == patches == 2


# --------------------------------------------------------------------------
# Whole initrds
# --------------------------------------------------------------------------


def _check_layout(initrd: DebianInitrd) -> None:
    data = initrd.path.read_bytes()
    kinds = [k for k, _, _ in initrd.parts]
    assert kinds == ["amd", "intel", f"main:{initrd.compression}"]
    assert initrd.parts[-1][2] == len(data)
    amd_start, amd_end = initrd.parts[0][1:]
    intel_start, intel_end = initrd.parts[1][1:]
    assert data[amd_start:amd_end] == initrd.amd.path.read_bytes()
    assert data[intel_start:intel_end] == initrd.intel.path.read_bytes()
    assert data[intel_end:].startswith(MAGIC[initrd.compression])


def _check_peer_views(initrd: DebianInitrd, tmp_path: Path) -> None:
    names = lsinitramfs(initrd.path)
    assert names.count(initrds.AMD_MEMBER) == 1
    assert names.count(initrds.INTEL_MEMBER) == 1
    assert set(initrd.main_members) <= set(names)
    # unmkinitramfs: one subdir per early archive, in order, then main/.
    out = tmp_path / "x"
    run_tool(["unmkinitramfs", initrd.path, out])
    assert sorted(p.name for p in out.iterdir()) == ["early", "early2", "main"]
    amd = (out / "early" / initrds.AMD_MEMBER).read_bytes()
    assert amd == b"".join(p.read_bytes() for p in initrd.amd.sources)
    # iucode_tool writes the selected updates, sorted: not the sources' bytes.
    intel = (out / "early2" / initrds.INTEL_MEMBER).read_bytes()
    assert intel == member_bytes(initrd.intel.path, initrds.INTEL_MEMBER, tmp_path / "i")
    assert (out / "main" / "init").is_file()
    assert not (out / "main" / "kernel").exists()
    # iucode_tool's recover loader reads the early part of the whole file.
    assert triples(iucode.list_updates([initrd.path], type="r")) == sorted(initrd.intel.intel)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_concat_initrd(
    compression: str, concat_initrd: Callable[[str], DebianInitrd], tmp_path: Path
) -> None:
    initrd = concat_initrd(compression)
    assert initrd.how == "concatenated as mkinitramfs"
    _check_layout(initrd)
    _check_peer_views(initrd, tmp_path)


@pytest.mark.parametrize("compression", ["zstd", "gzip", "xz", "lz4"])
def test_debian_initrd(
    compression: str, debian_initrd: Callable[[str], DebianInitrd], tmp_path: Path
) -> None:
    initrd = debian_initrd(compression)
    _check_layout(initrd)
    _check_peer_views(initrd, tmp_path)
    if initrd.how == "mkinitramfs":
        names = set(lsinitramfs(initrd.path))
        assert {"scripts/init-top", "conf/initramfs.conf", "usr/bin/busybox"} <= names


def test_hand_builder_matches_project_writer() -> None:
    # Two independent Intel writers must agree to the byte.
    for kw in (
        {"signature": 0x906A4, "revision": 0x43A, "platform_mask": 0x80, "date": "2025-10-12"},
        {"signature": 0x50654, "revision": -2, "platform_mask": 0xB7, "seed": 4},
        {
            "signature": 0x906A3,
            "revision": 1,
            "platform_mask": 0x80,
            "ext": ((0x906A3, 0x80), (0x906A4, 0x80)),
            "data_size": 2048 - 48 - 20 - 24,
        },
    ):
        assert initrds.make_intel_update(**kw) == initrds.intel_update(**kw)
