"""ucode.scan on real initrds (GNU cpio, the real compressors, Debian's mkinitramfs) against
the peers' views: iucode_tool's recover loader and Debian's unmkinitramfs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from tests.oracle import iucode
from tests.ucode import builders as b
from tests.ucode.initrds import DebianInitrd, Tree
from xenlab.formats.cpio import CpioMember, write_newc
from xenlab.ucode.cpu import Vendor
from xenlab.ucode.early import build_early
from xenlab.ucode.scan import scan_buffer, scan_file

COMPRESSIONS = ["gzip", "bzip2", "xz", "lzma", "zstd", "lz4"]


def _intel_view(path: Path) -> list[tuple[int, int, int]]:
    ups = scan_file(path).updates
    return sorted((s, m, u.unsigned_revision) for u in ups if u.vendor is Vendor.INTEL
                  for s, m in u.platforms)


def _check(initrd: DebianInitrd) -> None:
    r = scan_file(initrd.path)
    kinds = [p.kind for p in r.parts]
    assert kinds == ["cpio", "cpio", "compressed"], kinds
    main = r.parts[2]
    assert main.compression == {"lz4": "lz4_legacy"}.get(initrd.compression, initrd.compression)
    assert main.end == initrd.path.stat().st_size
    # Every update is in an early archive, none in the main one.
    assert all(u.source.early for u in r.updates)
    amd = [u for u in r.updates if u.vendor is Vendor.AMD]
    assert len(amd) == initrd.amd.amd_patches
    assert {u.source.member for u in amd} == {"kernel/x86/microcode/AuthenticAMD.bin"}
    # The Intel view equals iucode_tool's recover loader on the same file.
    peer = sorted((e.sig, e.pf_mask, e.rev) for e in iucode.list_updates([initrd.path], "r",
                                                                         all=True))
    assert _intel_view(initrd.path) == peer
    assert sorted(set(peer)) == sorted(set(initrd.intel.intel))
    # The main archive's member count equals Debian's own listing of it.
    ls = subprocess.run(["lsinitramfs", str(initrd.path)], capture_output=True, text=True,
                        check=True).stdout.split()
    early_members = len(initrd.amd.members) + len(initrd.intel.members)
    assert main.members == len(ls) - early_members


@pytest.mark.integration
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_concatenated_initrds(concat_initrd: Callable[[str], DebianInitrd],
                              compression: str) -> None:
    _check(concat_initrd(compression))


@pytest.mark.integration
def test_mkinitramfs_initrd(debian_initrd: Callable[..., DebianInitrd]) -> None:
    _check(debian_initrd("zstd"))


@pytest.mark.integration
def test_build_early_on_a_debian_initrd(debian_initrd: Callable[..., DebianInitrd],
                                        tmp_path: Path) -> None:
    initrd = debian_initrd("zstd")
    data = initrd.path.read_bytes()
    new = scan_buffer(b.INTEL_NEW + b.AMD_CONTAINER, "new").updates
    img = build_early(new, data)
    # Both of Debian's early archives (AMD, then Intel) were replaced.
    assert img.replaced_early == initrd.parts[2][1]
    out = tmp_path / "initrd.new"
    out.write_bytes(img.data)
    r = scan_file(out)
    assert sorted(u.revision for u in r.updates) == sorted(u.revision for u in new)
    assert all(u.source.early for u in r.updates)
    # Debian's unmkinitramfs unpacks the result: our early part, then the old main part.
    dest = tmp_path / "unpacked"
    subprocess.run(["unmkinitramfs", str(out), str(dest)], check=True)
    assert (dest / "early/kernel/x86/microcode/GenuineIntel.bin").read_bytes() == b.INTEL_NEW
    assert (dest / "main/init").is_file()


@pytest.mark.integration
def test_selection_on_an_initrd_equals_iucode_tool(debian_initrd: Callable[..., DebianInitrd]
                                                   ) -> None:
    from xenlab.ucode.cpu import CpuId
    from xenlab.ucode.select import select

    initrd = debian_initrd("zstd")
    ours = scan_file(initrd.path).updates
    pairs = sorted({(s, m) for s, m, _ in initrd.intel.intel})
    assert pairs
    for sig, mask in pairs:
        pf = mask & -mask  # one platform bit of the mask
        peer = [e.rev for e in iucode.select([initrd.path], sig, pf, type="r") if e.sig == sig]
        got = select(ours, CpuId(Vendor.INTEL, sig, pf, None, "test")).chosen
        assert got is not None and got.unsigned_revision == max(peer), (hex(sig), hex(pf))


def _members_of(tree: Path) -> list[CpioMember]:
    """The tree as newc members, parents first (what `find . | cpio -o -H newc` stores)."""
    out = []
    for p in sorted(tree.rglob("*")):
        name = str(p.relative_to(tree))
        if p.is_symlink():
            out.append(CpioMember.symlink(name, os.readlink(p)))
        elif p.is_dir():
            out.append(CpioMember.directory(name))
        else:
            perm = p.stat().st_mode & 0o7777
            out.append(CpioMember(name, p.read_bytes(), mode=0o100000 | perm))
    return out


@pytest.mark.integration
def test_initrd_built_by_the_project(busybox_tree: Tree, tmp_path: Path) -> None:
    """busybox initramfs packed by xenlab's writer, zstd, our early cpio in front; Debian's
    tools unpack it to the same files, and iucode_tool's recover loader sees our updates."""
    main = zstandard.ZstdCompressor().compress(write_newc(_members_of(busybox_tree.path)))
    ups = scan_buffer(b.INTEL_OLD + b.INTEL_NEW + b.AMD_CONTAINER, "u").updates
    out = tmp_path / "initrd.img"
    out.write_bytes(build_early(ups, main).data)
    ls = subprocess.run(["lsinitramfs", str(out)], capture_output=True, text=True,
                        check=True).stdout.split()
    assert set(busybox_tree.members) <= set(ls)
    assert "kernel/x86/microcode/GenuineIntel.bin" in ls
    dest = tmp_path / "x"
    subprocess.run(["unmkinitramfs", str(out), str(dest)], check=True)
    for name in busybox_tree.members:
        src = busybox_tree.path / name
        if src.is_file() and not src.is_symlink():
            assert (dest / "main" / name).read_bytes() == src.read_bytes(), name
    assert (dest / "main/bin/sh").is_symlink()
    peer = sorted((e.sig, e.rev) for e in iucode.list_updates([out], "r", all=True))
    assert peer == sorted((s, u.unsigned_revision) for u in ups if u.vendor is Vendor.INTEL
                          for s, _ in u.platforms)
    r = scan_file(out)
    assert [p.kind for p in r.parts] == ["cpio", "compressed"]
    assert r.parts[1].members == len(busybox_tree.members) + 1  # + the trailer
