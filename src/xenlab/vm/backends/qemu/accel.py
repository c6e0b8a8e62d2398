"""The QEMU accelerator: :class:`Accel`, and :func:`probe_accel`, which picks KVM or TCG.

KVM is chosen only when ``/dev/kvm`` opens *and* a real probe boot runs
guest code under ``-accel kvm -cpu host`` (:func:`boots`, a multiboot stub
from :func:`probe_kernel` that exits QEMU through ``isa-debug-exit``);
anything else is TCG.  The probe is the one place here that starts a
process: a short-lived QEMU in a temporary directory, bounded by a timeout.
"""

from __future__ import annotations

import enum
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Final

__all__ = ["Accel", "boots", "probe_accel", "probe_kernel"]


class Accel(enum.Enum):
    """The QEMU accelerator a domain runs under."""

    TCG = "tcg"
    KVM = "kvm"


# A multiboot image in the a.out-kludge form (flags bit 16: load addresses in
# the header), so QEMU loads it flat at 1 MiB and enters at +32 in 32-bit
# protected mode.  It writes 0x2a to isa-debug-exit's port 0xf4, which makes
# QEMU exit with status (0x2a << 1) | 1 = 85: proof the vCPU ran guest code.
_PROBE_EXIT: Final = (0x2A << 1) | 1


def probe_kernel() -> bytes:
    """The probe's multiboot stub: it exits QEMU with status 85 through port 0xf4."""
    magic, flags, base = 0x1BADB002, 0x00010000, 0x100000
    checksum = -(magic + flags) & 0xFFFFFFFF
    words = (magic, flags, checksum, base, base, 0, 0, base + 32)
    header = b"".join(w.to_bytes(4, "little") for w in words)
    # mov al,0x2a; out 0xf4,al; hlt; jmp $-1
    return header + bytes((0xB0, 0x2A, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD))


def boots(binary: str, accel: Accel, timeout: float) -> bool:
    """Whether a tiny guest runs to its exit port under ``accel``."""
    with tempfile.TemporaryDirectory(prefix="xenlab-probe-") as tmp:
        kernel = Path(tmp) / "probe.bin"
        kernel.write_bytes(probe_kernel())
        argv = [
            binary, "-no-user-config", "-nodefaults", "-display", "none",
            "-machine", "pc", "-accel", accel.value,
            "-cpu", "host" if accel is Accel.KVM else "max",
            "-m", "16", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel", str(kernel),
        ]  # fmt: skip
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return done.returncode == _PROBE_EXIT


def probe_accel(timeout: float = 10.0, *, binary: str = "qemu-system-x86_64") -> Accel:
    """KVM when ``/dev/kvm`` opens and a tiny guest really runs under it, else TCG.

    Opening the device is not enough: nested or emulated KVM may accept the
    ioctls and then fail setting the vCPU's MSRs (QEMU aborts), so a
    multiboot stub must reach its exit port under ``-accel kvm -cpu host``
    within ``timeout`` seconds.
    """
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return Accel.TCG
    os.close(fd)
    return Accel.KVM if boots(binary, Accel.KVM, timeout) else Accel.TCG
