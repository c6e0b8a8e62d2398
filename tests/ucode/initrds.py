"""Real initrds built with real tools, for the microcode tests: build_all() and its parts.

Each builder here runs the tools a distribution runs (GNU ``cpio``, ``gzip``,
``bzip2``, ``xz``, ``lzma``, ``zstd``, ``lz4``, ``iucode_tool``) into a
directory the caller owns, and returns a small frozen description of what it
made: where the microcode is, which members exist, and what the microcode
listing must be (stated from the inputs, never read back from the output).
``tests/ucode/conftest.py`` wraps them as session fixtures.

Microcode sources:

* Intel: the real files under ``shared/data/microcode/intel`` when present,
  else updates made here by :func:`intel_update` (xenlab's
  ``formats.intel_ucode.build_update``; the hand-written
  :func:`make_intel_update` checks it byte for byte).
* AMD: the real containers under ``shared/data/microcode/amd`` when present,
  else a container made by :func:`make_amd_container`.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.oracle import iucode
from xenlab.formats.intel_ucode import build_update

#: The kernel's early-microcode paths (arch/x86/kernel/cpu/microcode).
INTEL_MEMBER = "kernel/x86/microcode/GenuineIntel.bin"
AMD_MEMBER = "kernel/x86/microcode/AuthenticAMD.bin"

#: Compression commands as Debian's mkinitramfs spells them (COMPRESS=...), and
#: ``lz4 -l`` (legacy frames: the only lz4 format the kernel's initramfs takes).
COMPRESSORS: dict[str, tuple[str, ...]] = {
    "gzip": ("gzip", "-n", "-9", "-c"),
    "bzip2": ("bzip2", "-9", "-c"),
    "xz": ("xz", "--check=crc32", "-c"),
    "lzma": ("lzma", "-9", "-c"),
    "zstd": ("zstd", "-q", "-9", "-c"),
    "lz4": ("lz4", "-9", "-l", "-c"),
}

#: A kernel version whose modules dir exists only inside the built trees.
KVER = "6.1.0-xenlab"

#: (signature, platform mask, date) of the Intel updates in a tree.
IntelExpect = tuple[tuple[int, int, int], ...]  # (sig, pf_mask, rev), as iucode_tool -l lists them


# --------------------------------------------------------------------------
# Microcode made here
# --------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _bcd_date(date: str) -> int:
    """``YYYY-MM-DD`` as the header's BCD ``mmddyyyy`` dword (0x10122025 for 2025-10-12)."""
    year, month, day = date.split("-")
    return int(f"{month}{day}{year}", 16)


def make_intel_update(
    *,
    signature: int,
    revision: int,
    platform_mask: int,
    date: str = "2020-01-01",
    data_size: int = 976,
    ext: Sequence[tuple[int, int]] = (),
    seed: int = 0,
) -> bytes:
    """A valid Intel microcode update, every field written by hand (SDM vol. 3A, 9.11.1).

    48-byte header: header version 1, *revision*, BCD date ``mmddyyyy``,
    *signature*, checksum, loader version 1, *platform_mask*, data size,
    total size, 12 reserved bytes.  The data is *data_size* random bytes
    (seeded); *ext* adds an extended signature table (20-byte header with its
    own checksum, then 12-byte entries, each with a checksum as if its
    signature and mask were in the header).  The checksum makes the dword sum
    of header+data zero mod 2**32.  ``48 + data_size + table`` must be a
    multiple of 1024, as iucode_tool and the kernel require.
    """
    table = 20 + 12 * len(ext) if ext else 0
    total = 48 + data_size + table
    if data_size % 4 or total % 1024:
        raise ValueError(f"total size {total} is not a multiple of 1024")
    data = random.Random(seed).randbytes(data_size)
    header = [1, revision & _M32, _bcd_date(date), signature, 0, 1, platform_mask,
              data_size, total, 0, 0, 0]  # fmt: skip
    data_sum = sum(struct.unpack(f"<{data_size // 4}I", data))
    header[4] = -(sum(header) + data_sum) & _M32
    out = struct.pack("<12I", *header) + data
    if ext:
        entries = b""
        for sig, pf in ext:
            # An entry's checksum is the one the header would have with this sig/pf.
            entry_sum = -(sum(header) - header[4] - signature - platform_mask + sig + pf + data_sum)
            entries += struct.pack("<3I", sig, pf, entry_sum & _M32)
        ext_header = [len(ext), 0, 0, 0, 0]
        ext_header[1] = -(sum(ext_header) + sum(struct.unpack(f"<{len(entries) // 4}I", entries)))
        ext_header[1] &= _M32
        out += struct.pack("<5I", *ext_header) + entries
    return out


