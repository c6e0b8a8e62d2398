"""Session fixtures: real initrds built once with real tools (see tests/ucode/initrds.py).

Every fixture builds into ``tmp_path_factory`` once per session; the
factory fixtures (``main_cpio``, ``debian_initrd``, ``concat_initrd``) cache
one file per compression.  The microcode comes from ``../shared/data`` when
it is there and from builders in ``initrds.py`` otherwise, so a fresh clone
still gets every fixture.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.oracle import iucode
from tests.ucode import initrds
from tests.ucode.initrds import DebianInitrd, EarlyCpio, Tree

#: The compressions main archives are built with (keys of initrds.COMPRESSORS).
COMPRESSIONS = tuple(initrds.COMPRESSORS)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shared_root() -> Path | None:
    """``../shared/data`` when present, else None (builders stand in for it)."""
    path = REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def iucode_tool() -> str:
    """iucode_tool's version; the test is skipped, with the reason, if it is not installed."""
    try:
        return iucode.version()
    except iucode.IucodeUnavailable as err:
        pytest.skip(err.reason)


@pytest.fixture(scope="session")
def busybox_tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    """A small initramfs tree.

    Members: ``bin/busybox`` (a copy of the static /bin/busybox), ``bin/sh``,
    ``bin/mount``, ``bin/umount``, ``bin/mkdir``, ``bin/cat``, ``bin/ls``,
    ``bin/echo``, ``bin/sleep``, ``bin/switch_root`` (symlinks to
    ``busybox``), ``init`` (a shell script, mode 0755), ``etc/hostname``,
    empty ``dev/``, ``proc/``, ``sys/``, and two module-like files of random
    bytes under ``lib/modules/6.1.0-xenlab/kernel/drivers/`` (``block/
    xen-blkfront.ko`` 200 KB, ``net/xen-netfront.ko`` 300 KB) so that the
    compressed archives stay big.  No microcode.
    """
    if not Path("/bin/busybox").is_file():
        pytest.skip("/bin/busybox (Debian busybox-static) is not installed")
    return initrds.build_busybox_tree(tmp_path_factory.mktemp("busybox") / "root")


