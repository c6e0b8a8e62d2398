"""A test oracle over the real Xen 4.17 hypervisor booted under QEMU: :func:`boot`.

xenlab builds the early-microcode initrd that Xen's ``ucode=scan`` reads; the
tests boot Debian's own Xen with such an initrd and read what Xen printed on
its serial console.  Nothing is installed: the hypervisor package is fetched
with ``apt-get download`` and unpacked with ``dpkg -x`` into a cache directory
(``$XENLAB_XEN_CACHE``, default ``~/.cache/xenlab/xen-4.17``), and
``xen-4.17-amd64.gz`` is unpacked to the multiboot ELF that QEMU's
``-kernel`` loads.

Facts the boot relies on (read in Xen's ``xen/arch/x86/setup.c`` and
``cpu/microcode/*.c`` at RELEASE-4.17.x, and seen on QEMU 7.2 TCG):

* Module 0 is the dom0 kernel and ``ucode=scan`` skips it; every later module
  is searched with ``find_cpio_data`` for the vendor's early name.  A 4 KiB
  zero-filled module stands in for the kernel: Xen only reaches dom0
  construction (and panics there) after microcode loading, and zeros keep
  ``bzimage_headroom`` small (random bytes make it read a huge size from the
  last four bytes and panic before microcode is looked at).
* Under TCG the CPUID signature is whatever ``-cpu`` says, MSR 0x17 reads 0
  (Intel platform id 0, so the CPU's platform mask is 0x1), the revision MSR
  reads the ``ucode-rev`` property, and writes to the microcode loader MSRs
  change nothing.  So a chosen update is *not* applied, and Xen says which one
  it tried: ``microcode: CPU0 update rev 0x1 to 0x43a failed, result 0x1``.
* Xen 4.17.7 checks Zen1-5 (families 0x17-0x1a) AMD patches against a list of
  SHA-256 digests of known patches; a patch not on the list is refused with
  ``No digest found for patch_id ...`` (only printed for a patch that matched
  the CPU).  ``ucode=scan,digest-check=0`` turns the check off.
* QEMU is stopped as soon as ``Speculative mitigation facilities`` is printed
  (init_speculation_mitigations runs after early microcode loading and always
  prints it), so a boot takes a second or two of TCG rather than running to
  the dom0 panic and Xen's five-second reboot delay.
"""

from __future__ import annotations

import gzip
import os
import re
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.oracle.debs import DebsUnavailable, unpack_debs

#: The Debian package holding the hypervisor (bookworm ships 4.17.x).
PACKAGE = "xen-hypervisor-4.17-amd64"
QEMU = "qemu-system-x86_64"
_GZ = Path("boot/xen-4.17-amd64.gz")
_ELF = "xen-4.17-amd64.elf"

#: Printed after early microcode loading, on every boot (spec_ctrl.c print_details).
AFTER_MICROCODE = "(XEN) Speculative mitigation facilities:"
#: Printed by early_microcode_init once the vendor's loader is set up.
BSP_REVISION = re.compile(r"^\(XEN\) BSP microcode revision: (0x[0-9a-f]+)$", re.M)
#: Intel and AMD apply_microcode: the chosen patch was written and the revision re-read.
APPLY_FAILED = re.compile(
    r"^\(XEN\) microcode: CPU(\d+) update rev (0x[0-9a-f]+) to (0x[0-9a-f]+) failed, "
    r"result (0x[0-9a-f]+)$",
    re.M,
)
APPLY_OK = re.compile(
    r"^\(XEN\) microcode: CPU(\d+) updated from revision (0x[0-9a-f]+) to (0x[0-9a-f]+)",
    re.M,
)
#: AMD check_digest on a patch that matched the CPU but is not a known patch.
NO_DIGEST = re.compile(r"^\(XEN\) No digest found for patch_id ([0-9a-f]{8})$", re.M)