def intel_update(
    *,
    signature: int,
    revision: int,
    platform_mask: int,
    date: str = "2020-01-01",
    data_size: int = 976,
    ext: Sequence[tuple[int, int]] = (),
    seed: int = 0,
) -> bytes:
    """An Intel update from the project's writer; :func:`make_intel_update` is its check."""
    payload = random.Random(seed).randbytes(data_size)
    return build_update(
        signature=signature, revision=revision, platform_mask=platform_mask,
        date=date, payload=payload, ext=tuple(ext),
    )  # fmt: skip


#: Which Intel writer :func:`intel_update` uses (for reports and test ids).
INTEL_BUILDER = "xenlab.formats.intel_ucode.build_update"


def make_amd_container(
    equiv: Sequence[tuple[int, int]],
    patches: Sequence[tuple[int, int, str, int]],
    seed: int = 0,
) -> bytes:
    """An AMD microcode container, written by hand (linux-firmware amd-ucode layout).

    ``magic 0x00414d44``; section type 0 (equivalence table): 16-byte entries
    ``installed_cpu, fixed_errata_mask, fixed_errata_compare, equiv_id (u16),
    reserved (u16)`` from *equiv* ``(installed_cpu, equiv_id)``, ended by an
    all-zero entry; then one section type 1 per *patches* entry ``(patch_id,
    equiv_id, date, body_size)``: a 64-byte patch header (BCD ``mmddyyyy``
    date, patch id, data id/len, init flag, checksum, NB/SB ids,
    processor_rev_id = equiv id, ...) and *body_size* random bytes.
    """
    rng = random.Random(seed)
    table = b"".join(struct.pack("<IIIHH", cpu, 0, 0, eid, 0) for cpu, eid in equiv)
    table += bytes(16)
    out = struct.pack("<III", 0x00414D44, 0, len(table)) + table
    for patch_id, eid, date, body_size in patches:
        header = struct.pack(
            "<IIHBBIIIHBBB3x8I",
            _bcd_date(date), patch_id, 0x8004, 0, 0, 0, 0, 0, eid, 0, 0, 0, *([0] * 8),
        )  # fmt: skip
        body = header + rng.randbytes(body_size)
        out += struct.pack("<II", 1, len(body)) + body
    return out


# --------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------