@pytest.fixture(scope="session")
def main_cpio(
    busybox_tree: Tree, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """``main_cpio(compression) -> Path``: busybox_tree as a compressed newc archive.

    ``find . | LC_ALL=C sort | cpio -o -H newc --reproducible`` (GNU cpio),
    then the real compressor: ``"none"`` (the bare cpio), ``"gzip"``,
    ``"bzip2"``, ``"xz"`` (``--check=crc32``, as the kernel needs), ``"lzma"``,
    ``"zstd"``, ``"lz4"`` (``lz4 -l``: legacy frames).  One archive, no
    microcode; members as ``busybox_tree.members`` plus ``.``.
    """
    workdir = tmp_path_factory.mktemp("main")
    raw = initrds.cpio_newc(busybox_tree.path, workdir / "main.cpio")
    cache: dict[str, Path] = {"none": raw}

    def build(compression: str) -> Path:
        if compression not in cache:
            out = workdir / f"main.cpio.{compression}"
            cache[compression] = initrds.compress(raw, compression, out)
        return cache[compression]

    return build


@pytest.fixture(scope="session")
def intel_early_cpio(
    iucode_tool: str, shared_root: Path | None, tmp_path_factory: pytest.TempPathFactory
) -> EarlyCpio:
    """The Intel early cpio made by the peer tool ``iucode_tool --write-earlyfw``.

    Members: ``kernel``, ``kernel/x86``, ``kernel/x86/microcode``,
    ``kernel/x86/microcode/.enuineIntel.align.0123456789abc`` (iucode_tool's
    alignment dir, so the data starts 16-byte aligned) and
    ``kernel/x86/microcode/GenuineIntel.bin``: every update of the sources,
    uncompressed, the archive padded to 512 bytes.  Sources: shared
    ``06-9a-04``, ``06-55-04``, ``06-97-05`` (10 signatures, 5 updates), or
    without shared data two built files (4 signatures, 3 updates);
    ``.intel`` lists the (sig, pf_mask, rev) iucode_tool must report.
    """
    return initrds.build_intel_early(shared_root, tmp_path_factory.mktemp("intel"))


@pytest.fixture(scope="session")
def amd_early_cpio(shared_root: Path | None, tmp_path_factory: pytest.TempPathFactory) -> EarlyCpio:
    """The AMD early cpio made by Xen's docs/misc/amd-ucode-container.txt recipe (GNU cpio).

    Members: ``.``, ``kernel``, ``kernel/x86``, ``kernel/x86/microcode`` and
    ``kernel/x86/microcode/AuthenticAMD.bin``, the containers concatenated
    (shared ``microcode_amd_fam15h.bin`` + ``microcode_amd_fam17h.bin``: 2
    containers, 5 patches; or one built fam17h container with 2 patches).
    Uncompressed, cpio's own 512-byte block padding.
    """
    return initrds.build_amd_early(shared_root, tmp_path_factory.mktemp("amd"))


@pytest.fixture(scope="session")
def concat_initrd(
    amd_early_cpio: EarlyCpio,
    intel_early_cpio: EarlyCpio,
    main_cpio: Callable[[str], Path],
    busybox_tree: Tree,
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], DebianInitrd]:
    """``concat_initrd(compression) -> DebianInitrd``, concatenated exactly as mkinitramfs does.

    Layout: ``amd_early_cpio`` bytes, then ``intel_early_cpio`` bytes (both
    uncompressed: microcode in ``kernel/x86/microcode/AuthenticAMD.bin`` and
    ``GenuineIntel.bin``), then ``main_cpio(compression)`` (busybox_tree, no
    microcode).  ``.parts`` gives each piece's offsets.
    """
    workdir = tmp_path_factory.mktemp("concat")
    cache: dict[str, DebianInitrd] = {}

    def build(compression: str) -> DebianInitrd:
        if compression not in cache:
            cache[compression] = initrds.build_debian_initrd(
                amd_early_cpio,
                intel_early_cpio,
                main_cpio(compression),
                compression,
                busybox_tree.members,
                workdir / f"initrd.img-{compression}",
            )
        return cache[compression]

    return build


@pytest.fixture(scope="session")
def debian_initrd(
    amd_early_cpio: EarlyCpio,
    intel_early_cpio: EarlyCpio,
    concat_initrd: Callable[[str], DebianInitrd],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], DebianInitrd]:
    """``debian_initrd(compression="zstd") -> DebianInitrd``, built by Debian's own mkinitramfs.

    mkinitramfs runs in a private mount namespace (``unshare -m``; an overlay
    on /usr/lib holds ``/lib/modules/6.1.0-xenlab``, a bind mount on /boot its
    kernel config) with hooks ``amd64_microcode`` and ``intel_microcode`` that
    ``prepend_earlyinitramfs`` the two early cpios, as Debian's microcode
    packages do.  Layout: AMD early cpio, Intel early cpio, then Debian's
    main archive (init, scripts/, conf/, usr/bin/busybox, klibc, udev)
    compressed by mkinitramfs' own command for *compression*.  Where no
    mount namespace can be made, this is ``concat_initrd(compression)``
    instead; ``.how`` says which (``"mkinitramfs"`` or ``"concatenated as
    mkinitramfs"``).
    """
    reason = initrds.mkinitramfs_unavailable()
    cache: dict[str, DebianInitrd] = {}

    def build(compression: str = "zstd") -> DebianInitrd:
        if reason is not None:
            return concat_initrd(compression)
        if compression not in cache:
            cache[compression] = initrds.build_mkinitramfs(
                amd_early_cpio,
                intel_early_cpio,
                compression,
                tmp_path_factory.mktemp(f"mkinitramfs-{compression}"),
            )
        return cache[compression]

    return build