# Every line Xen 4.17's microcode code prints about a blob or a patch (the
# "BSP microcode revision" line is printed with or without one).
_MICROCODE_TALK = re.compile(
    r"^\(XEN\) (microcode: |Parsing microcode|No digest found|Patch [0-9a-f]+ SHA256)", re.M
)

# Stands in for the dom0 kernel (module 0, never scanned); see the docstring.
_DUMMY_KERNEL = bytes(4096)


class XenUnavailable(Exception):
    """Xen or QEMU cannot be had on this machine; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class QemuCpu:
    """The CPU QEMU shows the guest: vendor and display family/model/stepping.

    ``ucode_rev`` is QEMU's ``ucode-rev`` property, the whole value of the
    revision MSR (0x8b): Intel keeps the revision in the high half, AMD in
    the low half.  None keeps QEMU's default (Intel 0x1, AMD 0x01000065).
    """

    vendor: str  # "GenuineIntel" or "AuthenticAMD"
    family: int
    model: int
    stepping: int
    ucode_rev: int | None = None

    @property
    def signature(self) -> int:
        """CPUID.1.EAX as the loaders compare it (0x906a4 for 6/154/4)."""
        fam, ext_fam = (self.family, 0) if self.family < 0xF else (0xF, self.family - 0xF)
        model, ext_model = self.model & 0xF, self.model >> 4
        return (ext_fam << 20) | (ext_model << 16) | (fam << 8) | (model << 4) | self.stepping

    def qemu_arg(self) -> str:
        """The ``-cpu`` argument (SMAP off: Xen 4.17 does not boot under TCG with it)."""
        arg = (
            f"max,-smap,vendor={self.vendor},family={self.family},"
            f"model={self.model},stepping={self.stepping}"
        )
        if self.ucode_rev is not None:
            arg += f",ucode-rev={self.ucode_rev:#x}"
        return arg


@dataclass(frozen=True, slots=True)
class BootLog:
    """What Xen printed on COM1 (CR stripped), and how the run ended."""

    text: str
    seconds: float
    ended: str  # "marker" (the until text appeared), "exit" or "timeout"
    command: tuple[str, ...]

    @property
    def bsp_revision(self) -> int | None:
        """The revision Xen read before loading anything (``BSP microcode revision``)."""
        m = BSP_REVISION.search(self.text)
        return int(m.group(1), 16) if m else None

    @property
    def attempts(self) -> tuple[tuple[int, int], ...]:
        """(old, new) revisions of every update Xen wrote to the loader MSR."""
        return tuple(
            (int(m.group(2), 16), int(m.group(3), 16))
            for pattern in (APPLY_FAILED, APPLY_OK)
            for m in pattern.finditer(self.text)
        )

    @property
    def refused_digests(self) -> tuple[int, ...]:
        """AMD patch ids that matched the CPU but were refused for lack of a known digest."""
        return tuple(int(m.group(1), 16) for m in NO_DIGEST.finditer(self.text))

    def microcode_lines(self) -> tuple[str, ...]:
        """Every line Xen printed about a microcode blob or patch."""
        return tuple(line for line in self.text.splitlines() if _MICROCODE_TALK.match(line))


def cache_dir() -> Path:
    """Where the extracted package lives."""
    env = os.environ.get("XENLAB_XEN_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "xenlab" / "xen-4.17"


def ensure_xen(cache: Path | None = None) -> Path:
    """Fetch and unpack the hypervisor once; return the path of its ELF image.

    The package comes through tests/oracle/debs.py (cached, locked, stamped).
    Raises :class:`XenUnavailable` only when apt cannot provide it (not
    Debian, no network or mirror).
    """
    cache = cache or cache_dir()
    elf = cache / _ELF

    def to_elf(root: Path) -> None:
        gz = root / _GZ
        if not gz.exists():
            raise XenUnavailable(f"{PACKAGE} has no {_GZ}")
        # QEMU's -kernel loads a multiboot v1 ELF, not the gzip Debian ships.
        tmp = cache / (_ELF + ".tmp")
        tmp.write_bytes(gzip.decompress(gz.read_bytes()))
        tmp.replace(elf)

    try:
        unpack_debs([PACKAGE], cache, finish=to_elf)
    except DebsUnavailable as err:
        raise XenUnavailable(str(err)) from err
    if not elf.exists():
        raise XenUnavailable(f"{elf} is missing from a completed cache: remove {cache}")
    return elf


def qemu_binary() -> str:
    """The QEMU system emulator; :class:`XenUnavailable` if it is not installed."""
    path = shutil.which(QEMU)
    if path is None:
        raise XenUnavailable(f"{QEMU} not found (Debian package qemu-system-x86)")
    return path


def xen_version(xen: Path | None = None) -> str:
    """The Debian version of the unpacked hypervisor package (e.g. ``4.17.7+13-...``)."""
    cache = (xen or ensure_xen()).parent
    debs = sorted((cache / "debs").glob(f"{PACKAGE}_*.deb"))
    return debs[-1].name.split("_")[1] if debs else "unknown"


def qemu_command(
    xen: Path,
    cpu: QemuCpu,
    modules: Sequence[Path],
    cmdline: str,
    *,
    memory_mib: int = 512,
) -> list[str]:
    """The QEMU argv booting ``xen`` with multiboot ``modules`` (module 0 is dom0's kernel)."""
    for m in modules:
        if "," in str(m):
            # -initrd separates multiboot modules with commas.
            raise ValueError(f"module path holds a comma: {m}")
    return [
        qemu_binary(),
        "-machine", "accel=tcg",
        "-cpu", cpu.qemu_arg(),
        "-m", str(memory_mib),
        "-nodefaults",
        "-display", "none",
        "-serial", "stdio",
        "-monitor", "none",
        "-no-reboot",
        "-kernel", str(xen),
        "-append", cmdline,
        "-initrd", ",".join(str(m) for m in modules),
    ]  # fmt: skip


def run_qemu(argv: Sequence[str], *, until: str | None, timeout: float) -> BootLog:
    """Run ``argv``, collecting its output, until ``until`` is printed, it exits, or timeout."""
    start = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    chunks: list[bytes] = []
    seen = b""
    marker = until.encode() if until else None
    ended = "timeout"
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                left = start + timeout - time.monotonic()
                if left <= 0:
                    break
                if not sel.select(left):
                    continue
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    ended = "exit"
                    break
                chunks.append(data)
                if marker is not None:
                    # Only the tail can newly complete the marker.
                    seen = seen[-len(marker) :] + data
                    if marker in seen:
                        ended = "marker"
                        break
    finally:
        if proc.poll() is None:
            proc.kill()  # QEMU itself, by pid; it starts no children
        proc.wait()
        proc.stdout.close()
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r", "")
    return BootLog(text, time.monotonic() - start, ended, tuple(argv))


def boot(
    initrds: Sequence[bytes],
    cpu: QemuCpu,
    *,
    xen_args: str = "ucode=scan",
    until: str | None = AFTER_MICROCODE,
    timeout: float = 60.0,
    xen: Path | None = None,
) -> BootLog:
    """Boot Xen with ``initrds`` as modules 1.. (after a stand-in dom0 kernel).

    ``xen_args`` is added to a serial-console command line; ``until`` stops
    QEMU once Xen prints it (None: run until QEMU exits or ``timeout``).
    """
    xen = xen or ensure_xen()
    cmdline = f"console=com1 com1=115200 loglvl=all guest_loglvl=all {xen_args}".strip()
    with tempfile.TemporaryDirectory(prefix="xenlab-xen-") as tmp:
        paths = [Path(tmp) / "dom0-kernel"]
        paths[0].write_bytes(_DUMMY_KERNEL)
        for i, data in enumerate(initrds, 1):
            paths.append(Path(tmp) / f"module{i}")
            paths[-1].write_bytes(data)
        argv = qemu_command(xen, cpu, paths, cmdline)
        return run_qemu(argv, until=until, timeout=timeout)