def run_tool(
    argv: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None, input: bytes = b""
) -> bytes:
    """Run a tool to completion; its stdout, or RuntimeError with its stderr."""
    out = subprocess.run(
        [os.fspath(a) for a in argv], cwd=cwd, input=input, capture_output=True, check=False,
        timeout=300,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {out.returncode}: {out.stderr!r}")
    return out.stdout


def cpio_newc(tree: Path, out: Path) -> Path:
    """``find . | LC_ALL=C sort | cpio -o -H newc`` of *tree* into *out* (outside *tree*).

    mkinitramfs sorts the names and uses ``--reproducible`` (inode numbers
    from 1 in order, no device numbers) when building reproducibly; so do we,
    so that two builds of a tree are byte-identical.
    """
    names = sorted(run_tool(["find", "."], cwd=tree).decode().splitlines())
    data = run_tool(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"],
        cwd=tree,
        input="\n".join(names).encode() + b"\n",
    )
    out.write_bytes(data)
    return out


def compress(src: Path, compression: str, out: Path) -> Path:
    """*src* compressed by the real *compression* tool (a key of :data:`COMPRESSORS`)."""
    with src.open("rb") as fin, out.open("wb") as fout:
        done = subprocess.run(
            COMPRESSORS[compression], stdin=fin, stdout=fout, stderr=subprocess.PIPE,
            check=False, timeout=300,
        )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{compression} exited {done.returncode}: {done.stderr!r}")
    return out


# --------------------------------------------------------------------------
# The trees and archives
# --------------------------------------------------------------------------

BUSYBOX_APPLETS = ("sh", "mount", "umount", "mkdir", "cat", "ls", "echo", "sleep", "switch_root")
FAKE_MODULES = ("kernel/drivers/block/xen-blkfront.ko", "kernel/drivers/net/xen-netfront.ko")

INIT_SCRIPT = """#!/bin/sh
# xenlab test initramfs: mount the API file systems, then hand over to a shell.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "xenlab initramfs up"
exec sh
"""


@dataclass(frozen=True, slots=True)
class Tree:
    """A directory to archive, and the member names ``cpio -t`` will show for it."""

    path: Path
    members: tuple[str, ...]  # sorted, without "./" and without "."


def build_busybox_tree(dest: Path, busybox: Path = Path("/bin/busybox"), seed: int = 1) -> Tree:
    """A small initramfs tree: busybox, applet links, /init, API dirs, fake modules."""
    dest.mkdir(parents=True)
    for d in ("bin", "dev", "proc", "sys", "etc", f"lib/modules/{KVER}"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, dest / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (dest / "bin" / applet).symlink_to("busybox")
    init = dest / "init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    (dest / "etc" / "hostname").write_text("xenlab\n")
    rng = random.Random(seed)
    for i, name in enumerate(FAKE_MODULES):
        module = dest / "lib" / "modules" / KVER / name
        module.parent.mkdir(parents=True, exist_ok=True)
        # Random bytes do not compress: the archive keeps a few hundred KB.
        module.write_bytes(b"\x7fELF" + rng.randbytes(200_000 + 100_000 * i))
    members = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    return Tree(dest, tuple(members))


@dataclass(frozen=True, slots=True)
class EarlyCpio:
    """An uncompressed early-microcode cpio and what is in it.

    ``member`` is the microcode file's name in the archive; ``sources`` the
    input files; ``intel`` the (sig, pf_mask, rev) triples ``iucode_tool -l``
    must list for it (Intel only); ``amd_patches`` the patch count (AMD only).
    """

    path: Path
    member: str
    members: tuple[str, ...]
    sources: tuple[Path, ...]
    origin: str  # "shared data" or the builder's name
    intel: IntelExpect = ()
    amd_patches: int = 0


#: Real Intel files and what iucode_tool -l lists for them (shared/data/SOURCES.md).
SHARED_INTEL: dict[str, IntelExpect] = {
    "06-9a-04": ((0x906A3, 0x80, 0x43A), (0x906A4, 0x80, 0x43A), (0x906A4, 0x40, 0xB)),
    "06-55-04": ((0x50654, 0xB7, 0x2007006),),
    "06-97-05": tuple(
        (sig, 0x07, 0x3D) for sig in (0x90672, 0x90675, 0xB06F2, 0xB06F5, 0xB06F6, 0xB06F7)
    ),
}
#: Real AMD containers and their patch counts (shared/data/SOURCES.md).
SHARED_AMD: dict[str, int] = {"microcode_amd_fam15h.bin": 3, "microcode_amd_fam17h.bin": 2}


def intel_sources(shared: Path | None, workdir: Path) -> tuple[tuple[Path, ...], IntelExpect, str]:
    """Intel update files to pack, their expected -l listing, and where they came from."""
    intel_dir = shared / "microcode" / "intel" if shared is not None else None
    if intel_dir is not None and all((intel_dir / n).is_file() for n in SHARED_INTEL):
        files = tuple(intel_dir / n for n in SHARED_INTEL)
        expect = tuple(sorted(t for n in SHARED_INTEL for t in SHARED_INTEL[n]))
        return files, expect, "shared data"
    workdir.mkdir(parents=True, exist_ok=True)
    ext = ((0x906A3, 0x80), (0x906A4, 0x80))
    a = intel_update(
        signature=0x906A4,
        revision=0x43A,
        platform_mask=0x80,
        date="2025-10-12",
        ext=ext,
        data_size=2048 - 48 - 20 - 12 * len(ext),
        seed=1,
    )
    b = intel_update(signature=0x906A4, revision=0xB, platform_mask=0x40, date="2025-06-13",
                     seed=2)  # fmt: skip
    c = intel_update(signature=0x50654, revision=0x2007006, platform_mask=0xB7,
                     date="2023-03-06", data_size=3072 - 48, seed=3)  # fmt: skip
    (workdir / "06-9a-04").write_bytes(a + b)
    (workdir / "06-55-04").write_bytes(c)
    expect = ((0x50654, 0xB7, 0x2007006), (0x906A3, 0x80, 0x43A),
              (0x906A4, 0x40, 0xB), (0x906A4, 0x80, 0x43A))  # fmt: skip
    return (workdir / "06-9a-04", workdir / "06-55-04"), expect, INTEL_BUILDER


def amd_sources(shared: Path | None, workdir: Path) -> tuple[tuple[Path, ...], int, str]:
    """AMD container files to pack, their total patch count, and where they came from."""
    amd_dir = shared / "microcode" / "amd" if shared is not None else None
    if amd_dir is not None and all((amd_dir / n).is_file() for n in SHARED_AMD):
        return tuple(amd_dir / n for n in SHARED_AMD), sum(SHARED_AMD.values()), "shared data"
    workdir.mkdir(parents=True, exist_ok=True)
    fam17 = make_amd_container(
        [(0x800F12, 0x8012), (0x800F82, 0x8082)],
        [
            (0x8001227, 0x8012, "2018-10-01", 3200 - 72),
            (0x800820B, 0x8082, "2018-10-01", 3200 - 72),
        ],
    )
    path = workdir / "microcode_amd_fam17h.bin"
    path.write_bytes(fam17)
    return (path,), 2, "tests.ucode.initrds.make_amd_container"


def build_intel_early(shared: Path | None, workdir: Path) -> EarlyCpio:
    """``iucode_tool --write-earlyfw`` of the Intel sources (as Debian's intel-microcode hook)."""
    sources, expect, origin = intel_sources(shared, workdir / "intel-src")
    out = iucode.write_earlyfw(sources, workdir / "intel-early.cpio")
    members = tuple(
        sorted(
            n for n in run_tool(["cpio", "--quiet", "-it"], input=out.read_bytes()).decode().split()
        )
    )
    return EarlyCpio(out, INTEL_MEMBER, members, sources, origin, intel=expect)


def build_amd_early(shared: Path | None, workdir: Path) -> EarlyCpio:
    """Xen's docs/misc/amd-ucode-container.txt recipe with real cpio.

    ``mkdir -p kernel/x86/microcode``, the containers concatenated into
    ``kernel/x86/microcode/AuthenticAMD.bin``, ``find . | cpio -o -H newc``
    (the output written outside the staging dir, which the recipe's step 5
    does not do).
    """
    sources, patches, origin = amd_sources(shared, workdir / "amd-src")
    stage = workdir / "amd-stage"
    (stage / "kernel" / "x86" / "microcode").mkdir(parents=True)
    (stage / AMD_MEMBER).write_bytes(b"".join(p.read_bytes() for p in sources))
    data = run_tool(["cpio", "--quiet", "-o", "-H", "newc"], cwd=stage,
                input=run_tool(["find", "."], cwd=stage))  # fmt: skip
    out = workdir / "amd-early.cpio"
    out.write_bytes(data)
    members = ("kernel", "kernel/x86", "kernel/x86/microcode", AMD_MEMBER)
    return EarlyCpio(out, AMD_MEMBER, members, sources, origin, amd_patches=patches)


@dataclass(frozen=True, slots=True)
class DebianInitrd:
    """A Debian-style initrd: early cpios (uncompressed, back to back), then the compressed main.

    ``parts`` are ``(kind, offset, end)`` for each piece in the file:
    ``("amd", ...)``, ``("intel", ...)``, ``("main:<compression>", ...)``.
    ``how`` says whether Debian's own mkinitramfs built it or it was
    concatenated the way mkinitramfs does.
    """

    path: Path
    compression: str
    parts: tuple[tuple[str, int, int], ...]
    amd: EarlyCpio
    intel: EarlyCpio
    main_members: tuple[str, ...]
    how: str


def build_debian_initrd(
    amd: EarlyCpio, intel: EarlyCpio, main_compressed: Path, compression: str,
    main_members: Sequence[str], out: Path,
) -> DebianInitrd:  # fmt: skip
    """Concatenate exactly as mkinitramfs does.

    Hooks call ``prepend_earlyinitramfs FILE``, which appends FILE to the
    early archive in hook order (``amd64_microcode`` runs before
    ``intel_microcode``); at the end mkinitramfs writes the early archive,
    then ``$compress -c`` of the main cpio, into the output.
    """
    pieces = [("amd", amd.path), ("intel", intel.path), (f"main:{compression}", main_compressed)]
    parts: list[tuple[str, int, int]] = []
    pos = 0
    with out.open("wb") as f:
        for kind, path in pieces:
            data = path.read_bytes()
            f.write(data)
            parts.append((kind, pos, pos + len(data)))
            pos += len(data)
    return DebianInitrd(out, compression, tuple(parts), amd, intel, tuple(main_members),
                        "concatenated as mkinitramfs")  # fmt: skip


# --------------------------------------------------------------------------
# Debian's own mkinitramfs, in a private mount namespace
# --------------------------------------------------------------------------

#: mkinitramfs reads /lib/modules/$version and /boot/config-$version of the
#: host; inside ``unshare -m`` an overlay on /usr/lib and a bind mount on /boot
#: give it both without touching the host's file systems.
_SANDBOX = r"""
set -e
upper=$1 work=$2 boot=$3 conf=$4 tmp=$5 comp=$6 out=$7 kver=$8
mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=/usr/lib,upperdir=$upper,workdir=$work" /usr/lib
mount --bind "$boot" /boot
mkdir -p "/lib/modules/$kver"
for f in modules.order modules.builtin modules.builtin.modinfo; do : > "/lib/modules/$kver/$f"; done
TMPDIR=$tmp mkinitramfs -d "$conf" -c "$comp" -o "$out" "$kver"
"""

_HOOK = """#!/bin/sh
# Does what Debian's {name} hook does at its end: prepend an early cpio.
PREREQ=""
prereqs() {{ echo "$PREREQ"; }}
case "$1" in prereqs) prereqs; exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
prepend_earlyinitramfs "{cpio}"
"""

_CONF = """MODULES=list
BUSYBOX=y
KEYMAP=n
COMPRESS={comp}
DEVICE=
NFSROOT=auto
RUNSIZE=10%
FSTYPE=auto
"""


def mkinitramfs_unavailable() -> str | None:
    """Why Debian's mkinitramfs cannot run sandboxed here, or None when it can."""
    for tool in ("mkinitramfs", "unshare", "lsinitramfs"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (initramfs-tools, util-linux)"
    if not Path("/boot").is_dir():
        return "/boot does not exist to bind-mount a kernel config on"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount --make-rprivate / && mount -t tmpfs none /boot"],
        capture_output=True, check=False, timeout=60,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"no private mount namespace here: {probe.stderr.decode(errors='replace').strip()}"
    return None


def build_mkinitramfs(
    amd: EarlyCpio, intel: EarlyCpio, compression: str, workdir: Path
) -> DebianInitrd:
    """Debian's own mkinitramfs with hooks that prepend *amd* then *intel*, as Debian orders them.

    The main archive is Debian's full initramfs-tools tree for a kernel
    version whose modules dir exists only in the sandbox (busybox, klibc,
    udev, scripts/, conf/, init).  The early part is checked to be the two
    cpios byte for byte.
    """
    for d in ("upper", "work", "boot", "conf/hooks", "conf/scripts", "conf/conf.d", "tmp"):
        (workdir / d).mkdir(parents=True, exist_ok=True)
    (workdir / "boot" / f"config-{KVER}").write_text(
        "".join(f"CONFIG_RD_{s}=y\n" for s in ("GZIP", "BZIP2", "LZMA", "XZ", "LZO", "LZ4", "ZSTD"))
    )
    (workdir / "conf" / "initramfs.conf").write_text(_CONF.format(comp=compression))
    for name, early in (("amd64_microcode", amd), ("intel_microcode", intel)):
        hook = workdir / "conf" / "hooks" / name
        hook.write_text(_HOOK.format(name=name, cpio=early.path))
        hook.chmod(0o755)
    out = workdir / f"initrd.img-{KVER}"
    dirs = [workdir / d for d in ("upper", "work", "boot", "conf", "tmp")]
    run_tool(["unshare", "-m", "sh", "-c", _SANDBOX, "sh", *dirs, compression, out, KVER])
    data = out.read_bytes()
    a, i = amd.path.read_bytes(), intel.path.read_bytes()
    if data[: len(a)] != a or data[len(a) : len(a) + len(i)] != i:
        raise RuntimeError(f"{out}: the early part is not the amd cpio then the intel cpio")
    parts = (
        ("amd", 0, len(a)),
        ("intel", len(a), len(a) + len(i)),
        (f"main:{compression}", len(a) + len(i), len(data)),
    )
    main = ("init", "conf/initramfs.conf", "scripts/init-top", "usr/bin/busybox")
    return DebianInitrd(out, compression, parts, amd, intel, main, "mkinitramfs")
